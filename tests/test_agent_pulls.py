"""The device agent against an in-process server (port 0): announcing many files, files the
server refuses, and pulls arriving faster than the server takes a device's uploads."""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import signal
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest

from gallery.v1 import gallery_pb2 as gpb
from gallery.v1 import gallery_pb2_grpc
from gallery_server import agent
from gallery_server.settings import Settings

from .conftest import JWT_SECRET, make_settings, random_bytes
from .silent_network import SilentNetworkProxy

DEVICE = "cam1"
UPLOAD_LIMIT = 1 << 20  # the server's GALLERY_MAX_UPLOAD_BYTES in these tests
THUMBNAIL_LIMIT = 64 << 10  # and its GALLERY_MAX_THUMBNAIL_BYTES


@pytest.fixture
def server_limits() -> dict[str, object]:
    """Settings a test changes by parametrizing this fixture."""
    return {}


@pytest.fixture
def settings(tmp_path: pathlib.Path, server_limits: dict[str, object]) -> Settings:
    # SQLite only: the agent is what is tested here (tests/unit/test_devices.py runs the server's
    # announcements and pulls on both databases).
    data = tmp_path / "data"
    data.mkdir()
    limits = {"max_upload_bytes": UPLOAD_LIMIT, "max_thumbnail_bytes": THUMBNAIL_LIMIT, **server_limits}
    return make_settings(data, **limits)


@pytest.fixture
def folder(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "media"
    path.mkdir()
    return path


@pytest.fixture
def make_agent(grpc_port: int, mint: Callable[..., str], folder: pathlib.Path) -> Iterator[Callable[..., agent.Agent]]:
    """make_agent(token=..., max_rate=...) -> an Agent of DEVICE on `folder`, closed afterwards."""
    made: list[agent.Agent] = []

    def _make(token: str = "", **options: float) -> agent.Agent:
        a = agent.Agent(device=DEVICE, root=folder, server=f"127.0.0.1:{grpc_port}",
                        token=token or mint(devices=[DEVICE], scope="gallery:device"), **options)
        made.append(a)
        return a

    yield _make
    for a in made:
        a.stop.set()
        a._channel.close()


@pytest.fixture
def gallery_stub(grpc_port: int) -> Iterator[gallery_pb2_grpc.GalleryServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        yield gallery_pb2_grpc.GalleryServiceStub(channel)


@pytest.fixture
def user(mint: Callable[..., str]) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {mint(devices=[DEVICE])}")]


def files(folder: pathlib.Path) -> list[agent.FileInfo]:
    return sorted(agent.list_files(folder).values(), key=lambda f: f.key)


def listed(stub: gallery_pb2_grpc.GalleryServiceStub, user: list[tuple[str, str]]) -> dict[str, gpb.Event]:
    """The device's events by name, as a client lists them."""
    events = stub.ListEvents(gpb.ListEventsRequest(device=DEVICE, limit=1000), metadata=user)
    return {e.name: e for e in events}


def calls_to_announce(monkeypatch: pytest.MonkeyPatch, a: agent.Agent) -> list[list[str]]:
    """The device_keys of every AnnounceEvents call the agent makes from now on, call by call."""
    sent: list[list[str]] = []
    real = a._devices.AnnounceEvents

    def counting(request, **kwargs):  # type: ignore[no-untyped-def]
        sent.append([e.device_key for e in request.events])
        return real(request, **kwargs)

    monkeypatch.setattr(a._devices, "AnnounceEvents", counting)
    return sent


def thumbnail_as_large_as_the_file(path: pathlib.Path) -> bytes:
    """A stand-in for make_thumbnail whose output size the test sets through the file's size."""
    return os.urandom(path.stat().st_size)


# -- announcing -----------------------------------------------------------------------------------


def test_500_photos_with_their_thumbnails_are_all_announced(
    make_agent, folder, gallery_stub, user, monkeypatch
):
    """500 thumbnails of 20 KiB are over the server's 8 MiB message limit in one call."""
    monkeypatch.setattr(agent, "make_thumbnail", thumbnail_as_large_as_the_file)
    names = {f"p{n:03}.jpg" for n in range(500)}
    for name in names:
        (folder / name).write_bytes(b"j" * (20 << 10))

    make_agent().announce(files(folder))

    events = listed(gallery_stub, user)
    assert set(events) == names
    assert all(e.has_thumbnail for e in events.values())


@pytest.mark.parametrize(("bad_name", "bad_size", "reason"), [
    ("big.mp4", UPLOAD_LIMIT + 1, "INVALID_SIZE"),  # INVALID_ARGUMENT
    ("big.jpg", THUMBNAIL_LIMIT + 1, "THUMBNAIL_TOO_LARGE"),  # RESOURCE_EXHAUSTED, not for capacity
])
def test_a_file_the_server_refuses_leaves_the_others_announced_and_is_not_sent_again(
    make_agent, folder, gallery_stub, user, monkeypatch, caplog, bad_name, bad_size, reason
):
    monkeypatch.setattr(agent, "make_thumbnail", thumbnail_as_large_as_the_file)
    good = {f"{c}.jpg" for c in "acdefghi"}
    for name in good:
        (folder / name).write_bytes(b"small")
    bad = folder / bad_name
    bad.write_bytes(b"\0" * bad_size)
    a = make_agent()
    sent = calls_to_announce(monkeypatch, a)

    with caplog.at_level(logging.INFO, logger="gallery.agent"):
        a.announce(files(folder))
        assert set(listed(gallery_stub, user)) == good
        # Scanned again, unchanged: the server is not asked about the refused file again.
        sent.clear()
        a.announce(files(folder))
        assert sent and not any(bad_name in keys for keys in sent)
    refusals = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(refusals) == 1 and bad_name in refusals[0] and reason in refusals[0], refusals

    # After a reconnect the server may have new limits: everything is tried again.
    a.forget_announced()
    sent.clear()
    a.announce(files(folder))
    assert any(bad_name in keys for keys in sent)

    # Changed, it is tried again (and now taken).
    bad.write_bytes(b"smaller now")
    sent.clear()
    a.announce(files(folder))
    assert any(bad_name in keys for keys in sent)
    assert set(listed(gallery_stub, user)) == good | {bad_name}


@pytest.mark.parametrize(("token", "code"), [
    ({"devices": ["another-device"], "scope": "gallery:device"}, grpc.StatusCode.PERMISSION_DENIED),
    ({"devices": [DEVICE], "scope": "gallery:read"}, grpc.StatusCode.PERMISSION_DENIED),
    ({"devices": [DEVICE], "scope": "gallery:device", "secret": JWT_SECRET[::-1]},
     grpc.StatusCode.UNAUTHENTICATED),
], ids=["another-device", "read-scope", "bad-signature"])
def test_a_token_the_server_refuses_fails_the_announcement_without_blaming_the_files(
    make_agent, folder, mint, monkeypatch, token, code
):
    for name in ("a.mp4", "b.mp4", "c.mp4"):
        (folder / name).write_bytes(b"clip")
    a = make_agent(token=mint(**token))
    sent = calls_to_announce(monkeypatch, a)

    for _ in range(2):
        with pytest.raises(grpc.RpcError) as caught:
            a.announce(files(folder))
        assert caught.value.code() == code

    # One call each time, with every file: not halved, and nothing left out the second time.
    assert sent == [["a.mp4", "b.mp4", "c.mp4"]] * 2


@pytest.mark.parametrize("token", [
    {"devices": ["another-device"], "scope": "gallery:device"},
    {"devices": [DEVICE], "scope": "gallery:device", "ttl": -60},  # expired
], ids=["another-device", "expired"])
def test_an_agent_the_server_refuses_stops_with_status_2(make_agent, folder, mint, token, caplog):
    """Retrying cannot mend a refused token, and an agent that retried it for ever looked alive
    to whatever ran it: it stops, so that its supervisor sees it and starts it with a new one."""
    (folder / "a.mp4").write_bytes(b"clip")
    a = make_agent(token=mint(**token), scan_interval=0.05)
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    give_up = threading.Timer(20, a.stop.set)  # run() would otherwise retry for ever
    give_up.start()
    try:
        status = a.run()  # on the main thread: it sets signal handlers
    finally:
        give_up.cancel()
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    assert status == 2
    assert any("the server refuses this agent" in r.getMessage() for r in caplog.records)


# -- pulls ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def channel_open(a: agent.Agent) -> Iterator[None]:
    """The agent's command channel (and so its uploads) running, as `run()` runs it."""
    thread = threading.Thread(target=a._channel_loop, name="channel", daemon=True)
    thread.start()
    try:
        yield
    finally:
        a.stop.set()
        if a._call is not None:
            a._call.cancel()
        for t in [thread, *a._upload_threads]:
            t.join(timeout=10)


def pull_all(stub, user, events: list[gpb.Event], timeout: float) -> dict[str, str]:
    """Pulls every event at once; the state each pull ended in, by event name."""
    for event in events:
        stub.PullEvent(gpb.PullEventRequest(device=DEVICE, event_id=event.id), metadata=user)
    deadline = time.monotonic() + timeout
    while True:
        pulls = {e.name: stub.GetEvent(gpb.GetEventRequest(device=DEVICE, event_id=e.id), metadata=user).pull
                 for e in events}
        if all(p.state in ("completed", "failed", "expired") for p in pulls.values()) or (
                time.monotonic() > deadline):
            break
        time.sleep(0.2)
    listed = list(stub.ListEvents(gpb.ListEventsRequest(device=DEVICE, limit=1000), metadata=user))
    assert listed and not any(e.HasField("pull") for e in listed)  # GetEvent's alone (Event.pull)
    return {name: p.state + (f" ({p.error})" if p.error else "") for name, p in pulls.items()}


def clips(folder: pathlib.Path, count: int, size: int) -> set[str]:
    names = {f"clip{n}.mov" for n in range(count)}
    for name in names:
        (folder / name).write_bytes(random_bytes(size))
    return names


def pulled_at_once(make_agent, folder, gallery_stub, user, count: int) -> tuple[set[str], dict[str, str]]:
    """`count` clips announced by an agent on a modest uplink (each upload takes 1 s), then all
    pulled at once: their names, and the state each pull ended in."""
    names = clips(folder, count, 128 << 10)
    a = make_agent(max_rate=128 << 10)
    a.announce(files(folder))
    events = list(listed(gallery_stub, user).values())
    with channel_open(a):
        return names, pull_all(gallery_stub, user, events, timeout=18)


def test_six_pulls_at_once_all_complete(make_agent, folder, gallery_stub, user):
    """More pulls at once than the server takes uploads of one device (4): the rest wait."""
    names, states = pulled_at_once(make_agent, folder, gallery_stub, user, 6)
    assert states == dict.fromkeys(names, "completed")
    assert {e.state for e in listed(gallery_stub, user).values()} == {"stored"}


@pytest.mark.parametrize("server_limits", [{"max_uploads_per_device": 1}], ids=["1-upload-per-device"])
def test_an_upload_the_server_has_no_slot_for_is_retried(make_agent, folder, gallery_stub, user):
    """A server taking fewer uploads at once than the agent sends: TOO_MANY_DEVICE_UPLOADS is
    "retry later", not a failure."""
    names, states = pulled_at_once(make_agent, folder, gallery_stub, user, 2)
    assert states == dict.fromkeys(names, "completed")


@pytest.mark.parametrize("server_limits", [{"keepalive_seconds": 0.5}], ids=["keepalive-0.5s"])
def test_an_agent_whose_connection_went_silent_connects_anew(
    grpc_port, mint, folder, gallery_stub, user, monkeypatch
):
    """The agent's connection goes silent (no FIN, no RST), as when a device roams. Its channel
    hears no heartbeat and is dropped; the agent must then connect anew: grpc would send the new
    channel into the same dead connection until the kernel gave up on it."""
    monkeypatch.setattr(agent, "CHANNEL_SILENCE_S", 3.0)
    proxy = SilentNetworkProxy(grpc_port)
    names = clips(folder, 1, 64 << 10)
    a = agent.Agent(device=DEVICE, root=folder, server=f"127.0.0.1:{proxy.port}",
                    token=mint(devices=[DEVICE], scope="gallery:device"))
    try:
        a.announce(files(folder))
        events = list(listed(gallery_stub, user).values())
        with channel_open(a):
            deadline = time.monotonic() + 10
            while a._outbox is None:  # the channel is open, through the proxy
                assert time.monotonic() < deadline, "the channel never opened"
                time.sleep(0.05)
            proxy.go_silent()
            # The silence: 3 s without a heartbeat, then a new connection; the server lets the
            # old one go after its PING is left unanswered (0.5 s, then 3 s) and hands it the pull.
            states = pull_all(gallery_stub, user, events, timeout=30)
        assert states == dict.fromkeys(names, "completed")
        assert proxy.connections >= 2
    finally:
        a._channel.close()
        proxy.close()


def test_a_replaced_connection_is_a_new_one(grpc_port, mint, folder):
    """grpc shares a connection between channels of one target: the agent's new channel must
    open a connection of its own, or it would take the silent one's."""
    proxy = SilentNetworkProxy(grpc_port)
    clips(folder, 1, 1 << 10)
    a = agent.Agent(device=DEVICE, root=folder, server=f"127.0.0.1:{proxy.port}",
                    token=mint(devices=[DEVICE], scope="gallery:device"))
    try:
        a.announce(files(folder))
        assert proxy.connections == 1
        a._replace_connection()
        a.forget_announced()
        a.announce(files(folder))
        assert proxy.connections == 2
    finally:
        a._channel.close()
        proxy.close()
