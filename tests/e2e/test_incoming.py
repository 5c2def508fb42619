"""Incoming folders through the real stack: a file written slowly into a device's incoming folder
becomes exactly one event once complete, and a restart neither loses nor duplicates it."""

from __future__ import annotations

import hashlib
import pathlib
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from ..conftest import random_bytes
from .conftest import Stack, running_stack, start_stack, stop_stack

DEVICE = "cam-incoming"
FAST_SCANS = {"GALLERY_INCOMING_SCAN_SECONDS": "0.2", "GALLERY_INCOMING_SETTLE_SECONDS": "1"}
PIECE = 512 << 10  # 6 pieces: 3 MiB, written over 3 s


@pytest.fixture
def incoming_stack(tmp_path: pathlib.Path) -> Iterator[Stack]:
    with running_stack(tmp_path, FAST_SCANS) as stack:
        yield stack


def _events(client: httpx.Client, headers: dict[str, str]) -> list[dict]:  # type: ignore[type-arg]
    r = client.get(f"/api/gallery/{DEVICE}/events", headers=headers)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def test_a_file_written_slowly_into_incoming_becomes_one_event(
    incoming_stack: Stack, tmp_path: pathlib.Path, auth_headers: Callable[..., dict[str, str]]
) -> None:
    headers = auth_headers()
    with httpx.Client(base_url=incoming_stack.base_url, timeout=30) as client:
        r = client.get(f"/api/gallery/{DEVICE}/paths", headers=headers)
        assert r.status_code == 200, r.text
        inbox = pathlib.Path(r.json()["paths"]["incoming"])

        data = b""
        with (inbox / "slow.mp4").open("wb") as f:
            for _ in range(6):
                piece = random_bytes(PIECE)
                f.write(piece)
                f.flush()
                data += piece
                time.sleep(0.5)
                # Still being written (changed within the last second): never imported half-done.
                assert _events(client, headers) == [], incoming_stack.log()

        deadline = time.monotonic() + 20
        while not (found := _events(client, headers)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(found) == 1, incoming_stack.log()
        [event] = found
        assert event["name"] == "slow.mp4"
        assert event["size"] == len(data) == 3 << 20
        assert event["sha256"] == hashlib.sha256(data).hexdigest()
        assert list(inbox.iterdir()) == []
        content = client.get(f"/api/gallery/{DEVICE}/events/{event['id']}/content", headers=headers)
        assert content.status_code == 200
        assert content.content == data

        time.sleep(1.5)  # several more scans
        assert _events(client, headers) == [event]

    # A restart on the same data: nothing comes back, nothing is imported again.
    stop_stack(incoming_stack)
    assert incoming_stack.process.returncode == 0, incoming_stack.log()
    again = start_stack(incoming_stack.data_dir, tmp_path / "again.log", extra_env=FAST_SCANS)
    try:
        with httpx.Client(base_url=again.base_url, timeout=30) as client:
            time.sleep(1.5)
            assert _events(client, headers) == [event]
    finally:
        stop_stack(again)
    assert again.process.returncode == 0, again.log()


def test_a_device_named_by_its_mac_address_has_a_drop_folder(
    incoming_stack: Stack, auth_headers: Callable[..., dict[str, str]]
) -> None:
    device, headers, data = "00:1a:2b:3c:4d:5e", auth_headers(), random_bytes(10_000)
    with httpx.Client(base_url=incoming_stack.base_url, timeout=30) as client:
        inbox = pathlib.Path(client.get(f"/api/gallery/{device}/paths", headers=headers).json()["paths"]["incoming"])
        (inbox / "dropped.jpg").write_bytes(data)
        deadline = time.monotonic() + 20
        while not (found := client.get(f"/api/gallery/{device}/events", headers=headers).json()):
            assert time.monotonic() < deadline, incoming_stack.log()
            time.sleep(0.2)
    assert [(e["name"], e["sha256"]) for e in found] == [("dropped.jpg", hashlib.sha256(data).hexdigest())]
    assert (incoming_stack.data_dir / "media" / device / found[0]["id"]).read_bytes() == data
