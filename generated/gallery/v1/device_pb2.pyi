import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ConnectRequest(_message.Message):
    __slots__ = ("hello", "ack", "progress", "failure")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    hello: DeviceHello
    ack: CommandAck
    progress: CommandProgress
    failure: CommandFailure
    def __init__(self, hello: _Optional[_Union[DeviceHello, _Mapping]] = ..., ack: _Optional[_Union[CommandAck, _Mapping]] = ..., progress: _Optional[_Union[CommandProgress, _Mapping]] = ..., failure: _Optional[_Union[CommandFailure, _Mapping]] = ...) -> None: ...

class DeviceHello(_message.Message):
    __slots__ = ("device", "agent")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    device: str
    agent: str
    def __init__(self, device: _Optional[str] = ..., agent: _Optional[str] = ...) -> None: ...

class CommandAck(_message.Message):
    __slots__ = ("command_id",)
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    command_id: str
    def __init__(self, command_id: _Optional[str] = ...) -> None: ...

class CommandProgress(_message.Message):
    __slots__ = ("command_id", "bytes_sent")
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    command_id: str
    bytes_sent: int
    def __init__(self, command_id: _Optional[str] = ..., bytes_sent: _Optional[int] = ...) -> None: ...

class CommandFailure(_message.Message):
    __slots__ = ("command_id", "reason")
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    command_id: str
    reason: str
    def __init__(self, command_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ConnectResponse(_message.Message):
    __slots__ = ("command", "heartbeat")
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    command: Command
    heartbeat: Heartbeat
    def __init__(self, command: _Optional[_Union[Command, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Command(_message.Message):
    __slots__ = ("id", "upload_event")
    ID_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_EVENT_FIELD_NUMBER: _ClassVar[int]
    id: str
    upload_event: UploadEventCommand
    def __init__(self, id: _Optional[str] = ..., upload_event: _Optional[_Union[UploadEventCommand, _Mapping]] = ...) -> None: ...

class UploadEventCommand(_message.Message):
    __slots__ = ("event_id", "device_key", "name")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_KEY_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    device_key: str
    name: str
    def __init__(self, event_id: _Optional[str] = ..., device_key: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class AnnounceEventsRequest(_message.Message):
    __slots__ = ("device", "events")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    device: str
    events: _containers.RepeatedCompositeFieldContainer[AnnouncedEvent]
    def __init__(self, device: _Optional[str] = ..., events: _Optional[_Iterable[_Union[AnnouncedEvent, _Mapping]]] = ...) -> None: ...

class AnnouncedEvent(_message.Message):
    __slots__ = ("device_key", "name", "media_type", "size", "created", "metadata", "thumbnail", "sha256")
    DEVICE_KEY_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    THUMBNAIL_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    device_key: str
    name: str
    media_type: str
    size: int
    created: _timestamp_pb2.Timestamp
    metadata: _struct_pb2.Struct
    thumbnail: bytes
    sha256: str
    def __init__(self, device_key: _Optional[str] = ..., name: _Optional[str] = ..., media_type: _Optional[str] = ..., size: _Optional[int] = ..., created: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., thumbnail: _Optional[bytes] = ..., sha256: _Optional[str] = ...) -> None: ...

class AnnounceEventsResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[AnnouncedEventResult]
    def __init__(self, results: _Optional[_Iterable[_Union[AnnouncedEventResult, _Mapping]]] = ...) -> None: ...

class AnnouncedEventResult(_message.Message):
    __slots__ = ("device_key", "event_id", "state")
    DEVICE_KEY_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    device_key: str
    event_id: str
    state: str
    def __init__(self, device_key: _Optional[str] = ..., event_id: _Optional[str] = ..., state: _Optional[str] = ...) -> None: ...
