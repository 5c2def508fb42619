"""Listing pages kept by a replica (server/gallery_server/listing.py, PageCache) through the real
stack: two replicas on one PostgreSQL behind one real Envoy. A page one replica keeps shows at once
what the other wrote, asked for natively from that replica or through Envoy from either; and a
page's ETag from one is answered 304 by either while the page is unchanged."""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable

import grpc
import httpx
import sqlalchemy as sa

from gallery.v1 import gallery_pb2 as pb
from gallery.v1 import gallery_pb2_grpc
from gallery_server.models import Event

from .test_crash import native_upload
from .test_failover import replicated  # noqa: F401 - the fixture
from .test_resumable_cuts import Server

DEVICE = "kept-cam"


def test_a_page_kept_by_one_replica_shows_what_another_wrote(
    replicated: tuple[list[Server], str, int], mint: Callable[..., str], postgres_url: str,  # noqa: F811
) -> None:
    replicas, base_url, _ = replicated
    token = mint(devices=[DEVICE])
    metadata = (("authorization", f"Bearer {token}"),)
    channels = [grpc.insecure_channel(replica.address) for replica in replicas]
    reader, writer = (gallery_pb2_grpc.GalleryServiceStub(channel) for channel in channels)

    def listed() -> list[str]:
        page = reader.ListEventsJson(pb.ListEventsRequest(device=DEVICE), metadata=metadata, timeout=10)
        return [event["id"] for event in json.loads(page.data)]

    unseen = "evt_" + "u" * 22
    try:
        first = native_upload(writer, metadata, DEVICE, b"first")
        assert listed() == listed() == [first]

        # Written with the triggers off (a tool may): the reader's kept page does not see it, which
        # shows that the page was kept, until the next write that raises the version.
        engine = sa.create_engine(postgres_url)
        try:
            with engine.begin() as c:
                c.exec_driver_sql("SET LOCAL session_replication_role = replica")
                c.execute(Event.__table__.insert(), {  # type: ignore[attr-defined]
                    "id": unseen, "device": DEVICE, "name": "unseen.bin", "media_type": "other",
                    "mime_type": "application/octet-stream", "size": 1, "sha256": "0" * 64,
                    "has_thumbnail": False, "metadata_json": "{}", "state": "stored", "thumbnail_state": "",
                    "thumbnail_attempts": 0, "media_info_json": "",
                    "created": datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1),
                })
        finally:
            engine.dispose()
        assert listed() == [first]

        second = native_upload(writer, metadata, DEVICE, b"second")
        assert listed() == [second, first, unseen]
        writer.DeleteEvent(pb.DeleteEventRequest(device=DEVICE, event_id=first), metadata=metadata, timeout=10)
        assert listed() == [second, unseen]

        # Through Envoy, which spreads the calls over both replicas: each answers the same.
        with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=10) as http:
            for _ in range(6):
                r = http.get(f"/api/gallery/{DEVICE}/events")
                assert r.status_code == 200 and [e["id"] for e in r.json()] == [second, unseen]
            # A page's ETag is its device's version, which both replicas read: either answers 304.
            tag = r.headers["etag"]
            for _ in range(6):
                assert http.get(f"/api/gallery/{DEVICE}/events", headers={"If-None-Match": tag}).status_code == 304
            third = http.post(f"/api/gallery/{DEVICE}/upload", data={"name": "third.bin"},
                              files={"event": ("third.bin", b"third")}).json()["eventId"]
            for _ in range(6):
                r = http.get(f"/api/gallery/{DEVICE}/events", headers={"If-None-Match": tag})
                assert r.status_code == 200 and [e["id"] for e in r.json()][:2] == [third, second]
        assert listed()[:2] == [third, second]
    finally:
        for channel in channels:
            channel.close()

