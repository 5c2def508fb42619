"""`gallery verify` beside a running stack, as an operator runs it: what a whole run finds reaches
the admin status (REST and native) and every replica's metrics; a run of one device does not
replace it."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import grpc
import httpx
import pytest

from gallery.v1 import admin_pb2, admin_pb2_grpc
from gallery_server import auth, storage
from gallery_server.local_stack import Stack, free_ports

from ..conftest import new_device, random_bytes
from .conftest import running_stack
from .test_metrics import scrape


@pytest.fixture(scope="module")
def verified_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, str]]:
    [port] = free_ports(1)
    with running_stack(tmp_path_factory.mktemp("verify"), {
        "GALLERY_METRICS_ADDRESS": f"127.0.0.1:{port}", "GALLERY_MAKE_THUMBNAILS": "false",
    }) as stack:
        yield stack, f"http://127.0.0.1:{port}/metrics"


def verify(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GALLERY_")}
    env["GALLERY_DATA_DIR"] = str(stack.data_dir)
    return subprocess.run([sys.executable, "-m", "gallery_server", "verify", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def admin_status(stack: Stack, token: str) -> dict[str, object]:
    r = httpx.get(f"{stack.base_url}/api/admin/status", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_whole_verify_reaches_the_status_and_metrics(verified_stack: tuple[Stack, str],
                                                       mint: Callable[..., str]) -> None:
    stack, metrics_url = verified_stack
    admin = mint(scope=auth.ADMIN)
    assert "last_verify" not in admin_status(stack, admin)
    assert math.isnan(scrape(metrics_url)("gallery_verify_damaged"))

    device, other = new_device(), new_device()
    headers = {"Authorization": f"Bearer {mint()}"}
    ids = {}
    with httpx.Client(base_url=stack.base_url, timeout=60) as http:
        for name in (device, other):
            r = http.post(f"/api/gallery/{name}/upload", headers=headers,
                          files={"event": ("f.bin", random_bytes(4096), "application/octet-stream")},
                          data={"name": "f.bin"})
            assert r.status_code == 200, r.text
            ids[name] = r.json()["eventId"]
    with (storage.media_root(stack.data_dir) / device / ids[device]).open("r+b") as f:
        f.write(b"rot")  # same size, other bytes: only reading the file can tell

    started = time.time()
    result = verify(stack)
    assert result.returncode == 1, result.stderr
    body = admin_status(stack, admin)
    run = body["last_verify"]
    assert set(run) == {"started", "finished", "events", "checked", "skipped", "bytes_read", "damaged",
                        "missing", "seconds", "examples"}
    assert all(isinstance(run[k], str) and run[k].endswith("Z") for k in ("started", "finished"))
    assert all(isinstance(run[k], int | float) for k in set(run) - {"started", "finished", "examples"})
    assert (run["events"], run["checked"], run["damaged"], run["missing"]) == (2, 2, 1, 0)
    assert run["bytes_read"] == 3 * 4096  # the damaged file is read again before it is reported
    assert run["examples"] == [f"{device}/{ids[device]}"]
    value = scrape(metrics_url)
    assert (value("gallery_verify_damaged"), value("gallery_verify_missing")) == (1, 0)
    assert started - 1 <= value("gallery_verify_last_finished_timestamp_seconds") <= time.time()

    with grpc.insecure_channel(stack.envoy_grpc_address) as channel:
        reply = admin_pb2_grpc.GalleryAdminServiceStub(channel).GetAdminStatus(
            admin_pb2.GetAdminStatusRequest(), metadata=[("authorization", f"Bearer {admin}")], timeout=30)
    assert reply.last_verify.damaged == 1 and list(reply.last_verify.examples) == run["examples"]

    # One device's clean run has not seen the damage: the whole run's totals stay.
    assert verify(stack, "--device", other).returncode == 0
    assert admin_status(stack, admin)["last_verify"] == run
    assert scrape(metrics_url)("gallery_verify_damaged") == 1
