import datetime

from google.api import annotations_pb2 as _annotations_pb2
from google.api import httpbody_pb2 as _httpbody_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Event(_message.Message):
    __slots__ = ("id", "name", "media_type", "size", "has_thumbnail", "created", "mime_type", "sha256", "metadata", "state", "pull")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    HAS_THUMBNAIL_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    MIME_TYPE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PULL_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    media_type: str
    size: float
    has_thumbnail: bool
    created: _timestamp_pb2.Timestamp
    mime_type: str
    sha256: str
    metadata: _struct_pb2.Struct
    state: str
    pull: PullStatus
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., media_type: _Optional[str] = ..., size: _Optional[float] = ..., has_thumbnail: _Optional[bool] = ..., created: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., mime_type: _Optional[str] = ..., sha256: _Optional[str] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., state: _Optional[str] = ..., pull: _Optional[_Union[PullStatus, _Mapping]] = ...) -> None: ...

class PullStatus(_message.Message):
    __slots__ = ("state", "error", "requested", "expires_at")
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    state: str
    error: str
    requested: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    def __init__(self, state: _Optional[str] = ..., error: _Optional[str] = ..., requested: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetDevicePathsRequest(_message.Message):
    __slots__ = ("device",)
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    device: str
    def __init__(self, device: _Optional[str] = ...) -> None: ...

class GetDevicePathsResponse(_message.Message):
    __slots__ = ("success", "paths")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    PATHS_FIELD_NUMBER: _ClassVar[int]
    success: bool
    paths: DevicePaths
    def __init__(self, success: _Optional[bool] = ..., paths: _Optional[_Union[DevicePaths, _Mapping]] = ...) -> None: ...

class DevicePaths(_message.Message):
    __slots__ = ("incoming", "thumbnails")
    INCOMING_FIELD_NUMBER: _ClassVar[int]
    THUMBNAILS_FIELD_NUMBER: _ClassVar[int]
    incoming: str
    thumbnails: str
    def __init__(self, incoming: _Optional[str] = ..., thumbnails: _Optional[str] = ...) -> None: ...

class ListEventsRequest(_message.Message):
    __slots__ = ("device", "media_type", "limit", "offset", "since", "until", "order", "page_token")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    ORDER_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    device: str
    media_type: str
    limit: int
    offset: int
    since: str
    until: str
    order: str
    page_token: str
    def __init__(self, device: _Optional[str] = ..., media_type: _Optional[str] = ..., limit: _Optional[int] = ..., offset: _Optional[int] = ..., since: _Optional[str] = ..., until: _Optional[str] = ..., order: _Optional[str] = ..., page_token: _Optional[str] = ...) -> None: ...

class GetEventRequest(_message.Message):
    __slots__ = ("device", "event_id")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    device: str
    event_id: str
    def __init__(self, device: _Optional[str] = ..., event_id: _Optional[str] = ...) -> None: ...

class UploadEventRequest(_message.Message):
    __slots__ = ("header", "media_chunk", "thumbnail_chunk", "finish")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    MEDIA_CHUNK_FIELD_NUMBER: _ClassVar[int]
    THUMBNAIL_CHUNK_FIELD_NUMBER: _ClassVar[int]
    FINISH_FIELD_NUMBER: _ClassVar[int]
    header: UploadHeader
    media_chunk: bytes
    thumbnail_chunk: bytes
    finish: UploadFinish
    def __init__(self, header: _Optional[_Union[UploadHeader, _Mapping]] = ..., media_chunk: _Optional[bytes] = ..., thumbnail_chunk: _Optional[bytes] = ..., finish: _Optional[_Union[UploadFinish, _Mapping]] = ...) -> None: ...

class UploadFinish(_message.Message):
    __slots__ = ("size", "sha256")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    size: int
    sha256: str
    def __init__(self, size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class UploadHeader(_message.Message):
    __slots__ = ("device", "name", "media_type", "metadata", "size", "sha256", "event_id", "device_event_id")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    device: str
    name: str
    media_type: str
    metadata: _struct_pb2.Struct
    size: int
    sha256: str
    event_id: str
    device_event_id: str
    def __init__(self, device: _Optional[str] = ..., name: _Optional[str] = ..., media_type: _Optional[str] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ..., event_id: _Optional[str] = ..., device_event_id: _Optional[str] = ...) -> None: ...

class UploadEventResponse(_message.Message):
    __slots__ = ("success", "event_id")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    success: bool
    event_id: str
    def __init__(self, success: _Optional[bool] = ..., event_id: _Optional[str] = ...) -> None: ...

class UploadEventFormRequest(_message.Message):
    __slots__ = ("device", "http_body")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    HTTP_BODY_FIELD_NUMBER: _ClassVar[int]
    device: str
    http_body: _httpbody_pb2.HttpBody
    def __init__(self, device: _Optional[str] = ..., http_body: _Optional[_Union[_httpbody_pb2.HttpBody, _Mapping]] = ...) -> None: ...

class CreateUploadUrlRequest(_message.Message):
    __slots__ = ("device", "filename", "thumbnail")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    THUMBNAIL_FIELD_NUMBER: _ClassVar[int]
    device: str
    filename: str
    thumbnail: bool
    def __init__(self, device: _Optional[str] = ..., filename: _Optional[str] = ..., thumbnail: _Optional[bool] = ...) -> None: ...

class CreateUploadUrlResponse(_message.Message):
    __slots__ = ("success", "upload_url", "thumbnail_upload_url", "event_id", "expires_at")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_URL_FIELD_NUMBER: _ClassVar[int]
    THUMBNAIL_UPLOAD_URL_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    success: bool
    upload_url: str
    thumbnail_upload_url: str
    event_id: str
    expires_at: _timestamp_pb2.Timestamp
    def __init__(self, success: _Optional[bool] = ..., upload_url: _Optional[str] = ..., thumbnail_upload_url: _Optional[str] = ..., event_id: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class PutSignedUploadRequest(_message.Message):
    __slots__ = ("device", "token", "http_body")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    HTTP_BODY_FIELD_NUMBER: _ClassVar[int]
    device: str
    token: str
    http_body: _httpbody_pb2.HttpBody
    def __init__(self, device: _Optional[str] = ..., token: _Optional[str] = ..., http_body: _Optional[_Union[_httpbody_pb2.HttpBody, _Mapping]] = ...) -> None: ...

class GetSignedUploadStatusRequest(_message.Message):
    __slots__ = ("device", "token")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    device: str
    token: str
    def __init__(self, device: _Optional[str] = ..., token: _Optional[str] = ...) -> None: ...

class SignedUploadStatus(_message.Message):
    __slots__ = ("success", "event_id", "committed_size", "size", "complete", "expires_at")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_SIZE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    success: bool
    event_id: str
    committed_size: float
    size: float
    complete: bool
    expires_at: _timestamp_pb2.Timestamp
    def __init__(self, success: _Optional[bool] = ..., event_id: _Optional[str] = ..., committed_size: _Optional[float] = ..., size: _Optional[float] = ..., complete: _Optional[bool] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ("device",)
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    device: str
    def __init__(self, device: _Optional[str] = ...) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("total_events", "total_size", "by_type", "quota")
    class ByTypeEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: TypeStats
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[TypeStats, _Mapping]] = ...) -> None: ...
    TOTAL_EVENTS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    BY_TYPE_FIELD_NUMBER: _ClassVar[int]
    QUOTA_FIELD_NUMBER: _ClassVar[int]
    total_events: float
    total_size: float
    by_type: _containers.MessageMap[str, TypeStats]
    quota: DeviceQuota
    def __init__(self, total_events: _Optional[float] = ..., total_size: _Optional[float] = ..., by_type: _Optional[_Mapping[str, TypeStats]] = ..., quota: _Optional[_Union[DeviceQuota, _Mapping]] = ...) -> None: ...

class DeviceQuota(_message.Message):
    __slots__ = ("limit_bytes", "used_bytes", "available_bytes")
    LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    limit_bytes: float
    used_bytes: float
    available_bytes: float
    def __init__(self, limit_bytes: _Optional[float] = ..., used_bytes: _Optional[float] = ..., available_bytes: _Optional[float] = ...) -> None: ...

class TypeStats(_message.Message):
    __slots__ = ("count", "size")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    count: float
    size: float
    def __init__(self, count: _Optional[float] = ..., size: _Optional[float] = ...) -> None: ...

class PullEventRequest(_message.Message):
    __slots__ = ("device", "event_id", "wait")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    device: str
    event_id: str
    wait: int
    def __init__(self, device: _Optional[str] = ..., event_id: _Optional[str] = ..., wait: _Optional[int] = ...) -> None: ...

class PullEventResponse(_message.Message):
    __slots__ = ("success", "event_id", "state", "pull")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PULL_FIELD_NUMBER: _ClassVar[int]
    success: bool
    event_id: str
    state: str
    pull: PullStatus
    def __init__(self, success: _Optional[bool] = ..., event_id: _Optional[str] = ..., state: _Optional[str] = ..., pull: _Optional[_Union[PullStatus, _Mapping]] = ...) -> None: ...

class GetEventContentRequest(_message.Message):
    __slots__ = ("device", "event_id")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    device: str
    event_id: str
    def __init__(self, device: _Optional[str] = ..., event_id: _Optional[str] = ...) -> None: ...

class GetEventThumbnailRequest(_message.Message):
    __slots__ = ("device", "event_id")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    device: str
    event_id: str
    def __init__(self, device: _Optional[str] = ..., event_id: _Optional[str] = ...) -> None: ...

class ReadEventContentRequest(_message.Message):
    __slots__ = ("device", "event_id", "read_offset", "read_limit")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    READ_OFFSET_FIELD_NUMBER: _ClassVar[int]
    READ_LIMIT_FIELD_NUMBER: _ClassVar[int]
    device: str
    event_id: str
    read_offset: int
    read_limit: int
    def __init__(self, device: _Optional[str] = ..., event_id: _Optional[str] = ..., read_offset: _Optional[int] = ..., read_limit: _Optional[int] = ...) -> None: ...

class ReadEventContentResponse(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class DeleteEventRequest(_message.Message):
    __slots__ = ("device", "event_id")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    device: str
    event_id: str
    def __init__(self, device: _Optional[str] = ..., event_id: _Optional[str] = ...) -> None: ...

class DeleteEventResponse(_message.Message):
    __slots__ = ("success",)
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    success: bool
    def __init__(self, success: _Optional[bool] = ...) -> None: ...

class UploadSession(_message.Message):
    __slots__ = ("upload_id", "committed_size", "expires_at", "event_id")
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_SIZE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    committed_size: int
    expires_at: _timestamp_pb2.Timestamp
    event_id: str
    def __init__(self, upload_id: _Optional[str] = ..., committed_size: _Optional[int] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., event_id: _Optional[str] = ...) -> None: ...

class StartUploadRequest(_message.Message):
    __slots__ = ("device", "name", "media_type", "metadata", "size", "sha256", "upload_id", "dedupe", "device_event_id")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    DEDUPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    device: str
    name: str
    media_type: str
    metadata: _struct_pb2.Struct
    size: int
    sha256: str
    upload_id: str
    dedupe: bool
    device_event_id: str
    def __init__(self, device: _Optional[str] = ..., name: _Optional[str] = ..., media_type: _Optional[str] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ..., upload_id: _Optional[str] = ..., dedupe: _Optional[bool] = ..., device_event_id: _Optional[str] = ...) -> None: ...

class WriteUploadRequest(_message.Message):
    __slots__ = ("device", "upload_id", "write_offset", "data", "finish_write")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    WRITE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    FINISH_WRITE_FIELD_NUMBER: _ClassVar[int]
    device: str
    upload_id: str
    write_offset: int
    data: bytes
    finish_write: bool
    def __init__(self, device: _Optional[str] = ..., upload_id: _Optional[str] = ..., write_offset: _Optional[int] = ..., data: _Optional[bytes] = ..., finish_write: _Optional[bool] = ...) -> None: ...

class QueryUploadRequest(_message.Message):
    __slots__ = ("device", "upload_id")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    device: str
    upload_id: str
    def __init__(self, device: _Optional[str] = ..., upload_id: _Optional[str] = ...) -> None: ...

class FindExistingChecksumsRequest(_message.Message):
    __slots__ = ("device", "sha256s")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SHA256S_FIELD_NUMBER: _ClassVar[int]
    device: str
    sha256s: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, device: _Optional[str] = ..., sha256s: _Optional[_Iterable[str]] = ...) -> None: ...

class FindExistingChecksumsResponse(_message.Message):
    __slots__ = ("existing",)
    class ExistingEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    EXISTING_FIELD_NUMBER: _ClassVar[int]
    existing: _containers.ScalarMap[str, str]
    def __init__(self, existing: _Optional[_Mapping[str, str]] = ...) -> None: ...
