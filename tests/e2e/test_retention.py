"""GALLERY_RETENTION_DAYS on the real stack: a server started with it deletes, at start and then
periodically, the events created before the cutoff, and leaves the rest; off by default."""

from __future__ import annotations

import datetime
import sqlite3
from collections.abc import Callable

import httpx

from ..conftest import new_device, random_bytes, stored_files, wait_until
from .conftest import log_entries, running_stack


def test_a_server_with_a_retention_deletes_what_is_older(tmp_path, mint: Callable[..., str]) -> None:  # type: ignore[no-untyped-def]
    device = new_device()
    headers = {"Authorization": f"Bearer {mint()}"}

    def upload(http: httpx.Client, name: str) -> str:
        r = http.post(f"/api/gallery/{device}/upload", headers=headers,
                      files={"event": (name, random_bytes(1000))}, data={"name": name})
        assert r.status_code == 200, r.text
        return str(r.json()["eventId"])

    with running_stack(tmp_path, {"GALLERY_MAKE_THUMBNAILS": "false"}) as stack, \
            httpx.Client(base_url=stack.base_url, timeout=30) as http:
        old, recent = upload(http, "old.bin"), upload(http, "recent.bin")
    # As if uploaded 31 days ago (SQLite keeps UTC, without an offset).
    month_ago = (datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=31)).strftime("%Y-%m-%d %H:%M:%S.%f")
    with sqlite3.connect(tmp_path / "data" / "gallery.db") as db:
        db.execute("UPDATE events SET created = ?, received_at = ? WHERE id = ?", (month_ago, month_ago, old))

    with running_stack(tmp_path, {"GALLERY_MAKE_THUMBNAILS": "false", "GALLERY_RETENTION_DAYS": "30"}) as stack, \
            httpx.Client(base_url=stack.base_url, timeout=30) as http:
        assert wait_until(lambda: http.get(f"/api/gallery/{device}/events/{old}", headers=headers).status_code == 404)
        assert http.get(f"/api/gallery/{device}/events/{recent}/content", headers=headers).status_code == 200
        assert [p.name for p in stored_files(stack.data_dir)] == [recent]
        [line] = [e for e in log_entries(stack) if e.get("message") == "events expired"]
        assert (line["device"], line["events"], line["retention_days"]) == (device, 1, 30)
