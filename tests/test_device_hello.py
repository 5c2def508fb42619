"""A device channel's first message, its hello: a stream that never sends one does not keep its
server thread, and streams waiting for theirs count with the open channels."""

from __future__ import annotations

import pathlib
import threading
import time

import grpc
import pytest

from gallery.v1 import device_pb2 as dpb
from gallery.v1 import device_pb2_grpc
from gallery_server import devices as devices_module

from .conftest import make_settings, rich_error

WORKERS = 8  # so a server holds GALLERY_GRPC_WORKERS // 2 = 4 channels


@pytest.fixture
def settings(tmp_path: pathlib.Path, database_url: str):
    data = tmp_path / "data"
    data.mkdir()
    return make_settings(data, database_url, grpc_workers=WORKERS, max_uploads_total=2)


@pytest.fixture(autouse=True)
def quick_hello(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices_module, "HELLO_SECONDS", 1.0)


def silent_connect(channel: grpc.Channel, token: str, stop: threading.Event):
    def nothing():
        stop.wait(30)
        yield from ()

    return device_pb2_grpc.DeviceServiceStub(channel).Connect(
        nothing(), metadata=[("authorization", f"Bearer {token}")], timeout=30)


def test_a_stream_that_never_says_hello_is_ended(grpc_port, mint):
    stop = threading.Event()
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as ended:
            next(silent_connect(channel, mint(devices=["cam1"], scope="gallery:device"), stop))
        stop.set()
    assert ended.value.code() == grpc.StatusCode.CANCELLED
    assert time.monotonic() - started < 10


def test_only_a_device_token_may_wait_for_its_hello(grpc_port, mint):
    stop = threading.Event()
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        with pytest.raises(grpc.RpcError) as refused:
            next(silent_connect(channel, mint(devices=["cam1"], scope="gallery:read"), stop))
        stop.set()
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert rich_error(refused.value)[0].reason == "SCOPE_MISSING"


def test_streams_waiting_for_their_hello_count_with_the_channels(grpc_port, mint):
    """Streams that say nothing cannot take more than the channels' share of the threads: past
    it, one more is refused at once, and the device channels' places come back as they end."""
    token, stop = mint(devices=["*"], scope="gallery:device"), threading.Event()
    limit = WORKERS // devices_module.CHANNELS_SHARE
    outcomes: list[grpc.StatusCode] = []
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        calls = [silent_connect(channel, token, stop) for _ in range(limit + 2)]

        def outcome(call) -> None:
            try:
                next(call)
            except grpc.RpcError as error:
                outcomes.append(error.code())

        readers = [threading.Thread(target=outcome, args=(call,)) for call in calls]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(20)
        # The silent ones held their places for the hello's time and were cancelled; the rest
        # were refused at once.
        assert sorted(c.name for c in outcomes) == sorted(
            ["CANCELLED"] * limit + ["RESOURCE_EXHAUSTED"] * 2)
        # Their places are free again: a device connects.
        hello = dpb.ConnectRequest(hello=dpb.DeviceHello(device="cam1"))
        stream = device_pb2_grpc.DeviceServiceStub(channel).Connect(
            iter([hello]), metadata=[("authorization", f"Bearer {token}")], timeout=30)
        assert next(stream).HasField("heartbeat")
        stream.cancel()
        stop.set()
