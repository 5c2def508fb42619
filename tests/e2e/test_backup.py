"""`gallery backup` of a running stack while uploads go on, then a second stack started on the
backup folder, as README says to restore: every event it lists downloads whole through Envoy,
with the bytes and digest it was uploaded with, and old tokens still work (the secret came along)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time

import httpx

from gallery_server import auth
from gallery_server.local_stack import Stack

from ..conftest import random_bytes
from .conftest import running_stack, start_stack, stop_stack

# `gallery run` makes the data folder's own jwt-secret, which the backup takes along.
OWN_SECRET = {"GALLERY_MAKE_THUMBNAILS": "false", "GALLERY_JWT_SECRET": ""}


def test_a_backup_taken_under_load_runs_as_a_gallery(tmp_path) -> None:  # type: ignore[no-untyped-def]
    sent: dict[str, str] = {}  # event id -> sha256 of what was uploaded
    (tmp_path / "live").mkdir()
    with running_stack(tmp_path / "live", OWN_SECRET) as stack:
        token = auth.mint((stack.data_dir / "jwt-secret").read_text().strip(), subject="t", devices=["*"],
                          scope=f"{auth.READ} {auth.WRITE}", ttl_seconds=3600)
        headers = {"Authorization": f"Bearer {token}"}
        stop = threading.Event()
        refused: list[str] = []

        def upload_until_stopped() -> None:
            with httpx.Client(base_url=stack.base_url, timeout=60) as http:
                for i in range(1000):
                    if stop.is_set() and i >= 10:
                        return
                    data = random_bytes(50_000 + i)
                    r = http.post(f"/api/gallery/cam{i % 3}/upload", headers=headers,
                                  files={"event": (f"{i}.bin", data, "application/octet-stream")},
                                  data={"name": f"{i}.bin"})
                    if r.status_code != 200:
                        refused.append(r.text)
                        return
                    sent[r.json()["eventId"]] = hashlib.sha256(data).hexdigest()

        uploader = threading.Thread(target=upload_until_stopped)
        uploader.start()
        try:
            while len(sent) < 5 and uploader.is_alive():
                time.sleep(0.05)
            result = backup(stack, tmp_path / "backup")
        finally:
            stop.set()
            uploader.join()
    assert not refused, refused  # uploads went on while it ran
    assert result.returncode == 0, result.stderr
    manifest = json.loads(result.stdout)
    assert manifest["secret"] is True and manifest["missing_files"] == 0
    assert 5 <= manifest["events"] <= len(sent)

    # Restored as README says: a gallery started on the backup folder, its secret taken from there.
    restored = start_stack(tmp_path / "backup", tmp_path / "restored.log", extra_env=OWN_SECRET)
    try:
        with httpx.Client(base_url=restored.base_url, timeout=60) as http:
            listed = 0
            for device in ("cam0", "cam1", "cam2"):
                r = http.get(f"/api/gallery/{device}/events", headers=headers, params={"limit": 1000})
                assert r.status_code == 200, r.text
                for event in r.json():
                    content = http.get(f"/api/gallery/{device}/events/{event['id']}/content", headers=headers)
                    assert content.status_code == 200, content.text
                    assert hashlib.sha256(content.content).hexdigest() == sent[event["id"]]
                    listed += 1
            assert listed == manifest["events"]
    finally:
        stop_stack(restored)
    assert restored.process.returncode == 0, restored.log()


def backup(stack: Stack, destination: os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GALLERY_")}
    env["GALLERY_DATA_DIR"] = str(stack.data_dir)
    return subprocess.run([sys.executable, "-m", "gallery_server", "backup", str(destination)], env=env,
                          capture_output=True, text=True, timeout=120)
