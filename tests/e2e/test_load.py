"""Load: 64 uploads at once (REST multipart and native gRPC, all through the real Envoy) plus
reads (list, stats, and the content of events stored during the run, checked against their
sha256), for LOAD_SECONDS, with no error, every upload stored with its bytes, and
the peak RSS (VmHWM) of the server and of Envoy within their budgets (README "Reliability").

The stack runs with GALLERY_GRPC_WORKERS=96 and GALLERY_MAX_UPLOADS_TOTAL=72: the default of 48
uploads at once would refuse some of 64 simultaneous uploads with TOO_MANY_UPLOADS, which is its
purpose (tested in test_limits.py), not what this test measures: the memory of 64 uploads in
flight at once, with reads still answered.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import random
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import httpx

from gallery.v1 import gallery_pb2 as pb
from gallery.v1 import gallery_pb2_grpc

from .conftest import start_stack, stop_stack

LOAD_SECONDS = float(os.environ.get("GALLERY_LOAD_SECONDS", "20"))
UPLOADERS = 64
READERS = 4
DEVICES = 32  # two uploaders per device: within GALLERY_MAX_UPLOADS_PER_DEVICE (4)
MiB = 1 << 20
# Budgets for the peak resident memory during the run (README "Reliability"; BENCHMARKS.md states
# them too). Measured on the 2-CPU test machine on 2026-11-29: server 172 - 178 MiB (96 threads, 64
# uploads each holding a message and a 512 KiB window; 184 - 185 with 1 MiB windows), Envoy
# 107 - 119 MiB. The server's budget is issue 7's target for 64 uploads at once.
SERVER_RSS_BUDGET = 256 * MiB
ENVOY_RSS_BUDGET = 192 * MiB


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


def test_64_concurrent_uploads_with_reads_within_memory_budget(
    tmp_path: pathlib.Path, mint: Callable[..., str]
) -> None:
    env = {
        "GALLERY_MAKE_THUMBNAILS": "false",
        "GALLERY_GRPC_WORKERS": "96",
        "GALLERY_MAX_UPLOADS_TOTAL": "72",
        "GALLERY_LOG_LEVEL": "WARNING",
    }
    stack = start_stack(tmp_path / "data", tmp_path / "gallery.log", extra_env=env)
    token = mint()
    headers = {"Authorization": f"Bearer {token}"}
    md = [("authorization", f"Bearer {token}")]
    blocks = [random.Random(i).randbytes(MiB) for i in range(4)]
    stored: list[tuple[str, str, str, int]] = []  # device, event id, sha256, size
    failures: list[str] = []
    reads = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + LOAD_SECONDS

    def body(rng: random.Random) -> bytes:
        size = rng.randrange(64 * 1024, 2 * MiB)
        return (blocks[rng.randrange(4)] * 2)[rng.randrange(MiB):][:size]

    def uploader(n: int, channel: grpc.Channel) -> None:
        rng = random.Random(n)
        device = f"load-{n % DEVICES}"
        stub = gallery_pb2_grpc.GalleryServiceStub(channel)
        with httpx.Client(base_url=stack.base_url, timeout=60) as http:
            while time.monotonic() < deadline:
                data = body(rng)
                try:
                    if n % 2:
                        r = http.post(f"/api/gallery/{device}/upload", headers=headers,
                                      files={"event": ("l.bin", data)}, data={"name": "l.bin"})
                        if r.status_code != 200:
                            raise AssertionError(f"REST {r.status_code}: {r.text[:300]}")
                        event_id = r.json()["eventId"]
                    else:
                        event_id = stub.UploadEvent(_parts(device, data), metadata=md, timeout=60).event_id
                except (AssertionError, grpc.RpcError, httpx.HTTPError) as exc:
                    with lock:
                        failures.append(f"{device}: {exc}")
                    continue
                with lock:
                    stored.append((device, event_id, hashlib.sha256(data).hexdigest(), len(data)))

    def reader(n: int) -> None:
        rng = random.Random(1000 + n)
        with httpx.Client(base_url=stack.base_url, timeout=60) as http:
            while time.monotonic() < deadline:
                device = f"load-{rng.randrange(DEVICES)}"
                paths = [f"/api/gallery/{device}/events?limit=20", f"/api/gallery/{device}/stats"]
                with lock:
                    done = stored[rng.randrange(len(stored))] if stored else None
                if done is not None:
                    paths.append(f"/api/gallery/{done[0]}/events/{done[1]}/content")
                for path in paths:
                    r = http.get(path, headers=headers)
                    if r.status_code != 200:
                        with lock:
                            failures.append(f"read {path}: {r.status_code} {r.text[:200]}")
                    elif path.endswith("/content") and done is not None and (
                            hashlib.sha256(r.content).hexdigest() != done[2]):
                        with lock:
                            failures.append(f"read {path}: not the stored bytes")
                with lock:
                    reads[0] += len(paths)

    try:
        with grpc.insecure_channel(stack.envoy_grpc_address) as channel:
            threads = [threading.Thread(target=uploader, args=(n, channel)) for n in range(UPLOADERS)]
            threads += [threading.Thread(target=reader, args=(n,)) for n in range(READERS)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=LOAD_SECONDS + 120)
                assert not thread.is_alive()
        server_peak, envoy_peak = peak_rss(stack.server_pid), peak_rss(stack.envoy_pid)
        server_libraries = pathlib.Path(f"/proc/{stack.server_pid}/maps").read_text()
    finally:
        stop_stack(stack)

    megabytes = sum(s for *_, s in stored) / MiB
    print(f"load: {len(stored)} uploads ({megabytes:.0f} MiB) and {reads[0]} reads in {LOAD_SECONDS:g} s "
          f"with {UPLOADERS} uploaders; peak RSS server {server_peak / MiB:.0f} MiB, "
          f"Envoy {envoy_peak / MiB:.0f} MiB; {len(failures)} failures")
    assert not failures, failures[:5]
    assert len(stored) >= UPLOADERS and reads[0] > 0
    for device, event_id, sha256, size in stored:
        path = stack.data_dir / "media" / device / event_id
        assert path.stat().st_size == size
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sha256
    assert server_peak <= SERVER_RSS_BUDGET, f"server peak RSS {server_peak / MiB:.0f} MiB"
    assert envoy_peak <= ENVOY_RSS_BUDGET, f"Envoy peak RSS {envoy_peak / MiB:.0f} MiB"
    # ~9 MiB of the budget that a server on SQLite has no use for (db._postgres_idle).
    assert "psycopg" not in server_libraries and "libpq" not in server_libraries, \
        "a server on SQLite loaded PostgreSQL's driver"


def _parts(device: str, data: bytes) -> Iterator[pb.UploadEventRequest]:
    yield pb.UploadEventRequest(header=pb.UploadHeader(device=device, name="l.bin", size=len(data)))
    for start in range(0, len(data), MiB):
        yield pb.UploadEventRequest(media_chunk=data[start:start + MiB])
    yield pb.UploadEventRequest(finish=pb.UploadFinish(sha256=hashlib.sha256(data).hexdigest()))
