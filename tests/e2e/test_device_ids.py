"""A MAC address is a device id (fleets name cameras and sensors by theirs): every REST route through
the real Envoy takes it as is and percent-encoded (`%3A`, as encodeURIComponent writes it), and so
do native calls, pre-signed URLs and the download Envoy sends itself."""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable

import grpc
import httpx
import pytest

from gallery.v1 import gallery_pb2 as pb
from gallery.v1 import gallery_pb2_grpc

from ..conftest import random_bytes
from .conftest import Stack, log_entries


def new_mac() -> str:
    return ":".join(f"{b:02x}" for b in secrets.token_bytes(6))


@pytest.mark.parametrize("spelled", ["as-is", "percent-encoded"])
def test_a_mac_address_is_a_device_id_on_every_route(
    stack: Stack, http: httpx.Client, mint: Callable[..., str], spelled: str
) -> None:
    mac = new_mac()
    at = f"/api/gallery/{mac if spelled == 'as-is' else mac.replace(':', '%3A')}"
    headers = {"Authorization": f"Bearer {mint(devices=[mac])}"}

    r = http.get(f"{at}/paths", headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["paths"]["incoming"] == str(stack.data_dir / "gallery" / mac / "incoming")

    media, thumbnail = random_bytes(200_000), random_bytes(3_000)
    r = http.post(f"{at}/upload", headers=headers, data={"name": "clip.mp4", "has_thumbnail": "true"},
                  files={"event": ("clip.mp4", media, "video/mp4"), "thumbnail": ("t.jpg", thumbnail, "image/jpeg")})
    assert r.status_code == 200, r.text
    event_id = r.json()["eventId"]
    assert (stack.data_dir / "media" / mac / event_id).read_bytes() == media

    [listed] = http.get(f"{at}/events", headers=headers).json()
    assert (listed["id"], listed["sha256"]) == (event_id, hashlib.sha256(media).hexdigest())
    assert http.get(f"{at}/events/{event_id}", headers=headers).json()["id"] == event_id
    r = http.get(f"{at}/events/{event_id}/content", headers=headers)
    assert (r.status_code, r.content) == (200, media)
    # Sent by Envoy itself (the handoff read the path's device as the transcoder does), not streamed.
    deadline = time.monotonic() + 10
    while not [e for e in log_entries(stack) if e.get("message") == "download handed to envoy"
               and e.get("event_id") == event_id]:
        assert time.monotonic() < deadline, "the download was not handed to Envoy"
        time.sleep(0.1)
    r = http.get(f"{at}/events/{event_id}/thumbnail", headers=headers)
    assert (r.status_code, r.content) == (200, thumbnail)
    r = http.post(f"{at}/checksums", headers=headers, json={"sha256s": [hashlib.sha256(media).hexdigest()]})
    assert r.status_code == 200 and r.json()["existing"] == {hashlib.sha256(media).hexdigest(): event_id}, r.text
    r = http.post(f"{at}/pull/{event_id}", headers=headers)
    assert (r.status_code, r.json()["success"], r.json()["state"]) == (200, True, "stored"), r.text

    r = http.get(f"{at}/upload-url", params={"filename": "photo.jpg"}, headers=headers)
    assert r.status_code == 200, r.text
    url = r.json()["upload_url"]
    assert f"/api/gallery/{mac}/upload/" in url  # the device as is: the URL reads as its path
    with httpx.Client(timeout=30) as raw:
        assert raw.put(url, content=b"jpeg bytes").status_code == 200
        assert raw.get(url).status_code == 200  # its status

    r = http.get(f"{at}/stats", headers=headers)
    assert r.status_code == 200 and r.json()["total_events"] == 2, r.text
    r = http.delete(f"{at}/events/{event_id}", headers=headers)
    assert r.status_code == 200 and r.json() == {"success": True}, r.text
    assert [e["name"] for e in http.get(f"{at}/events", headers=headers).json()] == ["photo.jpg"]


@pytest.mark.parametrize("through", ["direct", "envoy"])
def test_a_mac_address_is_a_device_id_natively(stack: Stack, mint: Callable[..., str], through: str) -> None:
    mac = new_mac()
    token = [("authorization", f"Bearer {mint(devices=[mac])}")]
    address = stack.grpc_address if through == "direct" else stack.envoy_grpc_address
    with grpc.insecure_channel(address) as channel:
        stub = gallery_pb2_grpc.GalleryServiceStub(channel)
        stored = stub.UploadEvent(iter([
            pb.UploadEventRequest(header=pb.UploadHeader(device=mac, name="a.txt")),
            pb.UploadEventRequest(media_chunk=b"hello"),
            pb.UploadEventRequest(finish=pb.UploadFinish()),
        ]), metadata=token, timeout=30)
        event = stub.GetEvent(pb.GetEventRequest(device=mac, event_id=stored.event_id), metadata=token, timeout=30)
    assert (event.id, event.size) == (stored.event_id, 5)
    assert (stack.data_dir / "media" / mac / stored.event_id).read_bytes() == b"hello"


@pytest.mark.parametrize("device", ["00:1a", "a:", "a::b"])
def test_colons_stand_anywhere_but_first(http: httpx.Client, auth_headers: Callable[..., dict[str, str]],
                                         device: str) -> None:
    assert http.get(f"/api/gallery/{device}/stats", headers=auth_headers()).status_code == 200
    r = http.get(f"/api/gallery/:{device}/stats", headers=auth_headers())
    assert r.status_code == 400 and r.json()["details"][0]["reason"] == "INVALID_DEVICE_ID", r.text
