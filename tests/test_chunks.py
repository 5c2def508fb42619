"""Upload and download messages without protobuf's copies (rpc/chunks.py): the servicer reads the
same values as from protobuf's own parse, whatever arrives on the wire, without a copy of the
bytes; a download chunk goes out as the bytes protobuf would have serialized."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from google.api import httpbody_pb2
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gallery.v1 import gallery_pb2 as pb
from gallery_server.rpc import chunks, interceptor

PROFILE = settings(
    max_examples=300, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
METHOD = {
    pb.UploadEventRequest: "/gallery.v1.GalleryService/UploadEvent",
    pb.UploadEventFormRequest: "/gallery.v1.GalleryService/UploadEventForm",
    pb.PutSignedUploadRequest: "/gallery.v1.GalleryService/PutSignedUpload",
    pb.WriteUploadRequest: "/gallery.v1.GalleryService/WriteUpload",
}


def decode(cls: type[Message], data: bytes) -> Any:
    return chunks.deserializer(METHOD[cls], cls.FromString)(data)


def assert_reads_alike(got: Any, parsed: Message) -> None:
    """Every read the servicer could make answers the same on `got` as on protobuf's parse."""
    descriptor = parsed.DESCRIPTOR
    for oneof in descriptor.oneofs:
        assert got.WhichOneof(oneof.name) == parsed.WhichOneof(oneof.name)
    for field in descriptor.fields:
        value, expected = getattr(got, field.name), getattr(parsed, field.name)
        if field.is_repeated:
            assert len(value) == len(expected) == 0, field.name  # no upload message repeats
            continue
        if field.has_presence:
            assert got.HasField(field.name) == parsed.HasField(field.name), field.name
        else:
            with pytest.raises(ValueError):
                got.HasField(field.name)
        if field.type == field.TYPE_MESSAGE:
            assert_reads_alike(value, expected)
        elif field.type == field.TYPE_BYTES:
            assert bytes(value) == expected, field.name
        else:
            assert value == expected, field.name


def assert_decodes_as_protobuf_parses(cls: type[Message], data: bytes) -> None:
    """The same reads as protobuf's parse of `data`, or the same DecodeError."""
    try:
        parsed = cls.FromString(data)
    except DecodeError:
        with pytest.raises(DecodeError):
            decode(cls, data)
        return
    assert_reads_alike(decode(cls, data), parsed)


# -- the body messages: decoded as a view of the received buffer --------------------------------

CHUNK_SHAPES = [
    (pb.UploadEventRequest(media_chunk=b"media " * 1000), lambda m: m.media_chunk),
    (pb.UploadEventRequest(thumbnail_chunk=b"thumb"), lambda m: m.thumbnail_chunk),
    (pb.UploadEventRequest(media_chunk=b""), lambda m: m.media_chunk),
    (pb.WriteUploadRequest(data=b"resumable " * 300), lambda m: m.data),
    (pb.UploadEventFormRequest(http_body=httpbody_pb2.HttpBody(data=b"--boundary\r\n")),
     lambda m: m.http_body.data),
    (pb.PutSignedUploadRequest(http_body=httpbody_pb2.HttpBody(data=b"\x00" * 70000)),
     lambda m: m.http_body.data),
]


@pytest.mark.parametrize(("message", "chunk_of"), CHUNK_SHAPES)
def test_a_body_message_is_a_view_of_the_received_bytes(message, chunk_of):
    data = message.SerializeToString()
    got = decode(type(message), data)
    assert isinstance(got, chunks.ChunkMessage)
    chunk = chunk_of(got)
    assert isinstance(chunk, memoryview) and chunk.obj is data  # not a copy
    assert bytes(chunk) == chunk_of(message)
    assert_reads_alike(got, type(message).FromString(data))


@pytest.mark.parametrize("message", [
    pb.UploadEventRequest(header=pb.UploadHeader(device="cam1", name="a.jpg", size=3)),
    pb.UploadEventRequest(finish=pb.UploadFinish(sha256="ab" * 32)),
    pb.UploadEventRequest(),
    pb.WriteUploadRequest(device="cam1", upload_id="u1", data=b"x"),  # the first write names them
    pb.WriteUploadRequest(data=b"x", finish_write=True),
    pb.UploadEventFormRequest(device="cam1", http_body=httpbody_pb2.HttpBody(
        content_type="multipart/form-data; boundary=b", data=b"--b")),
    pb.PutSignedUploadRequest(device="cam1", token="t", http_body=httpbody_pb2.HttpBody(data=b"x")),
])
def test_every_other_message_is_parsed_by_protobuf(message):
    got = decode(type(message), message.SerializeToString())
    assert type(got) is type(message) and got == message


def test_a_field_sent_twice_is_parsed_by_protobuf_last_one_wins():
    data = (pb.UploadEventRequest(media_chunk=b"first").SerializeToString()
            + pb.UploadEventRequest(media_chunk=b"second").SerializeToString())
    got = decode(pb.UploadEventRequest, data)
    assert isinstance(got, pb.UploadEventRequest) and got.media_chunk == b"second"


# Tags and lengths of 2 to 6 bytes, values past 32 bits, at the top and inside http_body: taken
# as protobuf takes them (it reads at most 5 bytes and refuses a value of 2**32 or more).
VARINTS = [
    (pb.UploadEventRequest, b"\x92\x00\x03abc"),
    (pb.UploadEventRequest, b"\x92\x80\x80\x80\x00\x03abc"),
    (pb.UploadEventRequest, b"\x92\x80\x80\x80\x80\x00\x03abc"),
    (pb.UploadEventRequest, b"\x92\x80\x80\x80\x10\x03abc"),
    (pb.UploadEventRequest, b"\x92\x80\x80\x80\x0f\x03abc"),
    (pb.UploadEventRequest, b"\x12\x83\x80\x80\x80\x00abc"),
    (pb.UploadEventRequest, b"\x12\x83\x80\x80\x80\x80\x00abc"),
    (pb.UploadEventRequest, b"\x12\x83\x80\x80\x80\x10abc"),
    (pb.WriteUploadRequest, b"\x22\x83\x80\x00abc"),
    (pb.UploadEventFormRequest, b"\x12\x07\x12\x83\x80\x00abc"),
    (pb.UploadEventFormRequest, b"\x12\x0a\x12\x83\x80\x80\x80\x80\x00abc"),
    (pb.PutSignedUploadRequest, b"\x1a\x85\x80\x80\x80\x80\x00\x12\x03abc"),
    (pb.PutSignedUploadRequest, b"\x9a\x80\x00\x06\x92\x00\x03abc"),
]


@pytest.mark.parametrize(("cls", "data"), VARINTS)
def test_long_varints_read_as_protobuf_reads_them(cls, data):
    assert_decodes_as_protobuf_parses(cls, data)


def test_a_view_answers_field_reads_only():
    got = decode(pb.UploadEventRequest, pb.UploadEventRequest(media_chunk=b"x").SerializeToString())
    with pytest.raises(AttributeError, match="SerializeToString"):
        got.SerializeToString()
    with pytest.raises(ValueError):
        got.WhichOneof("no_such_group")  # as protobuf answers


def test_copying_a_view_fails_cleanly():
    got = decode(pb.UploadEventRequest, pb.UploadEventRequest(media_chunk=b"x").SerializeToString())
    with pytest.raises((AttributeError, TypeError)):
        copy.deepcopy(got)
    assert not hasattr(chunks.ChunkMessage.__new__(chunks.ChunkMessage), "media_chunk")  # no recursion


def test_a_change_to_a_default_stays_in_its_message():
    data = pb.UploadEventRequest(media_chunk=b"x").SerializeToString()
    deserialize = chunks.deserializer(METHOD[pb.UploadEventRequest], pb.UploadEventRequest.FromString)
    first = deserialize(data)
    first.finish.sha256 = "changed"
    second = deserialize(data)  # the next message of the stream
    assert second.finish.sha256 == "" and not second.HasField("finish")


def test_other_methods_keep_their_deserializer():
    parse = pb.GetStatsRequest.FromString
    assert chunks.deserializer("/gallery.v1.GalleryService/GetStats", parse) is parse


def test_the_interceptor_decodes_upload_bodies_without_copying():
    data = pb.UploadEventRequest(media_chunk=b"abc").SerializeToString()
    deserialize = interceptor._tolerant(METHOD[pb.UploadEventRequest], pb.UploadEventRequest.FromString)
    assert isinstance(deserialize(data), chunks.ChunkMessage)
    assert isinstance(deserialize(b"\x12\x05ab"), interceptor._Undecodable)  # cut short


# -- downloads: chunks encoded as protobuf would, sent unchanged ----------------------------------

@pytest.mark.parametrize("message_type", [httpbody_pb2.HttpBody, pb.ReadEventContentResponse])
@pytest.mark.parametrize("size", [1, 127, 128, 16383, 16384, 1 << 20])
def test_a_download_chunk_is_encoded_as_protobuf_serializes_it(message_type, size):
    data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    encoded = chunks.bytes_message(message_type, "data")(data)
    assert encoded.wire == message_type(data=data).SerializeToString()
    send = chunks.serializer(message_type.SerializeToString)
    assert send(encoded) is encoded.wire
    assert send(message_type(data=b"ab")) == message_type(data=b"ab").SerializeToString()


def test_an_empty_download_chunk_is_an_empty_message():
    assert chunks.bytes_message(pb.ReadEventContentResponse, "data")(b"").wire == b""


# -- any input: the same reads as protobuf's parse, or the same DecodeError ---------------------

text = st.text(max_size=8)
blob = st.binary(max_size=64)
bodies = st.builds(httpbody_pb2.HttpBody, content_type=text, data=blob) | st.builds(
    httpbody_pb2.HttpBody, data=blob)
MESSAGES = {
    pb.UploadEventRequest: st.one_of(
        st.builds(pb.UploadEventRequest, media_chunk=blob),
        st.builds(pb.UploadEventRequest, thumbnail_chunk=blob),
        st.builds(pb.UploadEventRequest, header=st.builds(pb.UploadHeader, device=text, name=text)),
        st.builds(pb.UploadEventRequest, finish=st.builds(pb.UploadFinish, sha256=text)),
        st.just(pb.UploadEventRequest()),
    ),
    pb.WriteUploadRequest: st.builds(
        pb.WriteUploadRequest, device=text, upload_id=text,
        write_offset=st.integers(-(2**63), 2**63 - 1), data=blob, finish_write=st.booleans(),
    ) | st.builds(pb.WriteUploadRequest, data=blob),
    pb.UploadEventFormRequest: st.builds(pb.UploadEventFormRequest, device=text, http_body=bodies)
    | st.builds(pb.UploadEventFormRequest, http_body=bodies),
    pb.PutSignedUploadRequest: st.builds(
        pb.PutSignedUploadRequest, device=text, token=text, http_body=bodies,
    ) | st.builds(pb.PutSignedUploadRequest, http_body=bodies),
}


def wire(cls: type[Message]) -> st.SearchStrategy[bytes]:
    """One or two messages' bytes (concatenated, as protobuf merges them), cut or appended to at
    random, or any bytes at all."""
    one = MESSAGES[cls].map(lambda m: m.SerializeToString())
    return st.one_of(
        one,
        st.tuples(one, one).map(b"".join),
        st.tuples(one, st.integers(0, 80)).map(lambda t: t[0][: t[1]]),
        st.tuples(one, st.binary(min_size=1, max_size=4)).map(b"".join),
        st.binary(max_size=40),
    )


@pytest.mark.parametrize("cls", list(METHOD), ids=lambda c: c.__name__)
def test_any_wire_bytes_read_as_protobuf_reads_them(cls):
    @PROFILE
    @given(wire(cls))
    def check(data: bytes) -> None:
        assert_decodes_as_protobuf_parses(cls, data)

    check()
