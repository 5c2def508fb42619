"""Crash safety: CYCLES times on SQLite (POSTGRES_CYCLES on PostgreSQL), a real gRPC server process
is SIGKILLed at a random moment while uploads run on every path at once, then a fresh server
process takes over (same data root, same database, same port, the same real Envoy in front).
Afterwards:

* zero acknowledged uploads lost: every event id a client was given exists, for its device, with
  the size and sha256 the client sent, and the file in media/ has exactly those bytes;
* zero partial files visible: no row points at a missing or short file, and every file in media/
  either has its row or is an orphan that reconciliation removes;
* zero orphans after reconciliation: a pass with no grace period leaves only files with rows
  (and the leftover of a pre-signed PUT killed after its move, at the id of a URL that can still
  complete, whose retry replaces it), and in staging/ only the files of live resumable sessions,
  each holding at least its committed bytes;
* every open resumable session row has its staging file, holding at least its committed bytes;
* every file dropped into an incoming folder ends up imported exactly once, with its bytes;
* a reconciler with a short grace period (LIVE_GRACE seconds, a pass every LIVE_INTERVAL), as
  another replica would run it, runs throughout: during the kills, and during slow uploads that
  outlive the grace period (a thumbnail sent first, then media for longer than the grace; a
  pre-signed thumbnail PUT long before its media) which must all be stored whole.

What a SIGKILL does not prove: the page cache survives a killed process, so this test cannot show
that bytes reach the disk; durability against power loss rests on the fsync calls (reviewed), not
on this test.

Paths: native UploadEvent (direct gRPC), REST multipart and pre-signed PUT (through Envoy),
resumable StartUpload/WriteUpload (direct), and incoming folder imports. Restarts fork a server
from a warm parent (forkserver.py), so 200 cycles fit in about 100 s on 2 CPUs.

The seed is printed with every failure; rerun with GALLERY_CRASH_SEED=<seed> to replay the kill
timings, sizes and paths (thread scheduling still varies).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import grpc
import httpx
import pytest
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlmodel import select

from gallery.v1 import gallery_pb2 as pb
from gallery.v1 import gallery_pb2_grpc
from gallery_server import auth, incoming, supervisor
from gallery_server.db import Database
from gallery_server.local_stack import free_ports
from gallery_server.models import GRANT_UNUSED, Event, UploadGrant, UploadSessionRow
from gallery_server.reconcile import Reconciler
from gallery_server.service import Gallery
from gallery_server.settings import Settings
from gallery_server.storage import Storage

from ..conftest import JWT_SECRET

CYCLES = int(os.environ.get("GALLERY_CRASH_CYCLES", "200"))
# PostgreSQL runs fewer cycles (the suite's time budget); SQLite, the default, runs them all.
POSTGRES_CYCLES = int(os.environ.get("GALLERY_CRASH_CYCLES_POSTGRES", "20"))
FORKSERVER = pathlib.Path(__file__).with_name("forkserver.py")
CHUNK = 64 * 1024
# Every upload path must see uploads through to the end between kills for the run to prove anything.
ACKNOWLEDGED_PATHS = frozenset({"native", "resumable", "multipart", "signed"})
# The test's own reconciler (another replica): a short grace, frequent passes.
LIVE_GRACE = 1.0
LIVE_INTERVAL = 0.3
SLOW_SECONDS = 2 * LIVE_GRACE  # how long the slow uploads take, between thumbnail and media end
# Fast reconnects: the next server is up within tens of milliseconds of the kill.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 10),
    ("grpc.min_reconnect_backoff_ms", 10),
    ("grpc.max_reconnect_backoff_ms", 50),
]


@dataclasses.dataclass(frozen=True)
class Ack:
    path: str
    device: str
    event_id: str
    sha256: str
    size: int


class Run:
    """What the clients were told, shared by the worker threads."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.acks: list[Ack] = []
        self.errors = 0
        self.lock = threading.Lock()

    def ack(self, path: str, device: str, event_id: str, data: bytes) -> None:
        with self.lock:
            self.acks.append(Ack(path, device, event_id, hashlib.sha256(data).hexdigest(), len(data)))

    def fail(self) -> None:
        with self.lock:
            self.errors += 1


def payload(rng: random.Random) -> bytes:
    # Mostly small (many complete per cycle), sometimes several chunks (killed mid-stream).
    size = rng.choice((0, 1, 1000, 70_000, 300_000, 1_500_000))
    return rng.randbytes(size)


# -- the upload paths ---------------------------------------------------------------------------


def native_upload(stub: gallery_pb2_grpc.GalleryServiceStub, auth_md, device: str, data: bytes) -> str:
    def parts() -> Iterator[pb.UploadEventRequest]:
        yield pb.UploadEventRequest(header=pb.UploadHeader(device=device, name="n.bin", size=len(data)))
        for start in range(0, len(data), CHUNK):
            yield pb.UploadEventRequest(media_chunk=data[start:start + CHUNK])
        yield pb.UploadEventRequest(finish=pb.UploadFinish(sha256=hashlib.sha256(data).hexdigest()))

    return str(stub.UploadEvent(parts(), metadata=auth_md, timeout=10).event_id)


def resumable_upload(stub: gallery_pb2_grpc.GalleryServiceStub, auth_md, device: str, data: bytes) -> str:
    upload_id = uuid.uuid4().hex
    stub.StartUpload(pb.StartUploadRequest(
        device=device, name="r.bin", size=len(data), sha256=hashlib.sha256(data).hexdigest(),
        upload_id=upload_id,
    ), metadata=auth_md, timeout=10)

    def writes() -> Iterator[pb.WriteUploadRequest]:
        starts = list(range(0, len(data), CHUNK)) or [0]
        for start in starts:
            yield pb.WriteUploadRequest(
                device=device, upload_id=upload_id, write_offset=0,
                data=data[start:start + CHUNK], finish_write=start == starts[-1],
            )

    return str(stub.WriteUpload(writes(), metadata=auth_md, timeout=10).event_id)


def multipart_upload(http: httpx.Client, headers: dict[str, str], device: str, data: bytes) -> str:
    r = http.post(f"/api/gallery/{device}/upload", headers=headers,
                  files={"event": ("m.bin", data, "application/octet-stream")}, data={"name": "m.bin"})
    r.raise_for_status()
    return str(r.json()["eventId"])


def signed_upload(http: httpx.Client, headers: dict[str, str], device: str, data: bytes) -> str:
    r = http.get(f"/api/gallery/{device}/upload-url", params={"filename": "s.bin"}, headers=headers)
    r.raise_for_status()
    url = r.json()["upload_url"]
    put = http.put(url, content=data)
    put.raise_for_status()
    assert put.json()["eventId"] == r.json()["eventId"]
    return str(put.json()["eventId"])


# -- the server ---------------------------------------------------------------------------------


class Servers:
    """Forks server processes from a warm parent; each is SIGKILLed or SIGTERMed by pid."""

    def __init__(self, env: dict[str, str], log_dir: pathlib.Path, grpc_address: str) -> None:
        self.log_dir = log_dir
        self.grpc_address = grpc_address
        self.parent = subprocess.Popen(
            [sys.executable, str(FORKSERVER)], env=env, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True,
        )
        self.pid = 0
        self.started = 0

    def start(self) -> None:
        assert self.parent.stdin is not None and self.parent.stdout is not None
        self.started += 1
        self.parent.stdin.write(f"{self.log_dir / f'server-{self.started}.log'}\n")
        self.parent.stdin.flush()
        self.pid = int(self.parent.stdout.readline())
        # supervisor.wait_grpc_healthy would wait out grpc's 1 s reconnect backoff after the
        # first refused connection: here the channel retries every 10 ms instead.
        with grpc.insecure_channel(self.grpc_address, options=CHANNEL_OPTIONS) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=30, wait_for_ready=True
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

    def kill(self, sig: int = signal.SIGKILL) -> None:
        os.kill(self.pid, sig)
        deadline = time.monotonic() + 30
        while _alive(self.pid):  # the fork server ignores SIGCHLD: the pid goes once reaped
            assert time.monotonic() < deadline, f"server {self.pid} did not exit"
            time.sleep(0.002)

    def close(self) -> None:
        if self.pid and _alive(self.pid):
            os.kill(self.pid, signal.SIGKILL)
        for pipe in (self.parent.stdin, self.parent.stdout):
            if pipe is not None:
                pipe.close()
        self.parent.wait(timeout=10)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):  # gone, even between open() and read()
        return False


# -- the test -----------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def crash_database(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> Iterator[tuple[str, int]]:
    """(database URL, cycles): SQLite in the data root, or a fresh schema on the test PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'data' / 'gallery.db'}", CYCLES
        return
    yield request.getfixturevalue("postgres_url"), POSTGRES_CYCLES  # empty tables (postgres_url)


def test_sigkill_during_uploads_loses_nothing_acknowledged(
    tmp_path: pathlib.Path, crash_database: tuple[str, int]
) -> None:
    database_url, cycles = crash_database
    seed = int(os.environ.get("GALLERY_CRASH_SEED") or random.randrange(1 << 32))
    print(f"crash test seed: {seed} (GALLERY_CRASH_SEED={seed} replays it)")
    rng = random.Random(seed)
    run = Run(seed)
    data_dir = tmp_path / "data"
    http_port, grpc_port, admin_port = free_ports(3)
    grpc_address = f"127.0.0.1:{grpc_port}"
    env = {
        **os.environ,
        "GALLERY_DATA_DIR": str(data_dir),
        "GALLERY_JWT_SECRET": JWT_SECRET,
        "GALLERY_GRPC_ADDRESS": grpc_address,
        "GALLERY_PUBLIC_URL": f"http://127.0.0.1:{http_port}",
        "GALLERY_MAKE_THUMBNAILS": "false",
        "GALLERY_LOG_LEVEL": "WARNING",
        "GALLERY_INCOMING_SCAN_SECONDS": "0.05",
        "GALLERY_INCOMING_SETTLE_SECONDS": "0.05",
        # The servers reconcile once at each start, with the default grace of an hour: that
        # removes nothing of this test's files. The short-grace reconciler is the test's own.
        "GALLERY_RECONCILE_INTERVAL_SECONDS": "3600",
        "GALLERY_MIN_FREE_BYTES": "0",
        "GALLERY_DATABASE_URL": database_url,
        "GALLERY_DRAIN_SECONDS": "0",  # no Envoy health check to drain for
    }
    settings = Settings.from_env(env)
    data_dir.mkdir()
    servers = Servers(env, tmp_path, grpc_address)
    envoy = None
    token = auth.mint(JWT_SECRET, subject="crash", devices=["*"], scope=f"{auth.READ} {auth.WRITE}")
    auth_md = [("authorization", f"Bearer {token}")]
    headers = {"Authorization": f"Bearer {token}"}
    dropped: dict[str, tuple[str, bytes]] = {}  # name -> (device, bytes)
    incoming_device = "crash-incoming"
    incoming = data_dir / "gallery" / incoming_device / "incoming"
    incoming.mkdir(parents=True)
    started = time.monotonic()
    timings = {"start": 0.0, "join": 0.0}
    stop = threading.Event()
    running: list[threading.Thread] = []
    live = LiveReconciler(settings)
    try:
        servers.start()
        live.start()
        envoy = supervisor.start_envoy(
            dataclasses.replace(settings, http_address=f"127.0.0.1:{http_port}", envoy_admin_port=admin_port),
            [grpc_address],
        )
        supervisor.wait_envoy_ready(admin_port, process=envoy)
        with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=10) as http:
            # The run must acknowledge more uploads than it kills servers, on every path, to prove
            # anything. On a machine slowed down by its neighbours fewer complete per cycle (the
            # resumable path's three calls least of all: none in 42 cycles of one CI run): it then
            # goes on killing, up to three times the cycles, until they do.
            cycle = -1
            while (cycle := cycle + 1) < cycles or (
                (len(run.acks) <= cycles or not {a.path for a in run.acks} >= ACKNOWLEDGED_PATHS)
                and cycle < 3 * cycles
            ):
                if cycle:
                    t0 = time.monotonic()
                    servers.start()
                    timings["start"] += time.monotonic() - t0
                # An incoming drop each cycle, written under a temporary name, then renamed.
                name = f"drop-{cycle:04d}.bin"
                body = rng.randbytes(rng.choice((1, 5000, 200_000)))
                (incoming / f".{name}.tmp").write_bytes(body)
                os.rename(incoming / f".{name}.tmp", incoming / name)
                dropped[name] = (incoming_device, body)
                stop.set()  # (the previous cycle's, already joined)
                stop = threading.Event()
                channel = grpc.insecure_channel(grpc_address, options=CHANNEL_OPTIONS)
                stub = gallery_pb2_grpc.GalleryServiceStub(channel)
                workers: list[tuple[str, Callable[[str, bytes], str]]] = [
                    ("native", lambda d, b, stub=stub: native_upload(stub, auth_md, d, b)),
                    ("native2", lambda d, b, stub=stub: native_upload(stub, auth_md, d, b)),
                    ("resumable", lambda d, b, stub=stub: resumable_upload(stub, auth_md, d, b)),
                    ("multipart", lambda d, b: multipart_upload(http, headers, d, b)),
                    ("signed", lambda d, b: signed_upload(http, headers, d, b)),
                ]
                seeds = [rng.randrange(1 << 32) for _ in workers]
                threads = [
                    threading.Thread(target=_work, args=(run, stop, kind, upload, random.Random(s)))
                    for (kind, upload), s in zip(workers, seeds, strict=True)
                ]
                for thread in threads:
                    thread.start()
                running.extend(threads)
                # Then kill, wherever the uploads are. Past the planned cycles (a path has not
                # completed yet: a loaded machine, whose servers take 0.6 s to start and whose
                # uploads are slow), the uploads get longer before the kill.
                time.sleep(rng.uniform(0.02, 0.3 if cycle < cycles else 0.8))
                servers.kill()
                stop.set()
                t0 = time.monotonic()
                for thread in threads:
                    thread.join(timeout=30)
                    assert not thread.is_alive(), f"seed {seed}: a client hung after the kill"
                timings["join"] += time.monotonic() - t0
                channel.close()
        crash_seconds = time.monotonic() - started

        # One more server: slow uploads outlive the live reconciler's grace period, then it is
        # stopped cleanly once it has imported every dropped file.
        servers.start()
        with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=30) as http, \
                grpc.insecure_channel(grpc_address, options=CHANNEL_OPTIONS) as channel:
            _slow_uploads(run, gallery_pb2_grpc.GalleryServiceStub(channel), auth_md, http, headers, rng)
        deadline = time.monotonic() + 60
        while any(p.name.startswith("drop-") for p in incoming.iterdir()):
            assert time.monotonic() < deadline, f"seed {seed}: incoming never drained"
            time.sleep(0.05)
        servers.kill(signal.SIGTERM)
    finally:
        stop.set()  # a failed cycle must not leave clients running
        for thread in running:
            thread.join(timeout=30)
        live.stop()
        servers.close()
        if envoy is not None:
            envoy.terminate()
            envoy.wait(timeout=15)

    print(f"crash test ({database_url.split(':')[0]}): {cycle} SIGKILLs in {crash_seconds:.1f} s, "
          f"{len(run.acks)} uploads acknowledged, {run.errors} cut off, {len(dropped)} incoming drops; {timings}")
    assert len(run.acks) > cycles, f"seed {seed}: too few uploads completed to prove anything"
    assert {a.path for a in run.acks} >= ACKNOWLEDGED_PATHS, f"seed {seed}: a path never completed"
    assert live.passes > 1 and not live.errors, f"seed {seed}: live reconciler {live.errors[:1]}"
    _verify(settings, run, dropped)


class LiveReconciler:
    """Another replica's reconciler, in the test process: grace LIVE_GRACE, a pass every LIVE_INTERVAL."""

    def __init__(self, settings: Settings) -> None:
        self.db = Database(settings.database_url, pool_size=2)
        self.reconciler = Reconciler(Gallery(settings, self.db, Storage(settings.data_dir)),
                                     grace_seconds=LIVE_GRACE)
        self.done = threading.Event()
        self.passes = 0
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, name="live-reconciler")

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(LIVE_INTERVAL):
            try:
                self.reconciler.run_once()
                self.passes += 1
            except sa.exc.OperationalError:  # SQLite busy under the load: the next pass retries
                continue
            except Exception as exc:  # noqa: BLE001  (asserted by the test)
                self.errors.append(exc)

    def stop(self) -> None:
        self.done.set()
        if self.thread.is_alive():
            self.thread.join(timeout=60)
        self.db.dispose()


def _slow_uploads(run: Run, stub: gallery_pb2_grpc.GalleryServiceStub, auth_md,
                  http: httpx.Client, headers: dict[str, str], rng: random.Random) -> None:
    """Uploads whose first file waits longer than the live reconciler's grace period: each must
    be stored whole, thumbnail included."""
    thumbnail = b"\xff\xd8\xff" + rng.randbytes(2000)
    data = rng.randbytes(8 * CHUNK)

    def native_parts() -> Iterator[pb.UploadEventRequest]:
        yield pb.UploadEventRequest(header=pb.UploadHeader(device="crash-slow", name="slow.bin"))
        yield pb.UploadEventRequest(thumbnail_chunk=thumbnail)
        for start in range(0, len(data), CHUNK):
            time.sleep(SLOW_SECONDS / 8)
            yield pb.UploadEventRequest(media_chunk=data[start:start + CHUNK])
        yield pb.UploadEventRequest(finish=pb.UploadFinish())

    native = stub.UploadEvent.future(native_parts(), metadata=auth_md, timeout=60)
    urls = http.get("/api/gallery/crash-slow/upload-url", headers=headers,
                    params={"filename": "slow.jpg", "thumbnail": "true"}).json()
    assert http.put(urls["thumbnail_upload_url"], content=thumbnail).status_code == 200
    time.sleep(SLOW_SECONDS)
    signed = http.put(urls["upload_url"], content=data)
    assert signed.status_code == 200, f"seed {run.seed}: {signed.text}"
    run.ack("slow-signed", "crash-slow", signed.json()["eventId"], data)
    run.ack("slow-native", "crash-slow", native.result().event_id, data)
    for ack in run.acks[-2:]:
        r = http.get(f"/api/gallery/crash-slow/events/{ack.event_id}/thumbnail", headers=headers)
        assert (r.status_code, r.content) == (200, thumbnail), f"seed {run.seed}: {ack} lost its thumbnail"


def _work(run: Run, stop: threading.Event, kind: str, upload: Callable[[str, bytes], str],
          rng: random.Random) -> None:
    device = f"crash-{kind}"
    while not stop.is_set():
        data = payload(rng)
        try:
            event_id = upload(device, data)
        except (grpc.RpcError, httpx.HTTPError):
            run.fail()
            time.sleep(0.005)
            continue
        run.ack(kind, device, event_id, data)


def _verify(settings: Settings, run: Run, dropped: dict[str, tuple[str, bytes]]) -> None:
    seed = run.seed
    db = Database(settings.database_url, pool_size=2)
    try:
        storage = Storage(settings.data_dir)
        with db.session() as session:
            rows = {e.id: e for e in session.exec(select(Event))}

        # No row points at a missing or short file, before any reconciliation.
        for event in rows.values():
            path = storage.media_path(event.device, event.id)
            assert path.is_file(), f"seed {seed}: row {event.id} has no file"
            assert path.stat().st_size == event.size, f"seed {seed}: row {event.id} points at a short file"

        # Every acknowledged upload is there, with its bytes.
        for ack in run.acks:
            event = rows.get(ack.event_id)
            assert event is not None, f"seed {seed}: acknowledged {ack} lost"
            assert (event.device, event.sha256, event.size) == (ack.device, ack.sha256, ack.size), (
                f"seed {seed}: acknowledged {ack} stored as {event}"
            )
            on_disk = hashlib.sha256(storage.media_path(ack.device, ack.event_id).read_bytes()).hexdigest()
            assert on_disk == ack.sha256, f"seed {seed}: bytes of {ack} changed on disk"
        assert len({a.event_id for a in run.acks}) == len(run.acks), f"seed {seed}: an event id acked twice"

        # Every dropped file was imported exactly once, with its bytes.
        for name, (device, body) in dropped.items():
            imported = [e for e in rows.values() if e.device == device and e.name == name]
            assert len(imported) == 1, f"seed {seed}: {name} imported {len(imported)} times"
            assert imported[0].sha256 == hashlib.sha256(body).hexdigest()
            assert storage.media_path(device, imported[0].id).read_bytes() == body, f"seed {seed}: {name}"

        # Every open session has its file, with at least its committed bytes.
        with db.session() as session:
            open_rows = list(session.exec(select(UploadSessionRow).where(sa.column("event_id").is_(None))))
        for row in open_rows:
            path = storage.session_path(row.device, row.upload_id)
            assert path.is_file(), f"seed {seed}: session {row.upload_id} lost its file"
            assert path.stat().st_size >= row.committed_size, f"seed {seed}: {path} lost committed bytes"

        # Files in media/ are rows' files or orphans; reconciliation removes exactly the orphans,
        # but for a killed pre-signed PUT's media at the id of a URL that can still complete
        # (no PUT takes its URL: its retry replaces the leftover, signed_urls.py).
        media = [p for p in storage.media_root.rglob("*") if p.is_file()]
        orphans = [p for p in media if p.name.removesuffix(".thumb") not in rows]
        with db.session() as session:
            unused = {g.event_id for g in session.exec(select(UploadGrant)) if g.media_state in GRANT_UNUSED}
        waiting = [p for p in orphans if p.name in unused]
        findings = Reconciler(Gallery(settings, db, storage), grace_seconds=0).run_once()
        by_path: dict[str, int] = {}
        for orphan in orphans:
            by_path[orphan.parent.name] = by_path.get(orphan.parent.name, 0) + 1
        print(f"crash test reconciliation: {findings.to_json()}; orphans by device: {by_path};"
              f" waiting for their URL's retry: {len(waiting)}")
        assert findings.missing_media == findings.size_mismatch == 0, f"seed {seed}: {findings}"
        assert all(p.parent.name == "crash-signed" for p in waiting), f"seed {seed}: {waiting}"
        removed = findings.orphan_media_removed + findings.orphan_thumbnails_removed
        assert removed == len(orphans) - len(waiting), f"seed {seed}: {findings}, {orphans}"
        left = sorted(p for p in storage.media_root.rglob("*") if p.is_file())
        kept = [storage.media_path(e.device, e.id) for e in rows.values()] + waiting
        kept += [storage.thumbnail_path(e.device, e.id) for e in rows.values() if e.has_thumbnail]
        assert left == sorted(kept), f"seed {seed}"

        # staging/ holds only live resumable sessions, each with at least its committed bytes.
        with db.session() as session:
            open_sessions = {
                (s.device, s.upload_id): s.committed_size
                for s in session.exec(select(UploadSessionRow).where(
                    sa.column("event_id").is_(None)))
            }
        locks = storage.staging_root / incoming.LOCKS_FOLDER  # one per device, kept
        for path in (p for p in storage.staging_root.rglob("*") if p.is_file() and p.parent != locks):
            key = (path.parent.name, path.name)
            assert path.parent.parent == storage.staging_root / "sessions" and key in open_sessions, (
                f"seed {seed}: {path} left in staging after reconciliation"
            )
            assert path.stat().st_size >= open_sessions[key], f"seed {seed}: {path} lost committed bytes"

        again = Reconciler(Gallery(settings, db, storage), grace_seconds=0).run_once()
        assert again.staging_removed == again.orphan_media_removed == again.orphan_thumbnails_removed == 0
    finally:
        db.dispose()


pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the crash test forks servers")
