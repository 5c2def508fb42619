"""DeviceService on an in-process server (port 0): the channel's edge cases."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import pytest

from gallery.v1 import device_pb2 as dpb
from gallery.v1 import device_pb2_grpc, gallery_pb2, gallery_pb2_grpc

from .conftest import rich_error


@pytest.fixture
def channel(grpc_port: int) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        yield channel


def device_auth(mint, device="cam1"):
    return [("authorization", f"Bearer {mint(devices=[device], scope='gallery:device')}")]


def test_a_half_closed_channel_still_receives_commands(channel, mint, gallery):
    stub = device_pb2_grpc.DeviceServiceStub(channel)
    auth = device_auth(mint)
    [result] = stub.AnnounceEvents(dpb.AnnounceEventsRequest(device="cam1", events=[
        dpb.AnnouncedEvent(device_key="a.mp4", name="a.mp4", size=3)]), metadata=auth).results
    # The device sends its hello and closes its side; commands must still reach it.
    stream = stub.Connect(iter([dpb.ConnectRequest(hello=dpb.DeviceHello(device="cam1"))]), metadata=auth)
    got: list[dpb.ConnectResponse] = []
    done = threading.Event()

    def read() -> None:
        for message in stream:
            got.append(message)
            if message.HasField("command"):
                done.set()
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    user = [("authorization", f"Bearer {mint(devices=['cam1'])}")]
    gallery_pb2_grpc.GalleryServiceStub(channel).PullEvent(
        gallery_pb2.PullEventRequest(device="cam1", event_id=result.event_id), metadata=user)
    assert done.wait(10), got
    assert got[-1].command.upload_event.event_id == result.event_id
    stream.cancel()


def test_an_out_of_range_created_is_invalid(channel, mint):
    stub = device_pb2_grpc.DeviceServiceStub(channel)
    event = dpb.AnnouncedEvent(device_key="a", name="a.jpg")
    event.created.seconds = 2**40
    with pytest.raises(grpc.RpcError) as caught:
        stub.AnnounceEvents(dpb.AnnounceEventsRequest(device="cam1", events=[event]), metadata=device_auth(mint))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info, _ = rich_error(caught.value)
    assert info.reason == "INVALID_CREATED"


def test_a_bad_message_ends_the_channel_with_invalid_argument(channel, mint):
    """An undecodable message on the channel ends it with INVALID_ARGUMENT MALFORMED_REQUEST (the
    one error mapping), not with OK as if the server had simply closed it."""
    connect = channel.stream_stream(
        "/gallery.v1.DeviceService/Connect", request_serializer=lambda raw: raw,
        response_deserializer=dpb.ConnectResponse.FromString,
    )
    sent = threading.Event()

    def requests():
        yield dpb.ConnectRequest(hello=dpb.DeviceHello(device="cam1")).SerializeToString()
        yield b"\xff\xff\xff\xff"  # not a protobuf message
        sent.wait(10)  # keep our side open: the server must end the call

    stream = connect(requests(), metadata=device_auth(mint), timeout=20)
    with pytest.raises(grpc.RpcError) as caught:
        for _ in stream:
            pass
    sent.set()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value
    info, _ = rich_error(caught.value)
    assert info.reason == "MALFORMED_REQUEST"


def test_a_deleted_capture_is_answered_deleted(channel, mint):
    devices = device_pb2_grpc.DeviceServiceStub(channel)
    auth = device_auth(mint)
    announced = dpb.AnnounceEventsRequest(device="cam1", events=[
        dpb.AnnouncedEvent(device_key="dcim/a.mp4", name="a.mp4", size=3, sha256="ab" * 32)])
    [first] = devices.AnnounceEvents(announced, metadata=auth).results
    user = [("authorization", f"Bearer {mint(devices=['cam1'])}")]
    gallery_pb2_grpc.GalleryServiceStub(channel).DeleteEvent(
        gallery_pb2.DeleteEventRequest(device="cam1", event_id=first.event_id), metadata=user)
    [again] = devices.AnnounceEvents(announced, metadata=auth).results
    assert (again.device_key, again.event_id, again.state) == ("dcim/a.mp4", first.event_id, "deleted")
    listed = gallery_pb2_grpc.GalleryServiceStub(channel).ListEvents(
        gallery_pb2.ListEventsRequest(device="cam1"), metadata=user)
    assert list(listed) == []
