from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReconcileRun(_message.Message):
    __slots__ = ("started", "finished", "replica", "staging_removed", "orphan_media_removed", "orphan_thumbnails_removed", "expired_grants_removed", "bytes_reclaimed", "rows_checked", "missing_media", "size_mismatch", "examples", "closed_commands_removed", "deleted_captures_forgotten")
    STARTED_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    STAGING_REMOVED_FIELD_NUMBER: _ClassVar[int]
    ORPHAN_MEDIA_REMOVED_FIELD_NUMBER: _ClassVar[int]
    ORPHAN_THUMBNAILS_REMOVED_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_GRANTS_REMOVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECLAIMED_FIELD_NUMBER: _ClassVar[int]
    ROWS_CHECKED_FIELD_NUMBER: _ClassVar[int]
    MISSING_MEDIA_FIELD_NUMBER: _ClassVar[int]
    SIZE_MISMATCH_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    CLOSED_COMMANDS_REMOVED_FIELD_NUMBER: _ClassVar[int]
    DELETED_CAPTURES_FORGOTTEN_FIELD_NUMBER: _ClassVar[int]
    started: str
    finished: str
    replica: str
    staging_removed: float
    orphan_media_removed: float
    orphan_thumbnails_removed: float
    expired_grants_removed: float
    bytes_reclaimed: float
    rows_checked: float
    missing_media: float
    size_mismatch: float
    examples: _containers.RepeatedScalarFieldContainer[str]
    closed_commands_removed: float
    deleted_captures_forgotten: float
    def __init__(self, started: _Optional[str] = ..., finished: _Optional[str] = ..., replica: _Optional[str] = ..., staging_removed: _Optional[float] = ..., orphan_media_removed: _Optional[float] = ..., orphan_thumbnails_removed: _Optional[float] = ..., expired_grants_removed: _Optional[float] = ..., bytes_reclaimed: _Optional[float] = ..., rows_checked: _Optional[float] = ..., missing_media: _Optional[float] = ..., size_mismatch: _Optional[float] = ..., examples: _Optional[_Iterable[str]] = ..., closed_commands_removed: _Optional[float] = ..., deleted_captures_forgotten: _Optional[float] = ...) -> None: ...

class VerifyRun(_message.Message):
    __slots__ = ("started", "finished", "events", "checked", "skipped", "bytes_read", "damaged", "missing", "seconds", "examples")
    STARTED_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    CHECKED_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    BYTES_READ_FIELD_NUMBER: _ClassVar[int]
    DAMAGED_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    started: str
    finished: str
    events: float
    checked: float
    skipped: float
    bytes_read: float
    damaged: float
    missing: float
    seconds: float
    examples: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, started: _Optional[str] = ..., finished: _Optional[str] = ..., events: _Optional[float] = ..., checked: _Optional[float] = ..., skipped: _Optional[float] = ..., bytes_read: _Optional[float] = ..., damaged: _Optional[float] = ..., missing: _Optional[float] = ..., seconds: _Optional[float] = ..., examples: _Optional[_Iterable[str]] = ...) -> None: ...

class DiskStatus(_message.Message):
    __slots__ = ("total_bytes", "free_bytes", "min_free_bytes", "accepting_uploads")
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MIN_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ACCEPTING_UPLOADS_FIELD_NUMBER: _ClassVar[int]
    total_bytes: float
    free_bytes: float
    min_free_bytes: float
    accepting_uploads: bool
    def __init__(self, total_bytes: _Optional[float] = ..., free_bytes: _Optional[float] = ..., min_free_bytes: _Optional[float] = ..., accepting_uploads: _Optional[bool] = ...) -> None: ...

class AdminCounts(_message.Message):
    __slots__ = ("events_stored", "events_on_device", "stored_bytes", "upload_sessions", "upload_grants", "uploads_in_flight", "thumbnails_pending", "pulls_open")
    EVENTS_STORED_FIELD_NUMBER: _ClassVar[int]
    EVENTS_ON_DEVICE_FIELD_NUMBER: _ClassVar[int]
    STORED_BYTES_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_GRANTS_FIELD_NUMBER: _ClassVar[int]
    UPLOADS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    THUMBNAILS_PENDING_FIELD_NUMBER: _ClassVar[int]
    PULLS_OPEN_FIELD_NUMBER: _ClassVar[int]
    events_stored: float
    events_on_device: float
    stored_bytes: float
    upload_sessions: float
    upload_grants: float
    uploads_in_flight: float
    thumbnails_pending: float
    pulls_open: float
    def __init__(self, events_stored: _Optional[float] = ..., events_on_device: _Optional[float] = ..., stored_bytes: _Optional[float] = ..., upload_sessions: _Optional[float] = ..., upload_grants: _Optional[float] = ..., uploads_in_flight: _Optional[float] = ..., thumbnails_pending: _Optional[float] = ..., pulls_open: _Optional[float] = ...) -> None: ...

class GetAdminStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetAdminStatusResponse(_message.Message):
    __slots__ = ("last_reconcile", "disk", "counts", "device_storage", "database_up", "last_verify", "incoming")
    LAST_RECONCILE_FIELD_NUMBER: _ClassVar[int]
    DISK_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_STORAGE_FIELD_NUMBER: _ClassVar[int]
    DATABASE_UP_FIELD_NUMBER: _ClassVar[int]
    LAST_VERIFY_FIELD_NUMBER: _ClassVar[int]
    INCOMING_FIELD_NUMBER: _ClassVar[int]
    last_reconcile: ReconcileRun
    disk: DiskStatus
    counts: AdminCounts
    device_storage: DeviceStorage
    database_up: bool
    last_verify: VerifyRun
    incoming: DropBacklog
    def __init__(self, last_reconcile: _Optional[_Union[ReconcileRun, _Mapping]] = ..., disk: _Optional[_Union[DiskStatus, _Mapping]] = ..., counts: _Optional[_Union[AdminCounts, _Mapping]] = ..., device_storage: _Optional[_Union[DeviceStorage, _Mapping]] = ..., database_up: _Optional[bool] = ..., last_verify: _Optional[_Union[VerifyRun, _Mapping]] = ..., incoming: _Optional[_Union[DropBacklog, _Mapping]] = ...) -> None: ...

class DropBacklog(_message.Message):
    __slots__ = ("files", "bytes", "oldest", "scanned")
    FILES_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    OLDEST_FIELD_NUMBER: _ClassVar[int]
    SCANNED_FIELD_NUMBER: _ClassVar[int]
    files: float
    bytes: float
    oldest: str
    scanned: str
    def __init__(self, files: _Optional[float] = ..., bytes: _Optional[float] = ..., oldest: _Optional[str] = ..., scanned: _Optional[str] = ...) -> None: ...

class DeviceStorage(_message.Message):
    __slots__ = ("quota_bytes", "devices_at_quota", "devices_near_quota", "largest")
    QUOTA_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICES_AT_QUOTA_FIELD_NUMBER: _ClassVar[int]
    DEVICES_NEAR_QUOTA_FIELD_NUMBER: _ClassVar[int]
    LARGEST_FIELD_NUMBER: _ClassVar[int]
    quota_bytes: float
    devices_at_quota: float
    devices_near_quota: float
    largest: _containers.RepeatedCompositeFieldContainer[DeviceStorageUsage]
    def __init__(self, quota_bytes: _Optional[float] = ..., devices_at_quota: _Optional[float] = ..., devices_near_quota: _Optional[float] = ..., largest: _Optional[_Iterable[_Union[DeviceStorageUsage, _Mapping]]] = ...) -> None: ...

class DeviceStorageUsage(_message.Message):
    __slots__ = ("device", "used_bytes")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    device: str
    used_bytes: float
    def __init__(self, device: _Optional[str] = ..., used_bytes: _Optional[float] = ...) -> None: ...
