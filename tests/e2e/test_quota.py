"""GALLERY_MAX_DEVICE_BYTES through the real Envoy: a device at its quota gets 507 over REST and
RESOURCE_EXHAUSTED natively, reason DEVICE_QUOTA_EXCEEDED with the figures, on every upload path;
other devices and reads are untouched, and a delete makes room at once."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator

import grpc
import httpx
import pytest

from gallery.v1 import admin_pb2, admin_pb2_grpc, device_pb2_grpc, gallery_pb2_grpc
from gallery.v1 import device_pb2 as dpb
from gallery.v1 import gallery_pb2 as pb
from gallery_server import auth

from ..conftest import new_device, random_bytes, rich_error, stored_files
from .conftest import Stack, access_line, running_stack

QUOTA = 3000


@pytest.fixture(scope="module")
def quota_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    env = {"GALLERY_MAKE_THUMBNAILS": "false", "GALLERY_MAX_DEVICE_BYTES": str(QUOTA)}
    with running_stack(tmp_path_factory.mktemp("quota"), env) as stack:
        yield stack


def multipart(http: httpx.Client, headers: dict[str, str], device: str, data: bytes) -> httpx.Response:
    return http.post(f"/api/gallery/{device}/upload", headers=headers,
                     files={"event": ("f.bin", data, "application/octet-stream")}, data={"name": "f.bin"})


def assert_over_quota(r: httpx.Response, device: str, used: int) -> dict[str, str]:
    assert r.status_code == 507, r.text
    body = r.json()
    assert set(body) == {"code", "message", "details"}
    assert body["code"] == 8  # RESOURCE_EXHAUSTED
    [info] = body["details"]
    assert info["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"
    assert info["reason"] == "DEVICE_QUOTA_EXCEEDED"
    metadata = info["metadata"]
    assert set(metadata) == {"device", "quota_bytes", "used_bytes", "size"}
    assert (metadata["device"], metadata["quota_bytes"], metadata["used_bytes"]) == (device, str(QUOTA), str(used))
    assert "GALLERY_MAX_DEVICE_BYTES" in body["message"]
    return metadata


def test_every_upload_path_stops_at_the_quota(quota_stack: Stack, mint: Callable[..., str]) -> None:
    device, other = new_device(), new_device()
    headers = {"Authorization": f"Bearer {mint()}"}
    md = [("authorization", f"Bearer {mint()}")]
    with httpx.Client(base_url=quota_stack.base_url, timeout=60) as http, \
            grpc.insecure_channel(quota_stack.envoy_grpc_address) as channel:
        stub = gallery_pb2_grpc.GalleryServiceStub(channel)
        r = multipart(http, headers, device, random_bytes(2000))
        assert r.status_code == 200, r.text
        first = r.json()["eventId"]
        stored = set(stored_files(quota_stack.data_dir))

        # Multipart: 2,000 more do not fit in the 1,000 left.
        metadata = assert_over_quota(multipart(http, headers, device, random_bytes(2000)), device, 2000)
        assert 1000 < int(metadata["size"]) <= 2000
        # Native, through Envoy: the header's size is refused before any byte.
        def parts() -> Iterator[pb.UploadEventRequest]:
            yield pb.UploadEventRequest(header=pb.UploadHeader(device=device, name="n.bin", size=1001))
            yield pb.UploadEventRequest(media_chunk=random_bytes(1001))
            yield pb.UploadEventRequest(finish=pb.UploadFinish())
        with pytest.raises(grpc.RpcError) as refused:
            stub.UploadEvent(parts(), metadata=md, timeout=30)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        info = rich_error(refused.value)[0]
        assert info.reason == "DEVICE_QUOTA_EXCEEDED"
        assert (info.metadata["size"], info.metadata["used_bytes"]) == ("1001", "2000")
        # A native resumable session that declares more than the room.
        with pytest.raises(grpc.RpcError) as no_session:
            stub.StartUpload(pb.StartUploadRequest(device=device, name="s.bin", size=1001), metadata=md)
        assert rich_error(no_session.value)[0].reason == "DEVICE_QUOTA_EXCEEDED"
        # A pre-signed PUT, by its Content-Length, and a pre-signed range PUT past the room.
        urls = http.get(f"/api/gallery/{device}/upload-url?filename=p.bin&thumbnail=true", headers=headers).json()
        path = httpx.URL(urls["upload_url"]).path
        assert_over_quota(http.put(path, content=random_bytes(1001)), device, 2000)
        assert_over_quota(http.put(path, content=random_bytes(1001),
                                   headers={"Content-Range": "bytes 0-1000/1001"}), device, 2000)
        assert set(stored_files(quota_stack.data_dir)) == stored  # nothing refused was kept

        # What fits is stored, to the byte; then the device is full, and every path says so at once.
        r = http.put(path, content=random_bytes(1000))
        assert r.status_code == 200, r.text
        # The thumbnails a device sends count: the event's own is refused at the quota, and the
        # event keeps none.
        assert_over_quota(http.put(httpx.URL(urls["thumbnail_upload_url"]).path, content=random_bytes(5000)),
                          device, QUOTA)
        assert http.get(f"/api/gallery/{device}/events/{urls['eventId']}", headers=headers).json()[
            "has_thumbnail"] is False
        assert_over_quota(multipart(http, headers, device, b"x"), device, QUOTA)
        stats = http.get(f"/api/gallery/{device}/stats", headers=headers).json()
        assert (stats["total_events"], stats["total_size"]) == (2, QUOTA)
        assert http.get(f"/api/gallery/{device}/events/{first}/content", headers=headers).status_code == 200
        assert multipart(http, headers, other, random_bytes(2000)).status_code == 200  # a quota each

        # A delete makes room at once.
        assert http.delete(f"/api/gallery/{device}/events/{first}", headers=headers).status_code == 200
        assert multipart(http, headers, device, random_bytes(2000)).status_code == 200


def test_a_retry_of_the_capture_that_filled_the_quota_is_answered_with_its_event(
    quota_stack: Stack, mint: Callable[..., str],
) -> None:
    """The upload that filled the quota lost its answer; its device sends it again under its
    device_event_id, natively or by form (the id's field before the file's, as the device knows
    it first): the stored event is the answer, and nothing more is stored."""
    device = new_device()
    headers = {"Authorization": f"Bearer {mint()}"}
    md = [("authorization", f"Bearer {mint()}")]
    data = random_bytes(QUOTA)
    fields = {"name": "cap.bin", "device_event_id": "DCIM/0042"}
    with httpx.Client(base_url=quota_stack.base_url, timeout=60) as http, \
            grpc.insecure_channel(quota_stack.envoy_grpc_address) as channel:
        r = http.post(f"/api/gallery/{device}/upload", headers=headers, data=fields,
                      files={"event": ("cap.bin", data, "application/octet-stream")})
        assert r.status_code == 200, r.text
        first = r.json()["eventId"]
        stored = set(stored_files(quota_stack.data_dir))
        r = http.post(f"/api/gallery/{device}/upload", headers=headers, data=fields,
                      files={"event": ("cap.bin", data, "application/octet-stream")})
        assert (r.status_code, r.json()) == (200, {"success": True, "eventId": first})

        def parts(size: int | None) -> Iterator[pb.UploadEventRequest]:
            yield pb.UploadEventRequest(header=pb.UploadHeader(device=device, name="cap.bin", size=size,
                                                               device_event_id="DCIM/0042"))
            yield pb.UploadEventRequest(media_chunk=data)
            yield pb.UploadEventRequest(finish=pb.UploadFinish())
        stub = gallery_pb2_grpc.GalleryServiceStub(channel)
        for size in (None, QUOTA):
            assert stub.UploadEvent(parts(size), metadata=md, timeout=30).event_id == first
        # The quota still holds for anything else: an id of no capture is refused at its first byte.
        r = http.post(f"/api/gallery/{device}/upload", headers=headers, data={**fields, "device_event_id": "DCIM/0043"},
                      files={"event": ("cap.bin", data, "application/octet-stream")})
        assert_over_quota(r, device, QUOTA)
        assert set(stored_files(quota_stack.data_dir)) == stored
        stats = http.get(f"/api/gallery/{device}/stats", headers=headers).json()
        assert (stats["total_events"], stats["total_size"]) == (1, QUOTA)


def test_the_refusal_is_in_its_access_line(quota_stack: Stack, mint: Callable[..., str]) -> None:
    """The operator sees which request hit a quota, and the client can quote its id."""
    device = new_device()
    headers = {"Authorization": f"Bearer {mint()}"}
    with httpx.Client(base_url=quota_stack.base_url, timeout=60) as http:
        assert multipart(http, headers, device, random_bytes(QUOTA)).status_code == 200
        refused = multipart(http, headers, device, b"x")
    assert refused.status_code == 507
    line = access_line(quota_stack, refused.headers["x-request-id"])
    assert line is not None and (line["code"], line["reason"]) == ("RESOURCE_EXHAUSTED", "DEVICE_QUOTA_EXCEEDED")
    # Which device, whoever's token asked (a gateway's for many), and from where: the peer is
    # Envoy, the client the address Envoy forwards (for a client on loopback, as here, Envoy
    # writes this host's own address).
    assert line["device"] == device
    assert str(line["peer"]).startswith("ipv4:127.0.0.1:")
    assert isinstance(line["forwarded_for"], str) and ipaddress.ip_address(line["forwarded_for"])


def test_stats_and_the_admin_status_tell_the_room(quota_stack: Stack, mint: Callable[..., str]) -> None:
    """A device reads its room before it uploads; an operator sees who is full, over REST and
    natively."""
    device = new_device()
    headers = {"Authorization": f"Bearer {mint()}"}
    admin = {"Authorization": f"Bearer {mint(scope=auth.ADMIN)}"}
    with httpx.Client(base_url=quota_stack.base_url, timeout=60) as http, \
            grpc.insecure_channel(quota_stack.envoy_grpc_address) as channel:
        stats = http.get(f"/api/gallery/{device}/stats", headers=headers)
        assert stats.status_code == 200, stats.text
        assert stats.json() == {"total_events": 0, "total_size": 0, "by_type": {},
                                "quota": {"limit_bytes": QUOTA, "used_bytes": 0, "available_bytes": QUOTA}}
        assert multipart(http, headers, device, random_bytes(2800)).status_code == 200
        quota = http.get(f"/api/gallery/{device}/stats", headers=headers).json()["quota"]
        assert quota == {"limit_bytes": QUOTA, "used_bytes": 2800, "available_bytes": 200}
        assert all(type(v) is int for v in quota.values())
        native = gallery_pb2_grpc.GalleryServiceStub(channel).GetStats(
            pb.GetStatsRequest(device=device), metadata=[("authorization", headers["Authorization"])])
        assert (native.quota.limit_bytes, native.quota.used_bytes, native.quota.available_bytes) == (QUOTA, 2800, 200)

        status = http.get("/api/admin/status", headers=admin)
        assert status.status_code == 200, status.text
        storage = status.json()["device_storage"]
        assert storage["quota_bytes"] == QUOTA
        # Other tests of this module filled devices too; this one is near (>= 90%), not at, its quota.
        assert storage["devices_near_quota"] >= storage["devices_at_quota"] + 1
        assert {"device": device, "used_bytes": 2800} in storage["largest"]
        used = [entry["used_bytes"] for entry in storage["largest"]]
        assert used == sorted(used, reverse=True)
        reply = admin_pb2_grpc.GalleryAdminServiceStub(channel).GetAdminStatus(
            admin_pb2.GetAdminStatusRequest(), metadata=[("authorization", admin["Authorization"])])
        assert reply.device_storage.quota_bytes == QUOTA
        assert (device, 2800) in [(u.device, u.used_bytes) for u in reply.device_storage.largest]


def test_announced_thumbnails_count_and_one_past_the_quota_is_left_out(
    quota_stack: Stack, mint: Callable[..., str],
) -> None:
    """Announced events' media is on the device, their thumbnails on the server's disk: a device at
    its quota filled the disk with announcements of thumbnails. Through Envoy, natively."""
    device = new_device()
    events = [dpb.AnnouncedEvent(device_key=f"DCIM/{i}.mp4", name=f"{i}.mp4", size=10 ** 6, thumbnail=b"t" * 1000)
              for i in range(4)]
    with grpc.insecure_channel(quota_stack.envoy_grpc_address) as channel:
        reply = device_pb2_grpc.DeviceServiceStub(channel).AnnounceEvents(
            dpb.AnnounceEventsRequest(device=device, events=events),
            metadata=[("authorization", f"Bearer {mint(devices=[device], scope=auth.DEVICE)}")], timeout=30)
    headers = {"Authorization": f"Bearer {mint(devices=[device])}"}
    with httpx.Client(base_url=quota_stack.base_url, timeout=30) as http:
        shown = [http.get(f"/api/gallery/{device}/events/{r.event_id}", headers=headers).json()["has_thumbnail"]
                 for r in reply.results]
        stats = http.get(f"/api/gallery/{device}/stats", headers=headers).json()
    assert shown == [True, True, True, False]  # 3 x 1,000 bytes fill the quota of 3,000
    assert stats["quota"]["used_bytes"] == QUOTA
