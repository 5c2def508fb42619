"""Upload messages that carry only bytes, decoded without copying the bytes.

Why: protobuf (upb) parses a 1 MiB chunk message by copying its bytes into the message, and every
read of a bytes field copies them again into a new bytes object. An upload's body so cost two
copies of every byte with the GIL held, on top of the one grpcio makes to hand the message to
Python. In one py-spy --gil profile of 16 concurrent uploads taken by hand before this module
(2026-11-28), 45% of the samples attributed to the GIL's holder were in those two copies.

What: on the wire, an upload's body messages are one length-delimited field: `media_chunk`,
`data`, or an `http_body` that holds only `data`. For exactly that shape, `deserializer` returns
a ChunkMessage, whose bytes field is a memoryview of the buffer grpcio received. Every other
shape goes to protobuf as before: a header, a finish message, a message that repeats
`device` or `upload_id`, a field sent twice or unknown fields. Field reads, WhichOneof and
HasField answer as on the parsed message: a field absent from the wire reads as its default
(a message or repeated field as a fresh one each time, so a change to it is not kept). Anything
else (SerializeToString, copying, ...) raises AttributeError rather than answer from a default.

Downloads, the other way: protobuf copies a chunk into the message it is set on and again into
the serialized bytes. `bytes_message` writes the same wire form with one copy (tag and length,
then the chunk), as an `Encoded` response that `serializer` passes on unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from google.protobuf import descriptor as _descriptor
from google.protobuf import message_factory
from google.protobuf.message import Message

from gallery.v1 import gallery_pb2

_LENGTH_DELIMITED = 2
_service = gallery_pb2.DESCRIPTOR.services_by_name["GalleryService"]
# The RPCs whose request stream is an upload's body.
BYTE_STREAMS = tuple(
    f"/{_service.full_name}/{name}"
    for name in ("UploadEvent", "UploadEventForm", "PutSignedUpload", "WriteUpload")
)


class ChunkMessage:
    """A received message whose wire form is a single bytes field (or a single message field
    holding one): that field, and the message type's defaults for every other field."""

    __slots__ = ("_default", "_field", "_value")

    def __init__(self, default: Message, field: _descriptor.FieldDescriptor, value: object) -> None:
        self._default = default
        self._field = field
        self._value = value

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ChunkMessage.__slots__:
            raise AttributeError(name)  # never recurse: a slot read here is a slot not yet set
        if name == self._field.name:
            return self._value
        field = self._default.DESCRIPTOR.fields_by_name.get(name)
        if field is not None:
            if field.type == field.TYPE_MESSAGE or field.is_repeated:
                # A fresh default: one a caller changed must not show in the next message.
                return getattr(type(self._default)(), name)
            return getattr(self._default, name)
        raise AttributeError(
            f"{self._default.DESCRIPTOR.name} decoded without copying has only field reads, "
            f"WhichOneof and HasField, not {name!r}"
        )

    def WhichOneof(self, group: str) -> str | None:  # noqa: N802 - protobuf's name
        oneof = self._field.containing_oneof
        if oneof is not None and oneof.name == group:
            return self._field.name
        return self._default.WhichOneof(group)  # type: ignore[arg-type]

    def HasField(self, name: str) -> bool:  # noqa: N802 - protobuf's name
        if name == self._field.name and self._field.has_presence:
            return True
        return self._default.HasField(name)  # False, or ValueError as protobuf says


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """(value, position after it), or (-1, end) unless a varint of at most 5 bytes ends before
    `end`: protobuf refuses longer tags and lengths, so those are left to it. (It also refuses a
    value of 2**32 or more, which names no field here and is no length a message can fit.)"""
    value = shift = 0
    while pos < end and shift < 35:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    return -1, end


@functools.cache
def _decoder(
    descriptor: _descriptor.Descriptor, nesting: int = 1,
) -> Callable[[bytes, int, int], object | None]:
    """decode(data, start, end): the message in data[start:end] as a ChunkMessage, if its wire
    form is one bytes field or, `nesting` levels deep at most (http_body is one), one message
    field of that form; else None."""
    default = message_factory.GetMessageClass(descriptor)()
    fields = {}
    for field in descriptor.fields:
        if field.is_repeated:
            continue
        if field.type == field.TYPE_BYTES:
            fields[field.number] = (field, None)
        elif field.type == field.TYPE_MESSAGE and nesting > 0:
            fields[field.number] = (field, _decoder(field.message_type, nesting - 1))

    def decode(data: bytes, start: int, end: int) -> object | None:
        tag, pos = _varint(data, start, end)
        found = fields.get(tag >> 3) if tag & 7 == _LENGTH_DELIMITED else None
        if found is None:
            return None
        size, pos = _varint(data, pos, end)
        if pos + size != end:  # more fields after this one, or a cut message
            return None
        field, nested = found
        value = memoryview(data)[pos:end] if nested is None else nested(data, pos, end)
        return None if value is None else ChunkMessage(default, field, value)

    return decode


def deserializer(method: str, parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """`parse` (the method's protobuf deserializer), with an upload's body messages decoded
    without copying where `method` is one of BYTE_STREAMS."""
    if method not in BYTE_STREAMS:
        return parse
    name = method.rsplit("/", 1)[1]
    decode = _decoder(_service.methods_by_name[name].input_type)

    def deserialize(data: bytes) -> Any:
        chunk = decode(data, 0, len(data))
        return parse(data) if chunk is None else chunk

    return deserialize


class Encoded:
    """A response message in its wire form already (bytes_message)."""

    __slots__ = ("wire",)

    def __init__(self, wire: bytes) -> None:
        self.wire = wire


def bytes_message(message_type: type[Message], field_name: str) -> Callable[[bytes], Encoded]:
    """An encoder of `message_type` messages that hold only `field_name`, a bytes field: the
    bytes protobuf would serialize, made with one copy of the chunk instead of two."""
    field = message_type.DESCRIPTOR.fields_by_name[field_name]
    assert field.type == field.TYPE_BYTES and not field.is_repeated, field_name
    tag = _varint_bytes(field.number << 3 | _LENGTH_DELIMITED)

    def encode(data: bytes) -> Encoded:
        if not data and not field.has_presence:
            return Encoded(b"")  # a default value is not on the wire
        return Encoded(b"".join((tag, _varint_bytes(len(data)), data)))

    return encode


def serializer(serialize: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    """`serialize` (a method's protobuf serializer), passing Encoded responses on as they are."""

    def run(message: Any) -> bytes:
        return message.wire if type(message) is Encoded else serialize(message)

    return run
