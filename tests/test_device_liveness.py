"""A device whose network went away without a word: its commands reach its next connection.

The old connection's handler would otherwise go on refreshing its heartbeat row, holding the
command it had claimed until TCP gave up (~15 min) or the pull expired."""

from __future__ import annotations

import pathlib
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
import sqlalchemy as sa

from gallery.v1 import device_pb2 as dpb
from gallery.v1 import device_pb2_grpc, gallery_pb2, gallery_pb2_grpc
from gallery_server.db import Database
from gallery_server.models import DeviceConnection

from .conftest import make_settings
from .silent_network import SilentNetworkProxy


@pytest.fixture
def settings(tmp_path: pathlib.Path, request: pytest.FixtureRequest):
    # SQLite only: what is tested here is the channel's threads and timers, not the database.
    data = tmp_path / "data"
    data.mkdir()
    return make_settings(data, keepalive_seconds=getattr(request, "param", 0.5))


def first_command(stream: Iterator[dpb.ConnectResponse], timeout: float) -> list[dpb.Command]:
    got: list[dpb.Command] = []

    def read() -> None:
        try:
            for message in stream:
                if message.HasField("command"):
                    got.append(message.command)
                    return
        except grpc.RpcError:
            pass

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    return got


def connections(database_url: str) -> int:
    db = Database(database_url, pool_size=1)
    try:
        with db.session() as session:
            return session.exec(sa.select(sa.func.count()).select_from(DeviceConnection)).one()[0]
    finally:
        db.dispose()


def test_a_command_held_by_a_silent_connection_reaches_the_next_one(grpc_port, mint, settings):
    device = [("authorization", f"Bearer {mint(devices=['cam1'], scope='gallery:device')}")]
    user = [("authorization", f"Bearer {mint(devices=['cam1'])}")]
    proxy = SilentNetworkProxy(grpc_port)
    stop = threading.Event()

    def requests() -> Iterator[dpb.ConnectRequest]:
        yield dpb.ConnectRequest(hello=dpb.DeviceHello(device="cam1"))
        stop.wait(60)

    old_channel = grpc.insecure_channel(f"127.0.0.1:{proxy.port}")
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    try:
        [announced] = device_pb2_grpc.DeviceServiceStub(channel).AnnounceEvents(
            dpb.AnnounceEventsRequest(device="cam1", events=[
                dpb.AnnouncedEvent(device_key="a.mp4", name="a.mp4", size=3)]),
            metadata=device).results
        old = device_pb2_grpc.DeviceServiceStub(old_channel).Connect(requests(), metadata=device)
        assert next(old).HasField("heartbeat")  # the old connection is open
        proxy.go_silent()  # ... and its network is gone: no FIN, no RST
        gallery = gallery_pb2_grpc.GalleryServiceStub(channel)
        gallery.PullEvent(gallery_pb2.PullEventRequest(device="cam1", event_id=announced.event_id),
                          metadata=user)
        # The only connection takes the command, then sends it into the silence.
        deadline = time.monotonic() + 10
        while gallery.GetEvent(gallery_pb2.GetEventRequest(device="cam1", event_id=announced.event_id),
                               metadata=user).pull.state != "delivered":
            assert time.monotonic() < deadline, "the silent connection never took the command"
            time.sleep(0.1)

        fresh = device_pb2_grpc.DeviceServiceStub(channel).Connect(requests(), metadata=device)
        # An unanswered PING (after 0.5 s, then 3 s for its answer) ends the silent connection's call.
        got = first_command(fresh, timeout=20)
        assert [c.upload_event.event_id for c in got] == [announced.event_id]
        assert connections(settings.database_url) == 1  # the silent one's row is gone
    finally:
        stop.set()
        old_channel.close()
        channel.close()
        proxy.close()


@pytest.mark.parametrize("settings", [4.0], indirect=True)
def test_a_client_pinging_as_often_as_the_server_keeps_its_idle_calls(grpc_port, mint, settings) -> None:
    """A direct client's keepalive every half of GALLERY_KEEPALIVE_SECONDS (10 s by default, a
    common grpc-js setting) on a connection with no data: grpc-core's default policy closed it
    (GOAWAY too_many_pings) after two such PINGs, and the idle call failed RESOURCE_EXHAUSTED."""
    interval_ms = int(settings.keepalive_seconds * 1000 / 2)
    options = [("grpc.keepalive_time_ms", interval_ms), ("grpc.keepalive_permit_without_calls", 1),
               ("grpc.http2.max_pings_without_data", 0)]
    token = mint(devices=["cam1"])
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}", options=options) as channel:
        stub = gallery_pb2_grpc.GalleryServiceStub(channel)
        md = [("authorization", f"Bearer {token}")]

        def upload() -> Iterator[gallery_pb2.UploadEventRequest]:
            yield gallery_pb2.UploadEventRequest(header=gallery_pb2.UploadHeader(device="cam1", name="idle.bin"))
            time.sleep(6 * interval_ms / 1000)  # idle: no data either way while the client pings
            yield gallery_pb2.UploadEventRequest(media_chunk=b"late")
            yield gallery_pb2.UploadEventRequest(finish=gallery_pb2.UploadFinish())

        response = stub.UploadEvent(upload(), metadata=md, timeout=60)
        assert response.success and response.event_id
