"""`gallery backup` of a running stack while uploads go on, then `gallery restore` of it into a new
data folder and a second stack started there: every event it lists downloads whole through Envoy,
with the bytes and digest it was uploaded with, old tokens still work (the secret came along), and
what the restored gallery deletes stays in the backup."""

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

    restoring = gallery("restore", str(tmp_path / "backup"), data_dir=tmp_path / "restored")
    assert restoring.returncode == 0, restoring.stderr
    restored_json = json.loads(restoring.stdout)
    assert (restored_json["events"], restored_json["files"]) == (manifest["events"], manifest["files"])
    assert (restored_json["linked"], restored_json["missing_files"], restored_json["secret"]) == (
        manifest["files"], 0, True)
    restored = start_stack(tmp_path / "restored", tmp_path / "restored.log", extra_env=OWN_SECRET)
    try:
        with httpx.Client(base_url=restored.base_url, timeout=60) as http:
            listed = []
            for device in ("cam0", "cam1", "cam2"):
                r = http.get(f"/api/gallery/{device}/events", headers=headers, params={"limit": 1000})
                assert r.status_code == 200, r.text
                for event in r.json():
                    content = http.get(f"/api/gallery/{device}/events/{event['id']}/content", headers=headers)
                    assert content.status_code == 200, content.text
                    assert hashlib.sha256(content.content).hexdigest() == sent[event["id"]]
                    listed.append((device, event["id"]))
            assert len(listed) == manifest["events"]
            device, event_id = listed[0]
            assert http.delete(f"/api/gallery/{device}/events/{event_id}", headers=headers).status_code == 200
            assert not (tmp_path / "restored" / "media" / device / event_id).exists()
            assert (tmp_path / "backup" / "media" / device / event_id).exists()  # a link gone, not the file
    finally:
        stop_stack(restored)
    assert restored.process.returncode == 0, restored.log()


def backup(stack: Stack, destination: os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    return gallery("backup", str(destination), data_dir=stack.data_dir)


def gallery(*args: str, data_dir: os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GALLERY_")}
    env["GALLERY_DATA_DIR"] = str(data_dir)
    return subprocess.run([sys.executable, "-m", "gallery_server", *args], env=env,
                          capture_output=True, text=True, timeout=120)
