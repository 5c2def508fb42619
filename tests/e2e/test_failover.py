"""Two replicas on one PostgreSQL and one data root behind one real Envoy: stopping one (SIGTERM,
as a rolling restart does) fails no request, and killing one (SIGKILL) fails no read but a
listing it was answering at that moment; uploads sent to it fail (503, retryable) only until
Envoy's health check has seen it gone.

A stopped replica first reports NOT_SERVING while it goes on serving (GALLERY_DRAIN_SECONDS), so
Envoy's health check (every second) moves new calls to the other; a call that a gone replica
refused or never got is retried by Envoy on the other, and so is a read it dropped (envoy.yaml,
retry_policy; uploads are not retried). Before, a stopped or killed replica's share of every kind
of call got 503 SERVER_UNAVAILABLE for the seconds, up to a minute, Envoy took to notice."""

from __future__ import annotations

import contextlib
import hashlib
import pathlib
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import httpx
import pytest
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gallery.v1 import gallery_pb2, gallery_pb2_grpc
from gallery_server import envoy_config, supervisor
from gallery_server.local_stack import free_ports

from ..conftest import random_bytes
from .test_metrics import scrape
from .test_rest_contract import Part, post_form
from .test_resumable_cuts import Server

DEVICE = "failover-cam"


def healthy_backends(admin: int) -> int:
    clusters = httpx.get(f"http://127.0.0.1:{admin}/clusters", timeout=5).text
    return sum(1 for line in clusters.splitlines()
               if line.startswith("gallery_grpc::") and line.endswith("::health_flags::healthy"))


def wait_healthy(admin: int, count: int) -> None:
    deadline = time.monotonic() + 30
    while healthy_backends(admin) != count:
        assert time.monotonic() < deadline, httpx.get(f"http://127.0.0.1:{admin}/clusters").text
        time.sleep(0.1)


@contextlib.contextmanager
def behind_envoy(tmp_path: pathlib.Path, replicas: list[Server]) -> Iterator[tuple[str, int]]:
    """A real Envoy in front of the replicas (started or not); yields (REST base URL, admin port)."""
    listen, admin = free_ports(2)
    config = tmp_path / "envoy.yaml"
    config.write_text(envoy_config.render(
        listen=f"127.0.0.1:{listen}", admin_port=admin, backends=[r.address for r in replicas],
        media_root=replicas[0].data_dir / "media",
    ), encoding="utf-8")
    with (tmp_path / "envoy.log").open("wb") as log:
        envoy = subprocess.Popen([supervisor.envoy_binary(), "-c", str(config), "--disable-hot-restart",
                                  "--log-level", "warn"], stdout=log, stderr=log)
    try:
        supervisor.wait_envoy_ready(admin, process=envoy)
        yield f"http://127.0.0.1:{listen}", admin
    finally:
        envoy.terminate()
        envoy.wait(timeout=30)
        for replica in replicas:
            replica.stop()


@pytest.fixture
def replicated(
    request: pytest.FixtureRequest, tmp_path: pathlib.Path, postgres_url: str,
) -> Iterator[tuple[list[Server], str, int]]:
    """([replica 0, replica 1], Envoy's REST base URL, Envoy's admin port). Their
    GALLERY_DRAIN_SECONDS is the fixture's parameter (indirect), else 0: a drain makes each stop,
    the fixture's own at the end included, that much longer."""
    drain = str(getattr(request, "param", 0))
    replicas = [Server(tmp_path, name=f"replica-{n}",
                       env={"GALLERY_DATABASE_URL": postgres_url, "GALLERY_DRAIN_SECONDS": drain})
                for n in range(2)]
    with behind_envoy(tmp_path, replicas) as (base_url, admin):  # stops them, started or not
        for replica in replicas:  # together: each start is mostly waiting
            replica.start(wait_healthy=False)
        for replica in replicas:
            supervisor.wait_grpc_healthy(replica.address, process=replica.process, listening=True)
        wait_healthy(admin, 2)
        yield replicas, base_url, admin


class Traffic:
    """Clients on threads until stopped: reads (stats, a listing, a download) and uploads, each
    answer recorded as (what, HTTP status)."""

    def __init__(self, base_url: str, headers: dict[str, str], stored: tuple[str, bytes]) -> None:
        self.base_url, self.headers, self.stored = base_url, headers, stored
        self.answers: list[tuple[str, int, float]] = []  # (what, HTTP status, time.monotonic())
        self.uploaded: list[str] = []
        self._stop = threading.Event()
        # Two clients of each read: a killed replica leaves more than three calls to retry at
        # once (Envoy's default limit on retries in flight was 3).
        reads = (self._stats, self._list, self._download)
        self._threads = [threading.Thread(target=self._loop, args=(work,))
                         for work in (*reads, *reads, self._upload, self._upload)]

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def failures(self, what: str | None = None, since: float = 0.0) -> list[tuple[str, int, float]]:
        return [a for a in self.answers if a[1] != 200 and what in (None, a[0]) and a[2] >= since]

    def _loop(self, work: Callable[[httpx.Client], tuple[str, int]]) -> None:
        with httpx.Client(base_url=self.base_url, timeout=30) as http:
            while not self._stop.is_set():
                try:
                    what, status = work(http)
                except httpx.TransportError as exc:
                    what, status = f"{work.__name__}: {exc!r}", 0
                self.answers.append((what, status, time.monotonic()))

    def _stats(self, http: httpx.Client) -> tuple[str, int]:
        return "stats", http.get(f"/api/gallery/{DEVICE}/stats", headers=self.headers).status_code

    def _list(self, http: httpx.Client) -> tuple[str, int]:
        return "list", http.get(f"/api/gallery/{DEVICE}/events?limit=5", headers=self.headers).status_code

    def _download(self, http: httpx.Client) -> tuple[str, int]:
        event_id, data = self.stored
        r = http.get(f"/api/gallery/{DEVICE}/events/{event_id}/content", headers=self.headers)
        assert r.status_code != 200 or r.content == data
        return "download", r.status_code

    def _upload(self, http: httpx.Client) -> tuple[str, int]:
        parts: list[Part] = [("name", "clip.bin"), ("event", ("clip.bin", random_bytes(20_000)))]
        r = post_form(http, DEVICE, self.headers, parts)
        if r.status_code == 200:
            self.uploaded.append(r.json()["eventId"])
        return "upload", r.status_code


@pytest.mark.parametrize("replicated", [5], indirect=True, ids=["drain 5 s"])
def test_a_replica_stopped_fails_no_request_and_one_killed_no_read(
    replicated: tuple[list[Server], str, int], mint: Callable[..., str],
) -> None:
    replicas, base_url, admin = replicated
    headers = {"Authorization": f"Bearer {mint(devices=[DEVICE], scope='gallery:read gallery:write')}"}
    data = random_bytes(300_000)
    with httpx.Client(base_url=base_url, timeout=30) as http:
        r = post_form(http, DEVICE, headers, [("name", "kept.bin"), ("event", ("kept.bin", data))])
        assert r.status_code == 200, r.text
    stored = (r.json()["eventId"], data)

    # A rolling restart's step: SIGTERM, which waits for the replica to exit (drain included).
    with Traffic(base_url, headers, stored) as stopping:
        time.sleep(1)
        replicas[0].stop()
        time.sleep(1.5)
    assert replicas[0].process is not None and replicas[0].process.returncode == 0
    assert len(stopping.answers) > 50 and stopping.failures() == [], stopping.failures()[:10]
    replicas[0].start()
    wait_healthy(admin, 2)

    # A crash: reads are retried on the other replica; uploads sent to the killed one fail with a
    # retryable 503 until Envoy's health check has seen it gone (two checks a second apart). A
    # listing is the one read that can fail too, once: its server sends the page token header
    # ahead of the page (grpcio has no way to send them together), and Envoy retries no call
    # whose answer has begun; so a listing the killed replica was answering just then fails.
    with Traffic(base_url, headers, stored) as killing:
        time.sleep(1)
        killed = time.monotonic()
        replicas[1].kill()
        time.sleep(5)
    assert len(killing.answers) > 50
    assert [a for a in killing.failures() if a[0] not in ("upload", "list")] == [], killing.failures()[:10]
    lists = killing.failures("list")
    assert len(lists) <= 2 and all(t < killed + 1 for _, _, t in lists), lists  # 2 listing clients
    assert {status for _, status, _ in killing.failures()} <= {503}
    assert killing.failures("upload", since=killed + 3.5) == []

    listed: list[dict[str, object]] = []
    with httpx.Client(base_url=base_url, timeout=30) as http:
        while True:  # every page: a quiet machine uploads more than a page's 1,000 meanwhile
            page = http.get(f"/api/gallery/{DEVICE}/events", params={"limit": 1000, "offset": len(listed)},
                            headers=headers).json()
            listed += page
            if len(page) < 1000:
                break
    listed_ids = {e["id"] for e in listed}
    assert set(stopping.uploaded) | set(killing.uploaded) <= listed_ids
    assert hashlib.sha256(data).hexdigest() in {e["sha256"] for e in listed}


class Reads:
    """Reads of every kind through Envoy, REST and native, downloads included, each on a
    connection of its own (REST) or one channel (native): `at_once` runs `times` of each on
    threads and records (what, HTTP status or gRPC code, body, seconds).

    Each kind of download has a token of its own: a download holds one of its token's slots on
    its replica (4 per device: Gallery.download_slot), and a hedge runs it on both replicas at
    once, so the downloads of three kinds on one token could pass that share on each replica,
    answered 429 TOO_MANY_DOWNLOADS (1 run in 4 when every replica hung, then went on at once)."""

    def __init__(self, base_url: str, mint: Callable[..., str], event_id: str) -> None:
        self.base_url, self.event_id = base_url, event_id

        def bearer(subject: str) -> str:
            return f"Bearer {mint(devices=[DEVICE], scope='gallery:read', sub=subject)}"

        self.headers = {"Authorization": bearer("reader")}
        self.metadata = [("authorization", self.headers["Authorization"])]
        downloads = {kind: [("authorization", bearer(kind))] for kind in ("rest", "content", "read")}
        self.answers: list[tuple[str, int, bytes, float]] = []
        events = f"/api/gallery/{DEVICE}/events"
        self.kinds: dict[str, Callable[[gallery_pb2_grpc.GalleryServiceStub], tuple[int, bytes]]] = {
            "stats": self._rest(f"/api/gallery/{DEVICE}/stats"),
            "list": self._rest(f"{events}?limit=5"),
            "list, tag not current": self._rest(f"{events}?limit=5", {"if-none-match": '"x"'}),  # Lua's route
            "event": self._rest(f"{events}/{event_id}"),
            "paths": self._rest(f"/api/gallery/{DEVICE}/paths"),
            "download": self._rest(f"{events}/{event_id}/content", {"Authorization": downloads["rest"][0][1]}),
            "native GetEvent": self._native(lambda stub: stub.GetEvent(
                gallery_pb2.GetEventRequest(device=DEVICE, event_id=event_id), metadata=self.metadata, timeout=20)),
            "native ListEvents": self._native(lambda stub: list(stub.ListEvents(
                gallery_pb2.ListEventsRequest(device=DEVICE, limit=5), metadata=self.metadata, timeout=20))),
            "native GetEventContent": self._native(lambda stub: list(stub.GetEventContent(
                gallery_pb2.GetEventContentRequest(device=DEVICE, event_id=event_id),
                metadata=downloads["content"], timeout=20))),
            "native ReadEventContent": self._native(lambda stub: list(stub.ReadEventContent(
                gallery_pb2.ReadEventContentRequest(device=DEVICE, event_id=event_id),
                metadata=downloads["read"], timeout=20))),
        }

    def _rest(self, path: str, extra: dict[str, str] | None = None) -> Callable[..., tuple[int, bytes]]:
        def read(_: object) -> tuple[int, bytes]:
            with httpx.Client(base_url=self.base_url, timeout=20) as client:
                try:
                    answer = client.get(path, headers={**self.headers, **(extra or {})})
                except httpx.TransportError as exc:
                    return 0, repr(exc).encode()
            return answer.status_code, answer.content
        return read

    @staticmethod
    def _native(call: Callable[[gallery_pb2_grpc.GalleryServiceStub], object]) -> Callable[..., tuple[int, bytes]]:
        def read(stub: gallery_pb2_grpc.GalleryServiceStub) -> tuple[int, bytes]:
            try:
                answer = call(stub)
            except grpc.RpcError as exc:
                return exc.code().value[0], str(exc.details()).encode()
            return 200, repr(answer).encode()
        return read

    def at_once(self, times: int, meanwhile: Callable[[], None] = lambda: None) -> None:
        """Starts every read `times` over, runs `meanwhile`, and waits for all of them."""
        with grpc.insecure_channel(self.base_url.removeprefix("http://")) as channel:
            stub = gallery_pb2_grpc.GalleryServiceStub(channel)

            def timed(what: str) -> None:
                started = time.monotonic()
                status, body = self.kinds[what](stub)
                self.answers.append((what, status, body, time.monotonic() - started))

            threads = [threading.Thread(target=timed, args=(what,)) for what in self.kinds for _ in range(times)]
            for thread in threads:
                thread.start()
            meanwhile()
            for thread in threads:
                thread.join()

    def assert_all_answered(self) -> None:
        assert len(self.answers) > 0
        assert [(what, status) for what, status, _, _ in self.answers if status != 200] == [], self.summary()
        for what, _, body, _ in self.answers:
            expected = {"download": b"kept", "native GetEventContent": b'data: "kept"',
                        "native ReadEventContent": b'data: "kept"', "stats": b'"total_events":1,',
                        "paths": DEVICE.encode()}
            assert expected.get(what, self.event_id.encode()) in body, (what, body)

    def seconds(self, *, download: bool) -> list[float]:
        return [seconds for what, *_, seconds in self.answers if (what == "download") == download]

    def summary(self) -> list[tuple[float, str, int, bytes]]:
        """(seconds, what, status, the body's start) of every answer, the fastest first."""
        return sorted((round(seconds, 2), what, status, body[:80]) for what, status, body, seconds in self.answers)


@pytest.fixture
def reads(replicated: tuple[list[Server], str, int], mint: Callable[..., str]) -> Reads:
    _, base_url, _ = replicated
    token = mint(devices=[DEVICE], scope="gallery:read gallery:write")
    with httpx.Client(base_url=base_url, timeout=30) as http:
        r = post_form(http, DEVICE, {"Authorization": f"Bearer {token}"},
                      [("name", "kept.bin"), ("event", ("kept.bin", b"kept"))])
        assert r.status_code == 200, r.text
    return Reads(base_url, mint, r.json()["eventId"])


@contextlib.contextmanager
def stopped(*replicas: Server) -> Iterator[Callable[[], None]]:
    """The replicas hang (SIGSTOP: a frozen VM, a process stuck on a disk), their connections open,
    until the end of the block or a call of what it yields."""
    processes = [replica.process for replica in replicas]

    def resume() -> None:
        for process in processes:
            process.send_signal(signal.SIGCONT)  # type: ignore[union-attr]

    assert all(process is not None for process in processes)
    try:
        for process in processes:
            process.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
        yield resume
    finally:
        resume()


def test_a_replica_that_hangs_holds_no_read_past_the_hedge(
    replicated: tuple[list[Server], str, int], reads: Reads,
) -> None:
    """Envoy's health check takes a replica that hangs out after two missed checks; reads sent to
    it before that are sent to the other replica as well once they have waited
    READ_HEDGE_AFTER_SECONDS, and the first answer wins (envoy.yaml, hedge_policy). Before, each
    such read waited 30 s for a 504 (REST) or 60 s for DEADLINE_EXCEEDED (native)."""
    replicas, _, admin = replicated
    with stopped(replicas[0]):
        # Three of each at once: Envoy sends every other call to the replica that hangs (round
        # robin), as its health check has not missed twice yet.
        reads.at_once(3)
    reads.assert_all_answered()
    slowest = max(reads.seconds(download=False))
    assert slowest < envoy_config.READ_HEDGE_AFTER_SECONDS + 3, reads.summary()
    # Not a test that passes with no read sent to the replica that hung: some waited for the hedge.
    assert slowest > envoy_config.READ_HEDGE_AFTER_SECONDS, reads.summary()
    # A REST download's Check (the file handoff's) sent to it waits out ext_authz's 5 s (envoy.yaml),
    # then the download goes by the transcoder to a replica the health check has taken out.
    assert max(reads.seconds(download=True)) < 5 + 3, reads.summary()
    wait_healthy(admin, 2)  # and it is taken back once it answers again


def test_a_download_longer_than_the_hedge_delay_is_neither_cut_nor_sent_twice(
    replicated: tuple[list[Server], str, int], mint: Callable[..., str],
) -> None:
    """A read's per-try timeout only sends a hedge while no answer has begun (Envoy ignores it
    after: the router's UpstreamRequest::onPerTryTimeout): a native download that a slow reader
    takes longer than the hedge delay for goes on, from one replica, to its last byte."""
    replicas, base_url, _ = replicated
    token = mint(devices=[DEVICE], scope="gallery:read gallery:write")
    data = random_bytes(48 << 20)  # 48 messages, far more than Envoy's and the client's windows hold
    with httpx.Client(base_url=base_url, timeout=30) as http:
        r = post_form(http, DEVICE, {"Authorization": f"Bearer {token}"},
                      [("name", "long.bin"), ("event", ("long.bin", data))])
        assert r.status_code == 200, r.text
    request = gallery_pb2.GetEventContentRequest(device=DEVICE, event_id=r.json()["eventId"])

    def served() -> list[int]:  # each replica's access lines of GetEventContent
        return [sum('"message": "rpc"' in line and 'GalleryService/GetEventContent"' in line
                    for line in replica.log_path.read_text().splitlines()) for replica in replicas]

    served_before = served()
    received, started = bytearray(), time.monotonic()
    with grpc.insecure_channel(base_url.removeprefix("http://")) as channel:
        stream = gallery_pb2_grpc.GalleryServiceStub(channel).GetEventContent(
            request, metadata=[("authorization", f"Bearer {token}")], timeout=60)
        for message in stream:
            received += message.data
            if time.monotonic() - started < envoy_config.READ_HEDGE_AFTER_SECONDS + 1:
                time.sleep(0.25)  # a slow reader: the windows fill, and the server waits to send
    assert time.monotonic() - started > envoy_config.READ_HEDGE_AFTER_SECONDS + 1
    assert received == data
    time.sleep(0.5)  # the access lines of both replicas are written after their answers
    attempts = [after - before for after, before in zip(served(), served_before, strict=True)]
    assert sorted(attempts) == [0, 1], attempts  # one attempt, never a hedge


def test_a_read_every_replica_is_slow_to_answer_is_answered_all_the_same(
    replicated: tuple[list[Server], str, int], reads: Reads,
) -> None:
    """A hedge cancels nothing: with every replica slow (both hang for longer than two hedge
    delays, then go on), each read gets the first answer, late, never a 504 at its hedge's time.
    A per-try timeout without hedging would cut each attempt and fail the read."""
    replicas, _, admin = replicated
    pause = 2 * envoy_config.READ_HEDGE_AFTER_SECONDS + 1
    def go_on_after_the_pause() -> None:
        time.sleep(pause)
        resume()

    with stopped(*replicas) as resume:
        reads.at_once(2, meanwhile=go_on_after_the_pause)
    reads.assert_all_answered()
    assert min(reads.seconds(download=False)) > pause - 0.5, reads.summary()
    wait_healthy(admin, 2)


# -- a replica that cannot do its work is taken out (rpc/readiness.py) ---------------------------


class Proxy:
    """A TCP relay to `target` on threads; cut() drops every connection and refuses new ones (a
    link down between one replica and the database), silence() keeps them and forwards nothing (a
    link that drops packets), heal() lets them through again."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self._cut = threading.Event()
        self._silent = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(self.target)  # closed by its pumps
            with self._lock:  # as cut() decides: none slips through a cut
                if self._cut.is_set():
                    client.close()
                    upstream.close()
                    continue
                self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if not self._silent.is_set():
                    sink.sendall(data)
        for s in (source, sink):  # the other direction's pump ends too
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def cut(self) -> None:
        with self._lock:
            self._cut.set()
            for s in self._open:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            self._open.clear()

    def silence(self) -> None:
        self._silent.set()

    def heal(self) -> None:
        self._cut.clear()
        self._silent.clear()

    def close(self) -> None:
        self.cut()
        self.listener.close()


def health_of(replica: Server) -> int:
    with grpc.insecure_channel(replica.address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def wait_for(what: Callable[[], bool], seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not what():
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_a_replica_cut_off_from_the_database_alone_is_taken_out(
    tmp_path: pathlib.Path, postgres_url: str, mint: Callable[..., str],
) -> None:
    """Its health says NOT_SERVING while it cannot reach the database (probed every second), so
    Envoy sends every call to the replica that can; it is SERVING again once the link is back.
    Before, it stayed SERVING and failed its share of every call, a third of them, for as long
    as the outage lasted."""
    url = sa.make_url(postgres_url)
    proxy = Proxy((url.host or "127.0.0.1", url.port or 5432))
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    [metrics_port] = free_ports(1)
    def database_up() -> float:  # 1 before the cut and after it is healed: the gauge is there
        return scrape(f"http://127.0.0.1:{metrics_port}/metrics")("gallery_database_up")
    replicas = [Server(tmp_path, name="direct", env={"GALLERY_DATABASE_URL": postgres_url}),
                Server(tmp_path, name="proxied", env={"GALLERY_DATABASE_URL": proxied,
                                                      "GALLERY_METRICS_ADDRESS": f"127.0.0.1:{metrics_port}"})]
    headers = {"Authorization": f"Bearer {mint(devices=[DEVICE], scope='gallery:read gallery:write')}"}
    try:
        with behind_envoy(tmp_path, replicas) as (base_url, admin), httpx.Client(base_url=base_url, timeout=30) as http:
            for replica in replicas:
                replica.start()
            wait_healthy(admin, 2)
            assert database_up() == 1
            proxy.cut()
            wait_for(lambda: health_of(replicas[1]) == health_pb2.HealthCheckResponse.NOT_SERVING)
            assert database_up() == 0
            wait_healthy(admin, 1)
            reads = [http.get(f"/api/gallery/{DEVICE}/stats", headers=headers) for _ in range(30)]
            assert [r.status_code for r in reads] == [200] * 30, [r.text for r in reads if r.status_code != 200]
            # Uploads are not retried by Envoy: each goes to the replica that can store it from
            # the moment the admin page shows the other failed (update_merge_window: 0s). Before,
            # the cut came within a second of the replicas' coming in, Envoy held the change until
            # that second ended, and every other upload went on to the cut replica: a 503.
            uploads = [post_form(http, DEVICE, headers, [("name", f"{n}.bin"), ("event", (f"{n}.bin", b"x"))])
                       for n in range(10)]
            assert [r.status_code for r in uploads] == [200] * 10, [r.text for r in uploads]
            proxy.heal()
            wait_for(lambda: health_of(replicas[1]) == health_pb2.HealthCheckResponse.SERVING)
            assert database_up() == 1
            wait_healthy(admin, 2)
    finally:
        proxy.close()
    log = replicas[1].log_path.read_text()
    assert '"message": "health: NOT_SERVING"' in log and '"message": "health: SERVING"' in log


def test_a_replica_whose_database_went_silent_is_taken_out_and_still_stops(
    tmp_path: pathlib.Path, postgres_url: str, mint: Callable[..., str],
) -> None:
    """A database that stops answering without closing the connection (packets dropped): the
    health probe is given 3 s (readiness.py), and SIGTERM ends the replica although a call still
    waits for the database. Before, it stayed SERVING, and its stop waited for ever on the
    handler's thread."""
    url = sa.make_url(postgres_url)
    proxy = Proxy((url.host or "127.0.0.1", url.port or 5432))
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    replica = Server(tmp_path, name="silenced", env={"GALLERY_DATABASE_URL": proxied})
    token = [("authorization", f"Bearer {mint(devices=[DEVICE], scope='gallery:read')}")]
    try:
        replica.start()
        with grpc.insecure_channel(replica.address) as channel:
            stub = gallery_pb2_grpc.GalleryServiceStub(channel)
            stub.GetStats(gallery_pb2.GetStatsRequest(device=DEVICE), metadata=token, timeout=10)
            proxy.silence()
            waiting = stub.GetStats.future(gallery_pb2.GetStatsRequest(device=DEVICE), metadata=token, timeout=60)
            # Within PROBE_SECONDS + PROBE_TIMEOUT_SECONDS (4 s); twice 10 s under the whole suite's load.
            wait_for(lambda: health_of(replica) == health_pb2.HealthCheckResponse.NOT_SERVING, 20)
            assert not waiting.done()  # its handler waits for the database
            assert replica.process is not None
            replica.process.terminate()
            stopped = time.monotonic()
            replica.process.wait(timeout=60)
        # The background loops (5 s in all), the grace (10 s), then 5 s for calls that hang.
        assert time.monotonic() - stopped < 35
    finally:
        replica.stop()
        proxy.close()
    log = replica.log_path.read_text()
    assert '"database_answering": false' in log
    assert "stopped with calls still waiting (for the database?): exiting without them" in log


def test_a_replica_on_another_data_folder_is_never_sent_calls(
    tmp_path: pathlib.Path, postgres_url: str, mint: Callable[..., str],
) -> None:
    """A replica whose shared volume did not mount sees none of the stored media the database
    names: it reports NOT_SERVING from its start. Before, it took its share of the uploads into a
    folder no other replica reads (acknowledged, then MEDIA_MISSING or DATA_LOSS elsewhere) and
    failed the others' downloads."""
    env = {"GALLERY_DATABASE_URL": postgres_url}
    shared = Server(tmp_path, name="shared", env=env)
    (tmp_path / "unmounted").mkdir()
    unmounted = Server(tmp_path / "unmounted", name="unmounted", env=env)
    headers = {"Authorization": f"Bearer {mint(devices=[DEVICE], scope='gallery:read gallery:write')}"}
    with behind_envoy(tmp_path, [shared, unmounted]) as (base_url, admin), \
            httpx.Client(base_url=base_url, timeout=30) as http:
        shared.start()
        wait_healthy(admin, 1)
        for n in range(5):  # Gallery.stored_media_found: a gallery of fewer is never taken for another
            first = post_form(http, DEVICE, headers, [("name", "first.bin"), ("event", ("first.bin", b"%d" % n))])
            assert first.status_code == 200, first.text
        unmounted.start(wait_healthy=False)
        wait_for(lambda: _answers(unmounted))
        assert health_of(unmounted) == health_pb2.HealthCheckResponse.NOT_SERVING
        time.sleep(2.5)  # Envoy's checks: it would be in after one SERVING answer
        assert healthy_backends(admin) == 1
        uploads = [post_form(http, DEVICE, headers, [("name", f"{n}.bin"), ("event", (f"{n}.bin", b"%d" % n))])
                   for n in range(12)]
        assert [r.status_code for r in uploads] == [200] * 12
        ids = [r.json()["eventId"] for r in uploads]
        assert all((shared.data_dir / "media" / DEVICE / event_id).is_file() for event_id in ids)
        assert not (unmounted.data_dir / "media" / DEVICE).exists()
        for event_id in ids:
            assert http.get(f"/api/gallery/{DEVICE}/events/{event_id}/content", headers=headers).status_code == 200
    assert "data folder holds none of the stored media the database names" in unmounted.log_path.read_text()


def _answers(replica: Server) -> bool:
    try:
        health_of(replica)
    except grpc.RpcError:
        return False
    return True
