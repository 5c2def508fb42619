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
from gallery_server.threads import ThreadShares, thread_shares

from .conftest import make_settings, rich_error

# What a server of 18 threads, 2 of them for uploads, holds: (18 - 2) // 2 channels, // 8
# waiting for their hello (threads.py).
CHANNELS, HELLOS = 8, 2


@pytest.fixture
def settings(tmp_path: pathlib.Path):
    # SQLite only: what is tested here is the channel's threads and timers, not the database.
    data = tmp_path / "data"
    data.mkdir()
    settings = make_settings(data, grpc_workers=18, max_uploads_total=2)
    assert thread_shares(settings) == ThreadShares(channels=CHANNELS, pull_waits=2, downloads=2, hellos=HELLOS)
    return settings


@pytest.fixture(autouse=True)
def quick_hello(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices_module, "HELLO_SECONDS", 3.0)


def device_token(mint, devices=("*",)) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {mint(devices=list(devices), scope='gallery:device')}")]


def hello_channel(channel: grpc.Channel, metadata, device: str, stop: threading.Event):
    def requests():
        yield dpb.ConnectRequest(hello=dpb.DeviceHello(device=device))
        stop.wait(30)

    stream = device_pb2_grpc.DeviceServiceStub(channel).Connect(requests(), metadata=metadata, timeout=30)
    assert next(stream).HasField("heartbeat")
    return stream


def until_admitted(channel: grpc.Channel, metadata, device: str, stop: threading.Event):
    """A channel, once the server has a place for it again (its count goes down as the handlers
    of ended streams finish, on their own threads)."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return hello_channel(channel, metadata, device, stop)
        except grpc.RpcError as error:
            assert rich_error(error)[0].reason == "TOO_MANY_CONNECTIONS"
            assert time.monotonic() < deadline, "no place came back"
            time.sleep(0.1)


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
    assert time.monotonic() - started < 15


def test_only_a_device_token_may_wait_for_its_hello(grpc_port, mint):
    stop = threading.Event()
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        with pytest.raises(grpc.RpcError) as refused:
            next(silent_connect(channel, mint(devices=["cam1"], scope="gallery:read"), stop))
        stop.set()
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert rich_error(refused.value)[0].reason == "SCOPE_MISSING"


def test_only_a_few_streams_may_wait_for_their_hello(grpc_port, mint):
    """Streams that say nothing cannot take more than their share of the threads: past it, one
    more is refused at once, and the places come back as they end."""
    stop = threading.Event()
    outcomes: list[grpc.StatusCode] = []
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        calls = [silent_connect(channel, mint(devices=[f"cam{n}"], scope="gallery:device"), stop)
                 for n in range(HELLOS + 2)]

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
            ["CANCELLED"] * HELLOS + ["RESOURCE_EXHAUSTED"] * 2)
        until_admitted(channel, device_token(mint), "cam1", stop).cancel()
        stop.set()


def test_one_token_may_hold_only_its_grants_part_of_the_waits_for_a_hello(grpc_port, mint):
    """A device's token for one device may wait with as many streams as that device may have
    channels (4), a token for every device with half of them (threads.grant_share): one token
    (a device's, leaked, say) cannot keep every other device from connecting."""
    stop = threading.Event()
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        every_device = mint(devices=["*"], scope="gallery:device")
        held = silent_connect(channel, every_device, stop)  # HELLOS // 2: its whole part
        time.sleep(0.5)
        with pytest.raises(grpc.RpcError) as refused:
            next(silent_connect(channel, every_device, stop))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert rich_error(refused.value)[0].reason == "TOO_MANY_CONNECTIONS"
        assert "at most 1 for this token" in refused.value.details()
        # Another token still has a place, and then says its hello.
        hello_channel(channel, device_token(mint, ["cam7"]), "cam7", stop).cancel()
        stop.set()
        held.cancel()


def test_a_device_replaces_its_oldest_channel_on_a_full_server(grpc_port, mint):
    """The server holds as many channels as it may, four of them one device's: that device's
    fifth still replaces its oldest (one in, one out), where another's first is refused."""
    stop, streams = threading.Event(), []
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        try:
            for _ in range(4):
                streams.append(hello_channel(channel, device_token(mint), "cam1", stop))
            for n in range(CHANNELS - 4):  # full now
                streams.append(hello_channel(channel, device_token(mint), f"cam{n + 10}", stop))
            with pytest.raises(grpc.RpcError) as refused:
                hello_channel(channel, device_token(mint), "cam3", stop)
            assert rich_error(refused.value)[0].reason == "TOO_MANY_CONNECTIONS"
            streams.append(hello_channel(channel, device_token(mint), "cam1", stop))
        finally:
            stop.set()
            for stream in streams:
                stream.cancel()


def test_channels_in_all_are_bounded(grpc_port, mint):
    """Past its share of the threads on a server (half of what uploads leave), one more channel is
    refused (429), so a token for many devices cannot take every thread either; its place comes
    back when one ends."""
    stop, streams = threading.Event(), []
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        try:
            for n in range(CHANNELS):
                streams.append(hello_channel(channel, device_token(mint), f"cam{n}", stop))
            with pytest.raises(grpc.RpcError) as refused:
                hello_channel(channel, device_token(mint), "one-more", stop)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert rich_error(refused.value)[0].reason == "TOO_MANY_CONNECTIONS"
            streams.pop().cancel()
            streams.append(until_admitted(channel, device_token(mint), "one-more", stop))
        finally:
            stop.set()
            for stream in streams:
                stream.cancel()


def test_a_devices_agent_is_logged_cut_short(grpc_port, mint, caplog):
    """A hello's free-form agent is the device's to write: megabytes of it, on every reconnect,
    would fill the log volume."""
    stop = threading.Event()

    def requests():
        yield dpb.ConnectRequest(hello=dpb.DeviceHello(device="cam1", agent="cam-agent/1.0 " + "Z" * 1_000_000))
        stop.wait(30)

    with caplog.at_level("INFO", logger="gallery_server"), grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stream = device_pb2_grpc.DeviceServiceStub(channel).Connect(
            requests(), metadata=device_token(mint, ["cam1"]), timeout=30)
        assert next(stream).HasField("heartbeat")
        stop.set()
        stream.cancel()
    (connected,) = [r for r in caplog.records if r.getMessage() == "device connected"]
    assert connected.agent == "cam-agent/1.0 " + "Z" * 186 + "..."  # type: ignore[attr-defined]
