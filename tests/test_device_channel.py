"""DeviceService on an in-process server (port 0): the channel's edge cases."""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from gallery.v1 import device_pb2 as dpb
from gallery.v1 import device_pb2_grpc, gallery_pb2, gallery_pb2_grpc
from gallery_server import auth
from gallery_server.devices import MAX_CONNECTIONS_PER_DEVICE, MAX_PULL_WAITS_PER_DEVICE

from .conftest import JWT_SECRET, rich_error


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


def test_a_second_hello_ends_the_channel_with_invalid_argument(channel, mint):
    """`hello` is first and only first: a second one (here naming another device) is not ignored."""
    sent = threading.Event()

    def requests():
        yield dpb.ConnectRequest(hello=dpb.DeviceHello(device="cam1"))
        yield dpb.ConnectRequest()  # empty: ignored
        yield dpb.ConnectRequest(hello=dpb.DeviceHello(device="cam2"))
        sent.wait(10)

    stream = device_pb2_grpc.DeviceServiceStub(channel).Connect(requests(), metadata=device_auth(mint), timeout=20)
    with pytest.raises(grpc.RpcError) as caught:
        for _ in stream:
            pass
    sent.set()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value
    assert rich_error(caught.value)[0].reason == "HELLO_REPEATED"


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


# Threads and timers of the channel, not the database: SQLite only.
SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def announce_one(channel, mint, content: bytes, key: str = "a.mp4") -> str:
    [result] = device_pb2_grpc.DeviceServiceStub(channel).AnnounceEvents(
        dpb.AnnounceEventsRequest(device="cam1", events=[dpb.AnnouncedEvent(
            device_key=key, name=key, size=len(content), sha256=hashlib.sha256(content).hexdigest())]),
        metadata=device_auth(mint)).results
    return result.event_id


def test_a_pulled_upload_cannot_declare_another_sha256_than_announced(channel, mint):
    """The announced sha256 binds the pulled content: a header naming the sha256 of other bytes
    is refused before any byte, not obeyed."""
    event_id = announce_one(channel, mint, b"the real capture")
    other = b"different bytes, not the announced capture"

    def upload():
        yield gallery_pb2.UploadEventRequest(header=gallery_pb2.UploadHeader(
            device="cam1", event_id=event_id, sha256=hashlib.sha256(other).hexdigest()))
        yield gallery_pb2.UploadEventRequest(media_chunk=other)
        yield gallery_pb2.UploadEventRequest(finish=gallery_pb2.UploadFinish())

    gallery = gallery_pb2_grpc.GalleryServiceStub(channel)
    with pytest.raises(grpc.RpcError) as refused:
        gallery.UploadEvent(upload(), metadata=device_auth(mint), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rich_error(refused.value)[0].reason == "SHA256_MISMATCH"
    user = [("authorization", f"Bearer {mint(devices=['cam1'])}")]
    event = gallery.GetEvent(gallery_pb2.GetEventRequest(device="cam1", event_id=event_id), metadata=user)
    assert (event.state, event.sha256) == ("on_device", hashlib.sha256(b"the real capture").hexdigest())


def test_a_pulled_upload_must_have_the_announced_size(channel, mint):
    """Without a sha256, the announced size is what tells the capture from new content under its
    name (a loop recording rewritten since): other bytes are refused, not stored in its event."""
    capture = b"x" * 5000
    [announced] = device_pb2_grpc.DeviceServiceStub(channel).AnnounceEvents(
        dpb.AnnounceEventsRequest(device="cam1", events=[dpb.AnnouncedEvent(
            device_key="loop/FILE0001.MP4", name="FILE0001.MP4", size=len(capture))]),
        metadata=device_auth(mint)).results
    gallery = gallery_pb2_grpc.GalleryServiceStub(channel)

    def upload(content: bytes, **header):
        yield gallery_pb2.UploadEventRequest(header=gallery_pb2.UploadHeader(
            device="cam1", event_id=announced.event_id, **header))
        yield gallery_pb2.UploadEventRequest(media_chunk=content)
        yield gallery_pb2.UploadEventRequest(finish=gallery_pb2.UploadFinish())

    for content, header in ((b"only ten b", {}), (b"only ten b", {"size": 10}), (capture + b"!", {})):
        with pytest.raises(grpc.RpcError) as refused:
            gallery.UploadEvent(upload(content, **header), metadata=device_auth(mint), timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, header
        assert rich_error(refused.value)[0].reason == "SIZE_MISMATCH", header
    user = [("authorization", f"Bearer {mint(devices=['cam1'])}")]
    event = gallery.GetEvent(gallery_pb2.GetEventRequest(device="cam1", event_id=announced.event_id), metadata=user)
    assert (event.state, event.size) == ("on_device", len(capture))
    stored = gallery.UploadEvent(upload(capture), metadata=device_auth(mint), timeout=10)
    assert stored.event_id == announced.event_id
    event = gallery.GetEvent(gallery_pb2.GetEventRequest(device="cam1", event_id=announced.event_id), metadata=user)
    assert (event.state, event.size, event.sha256) == ("stored", len(capture), hashlib.sha256(capture).hexdigest())


def test_a_pulled_upload_takes_no_device_event_id(channel, mint):
    """It would be dropped (the announced row is filled), and a retry naming it made a second event."""
    event_id = announce_one(channel, mint, b"capture", key="dei.jpg")

    def upload():
        yield gallery_pb2.UploadEventRequest(header=gallery_pb2.UploadHeader(
            device="cam1", event_id=event_id, device_event_id="DEI-2"))
        yield gallery_pb2.UploadEventRequest(media_chunk=b"capture")
        yield gallery_pb2.UploadEventRequest(finish=gallery_pb2.UploadFinish())

    with pytest.raises(grpc.RpcError) as refused:
        gallery_pb2_grpc.GalleryServiceStub(channel).UploadEvent(upload(), metadata=device_auth(mint), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rich_error(refused.value)[0].reason == "DEVICE_EVENT_ID_WITH_EVENT_ID"


def open_channel(channel, token, stop: threading.Event, device: str = "cam1"):
    def requests():
        yield dpb.ConnectRequest(hello=dpb.DeviceHello(device=device))
        stop.wait(30)

    return device_pb2_grpc.DeviceServiceStub(channel).Connect(
        requests(), metadata=[("authorization", f"Bearer {token}")], timeout=30)


@SQLITE_ONLY
def test_a_device_holds_at_most_a_few_channels_and_the_newest_wins(channel, mint):
    """Each channel holds a server thread: one device token opening channel after channel took
    every thread, and uploads and deletes of all devices waited. A device's fifth channel replaces
    its oldest (after a network change the newest is the live one), which ends."""
    token, stop = mint(devices=["cam1"], scope="gallery:device"), threading.Event()
    streams = []
    try:
        for _ in range(MAX_CONNECTIONS_PER_DEVICE):  # one after the other: their order is known
            streams.append(open_channel(channel, token, stop))
            assert next(streams[-1]).HasField("heartbeat")
        newest = open_channel(channel, token, stop)
        assert next(newest).HasField("heartbeat")
        oldest = streams.pop(0)
        ended = threading.Event()

        def drain() -> None:
            with contextlib.suppress(grpc.RpcError):
                for _ in oldest:
                    pass
            ended.set()

        threading.Thread(target=drain, daemon=True).start()
        assert ended.wait(10), "the oldest channel was not ended"
        assert all(stream.is_active() for stream in streams)  # the others go on
        streams.append(newest)
    finally:
        stop.set()
        for stream in streams:
            stream.cancel()


@SQLITE_ONLY
def test_a_channel_ends_when_its_token_expires(channel, mint):
    """A channel opened with a token that expires 3 - 4 s later (PyJWT's 30 s leeway included;
    mint cuts the time to whole seconds) ends then with UNAUTHENTICATED TOKEN_EXPIRED: letting a
    device's token expire cuts it off."""
    token = auth.mint(JWT_SECRET, subject="cam1", devices=["cam1"], scope="gallery:device",
                      ttl_seconds=4 - auth.LEEWAY_SECONDS)
    stop = threading.Event()
    stream = open_channel(channel, token, stop)
    started = time.monotonic()
    try:
        with pytest.raises(grpc.RpcError) as ended:
            for _ in stream:
                pass
        assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert rich_error(ended.value)[0].reason == "TOKEN_EXPIRED"
        assert 1 < time.monotonic() - started < 15
    finally:
        stop.set()


@SQLITE_ONLY
def test_pull_waits_are_bounded_and_end_with_their_client(channel, mint):
    """A waiting pull holds a server thread: past a device's few waits, a pull with wait is 429
    TOO_MANY_PULL_WAITS (retry later, or pull without wait), and a wait whose client went away
    stops waiting, which frees its place."""
    event_id = announce_one(channel, mint, b"content")
    user = [("authorization", f"Bearer {mint(devices=['cam1'])}")]
    gallery = gallery_pb2_grpc.GalleryServiceStub(channel)
    pull = gallery_pb2.PullEventRequest(device="cam1", event_id=event_id, wait=30)
    waits = [gallery.PullEvent.future(pull, metadata=user, timeout=3) for _ in range(MAX_PULL_WAITS_PER_DEVICE)]

    def refused() -> bool:
        try:
            gallery.PullEvent(pull, metadata=user, timeout=1)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return False  # let in to wait: not all the waits above had started
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert rich_error(error)[0].reason == "TOO_MANY_PULL_WAITS"
            return True
        return False

    deadline = time.monotonic() + 10
    while not refused():  # until the waits above have all started
        assert time.monotonic() < deadline, "a fifth wait was never refused"
    # Without wait, a pull is answered as ever.
    assert gallery.PullEvent(gallery_pb2.PullEventRequest(device="cam1", event_id=event_id),
                             metadata=user, timeout=10).pull.state == "pending"
    for wait in waits:  # their clients give up after 3 s ...
        with pytest.raises(grpc.RpcError):
            wait.result()
    deadline = time.monotonic() + 10
    while True:  # ... and the server notices: a wait is let in again, and it waits
        started = time.monotonic()
        try:
            gallery.PullEvent(gallery_pb2.PullEventRequest(device="cam1", event_id=event_id, wait=1),
                              metadata=user, timeout=10)
            assert time.monotonic() - started >= 0.9
            break
        except grpc.RpcError as error:
            assert rich_error(error)[0].reason == "TOO_MANY_PULL_WAITS"
            assert time.monotonic() < deadline, "the waits of gone clients never ended"
            time.sleep(0.2)


def test_reports_while_the_database_is_away_write_no_error_each(caplog: pytest.LogCaptureFixture) -> None:
    """Every connected device reports its progress a second apart while it uploads: during an
    outage each report wrote an ERROR with its traceback, past db.py's one line a minute."""
    import logging
    import types

    from gallery_server.errors import DatabaseUnavailable
    from gallery_server.rpc.device_servicer import DeviceServicer

    def away(*args: object) -> None:
        raise DatabaseUnavailable()

    servicer = DeviceServicer.__new__(DeviceServicer)
    servicer.devices = types.SimpleNamespace(acknowledge=away, progress=away, fail=away)  # type: ignore[assignment]
    closed: list[bool] = []
    channel = types.SimpleNamespace(device="cam1", close=lambda: closed.append(True))
    reports = [dpb.ConnectRequest(progress=dpb.CommandProgress(command_id="c1", bytes_sent=n)) for n in range(50)]
    reports.append(dpb.ConnectRequest(ack=dpb.CommandAck(command_id="c1")))
    failure: list = []
    with caplog.at_level(logging.DEBUG, logger="gallery_server.rpc.device_servicer"):
        servicer._read_replies(iter(reports), channel, failure)  # type: ignore[arg-type]
    assert (failure, closed) == ([], [])  # the channel stays: the device sends its next reports
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len([r for r in caplog.records if "database is unavailable" in r.getMessage()]) == 51
