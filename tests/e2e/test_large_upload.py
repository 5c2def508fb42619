"""A 1 GiB multipart upload through Envoy, streamed from a generator on the client side, stored past
the page cache (GALLERY_DIRECT_IO's default, server/gallery_server/_direct_io.py)."""

from __future__ import annotations

import hashlib
import os
import uuid

from ..page_cache import cached_pages, direct_writes_skip_the_cache

GIB = 1 << 30
CHUNK = 1 << 20


def test_one_gib_multipart_upload_through_envoy(http, auth_headers, stack):
    device = f"big-{uuid.uuid4().hex[:8]}"
    boundary = uuid.uuid4().hex
    block = os.urandom(CHUNK)
    digest = hashlib.sha256()

    def body():
        yield (
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nbig.bin\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"event\"; filename=\"big.bin\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        for i in range(GIB // CHUNK):
            # Vary each chunk so that a dropped or repeated chunk changes the hash.
            piece = i.to_bytes(8, "big") + block[8:]
            digest.update(piece)
            yield piece
        yield f"\r\n--{boundary}--\r\n".encode()

    r = http.post(
        f"/api/gallery/{device}/upload",
        content=body(),
        headers={**auth_headers(), "Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert r.status_code == 200, r.text
    event_id = r.json()["eventId"]
    [event] = http.get(f"/api/gallery/{device}/events", headers=auth_headers()).json()
    assert event["id"] == event_id
    assert event["size"] == GIB
    assert event["sha256"] == digest.hexdigest()
    stored = stack.data_dir / "media" / device / event_id
    assert stored.stat().st_size == GIB
    if direct_writes_skip_the_cache(stack.data_dir):  # else this filesystem keeps it in memory anyway
        # Only the tail went through the page cache (under 4 KiB: one page).
        assert cached_pages(stored) <= 1
    # Keep the shared stack's disk use small.
    assert http.delete(f"/api/gallery/{device}/events/{event_id}", headers=auth_headers()).status_code == 200
    assert not stored.exists()
