"""A small closed-loop HTTP/1.1 load generator: N keep-alive connections, each sending its next
request as soon as the previous response is complete, for a fixed time.

It runs in a process of its own, one for the whole benchmark (multiprocessing, so the benchmark's
other threads do not share its GIL), uses one selector loop and httptools' C parser (chunked
bodies included), and costs a few tens of microseconds of CPU per request: on a 2-vCPU machine a
Python thread pool with httpx would be the bottleneck long before the server is.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import selectors
import socket
import threading
import time

import httptools


@dataclasses.dataclass
class LoadResult:
    requests: int
    seconds: float
    latencies_ms: list[float]  # every completed request
    statuses: dict[int, int]
    sample_bodies: list[bytes]  # the first few complete bodies, for checking
    sample_requests: list[int]  # which of the requests each answers (its index in the list given)
    errors: list[str]

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


class _Connection:
    def __init__(self, host: str, port: int, requests: list[bytes], offset: int) -> None:
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.requests = requests
        self.index = offset
        self.parser = httptools.HttpResponseParser(self)
        self.body = bytearray()
        self.complete = False
        self.sent_at = 0.0

    # httptools callbacks
    def on_body(self, data: bytes) -> None:
        self.body += data

    def on_message_complete(self) -> None:
        self.complete = True

    def send(self) -> None:
        request = self.requests[self.index % len(self.requests)]
        self.index += 1
        self.body = bytearray()
        self.complete = False
        self.parser = httptools.HttpResponseParser(self)
        self.sent_at = time.perf_counter()
        self.sock.setblocking(True)
        self.sock.sendall(request)
        self.sock.setblocking(False)


def _run(host: str, port: int, requests: list[bytes], connections: int, seconds: float,
         samples: int) -> LoadResult:
    selector = selectors.DefaultSelector()
    # Each connection starts its own stretch of `requests`: given a walk of distinct pages, no two
    # ask for the same one (unless a connection gets through its whole stretch).
    conns = [_Connection(host, port, requests, i * len(requests) // connections) for i in range(connections)]
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    bodies: list[bytes] = []
    answered: list[int] = []
    errors: list[str] = []
    for conn in conns:
        selector.register(conn.sock, selectors.EVENT_READ, conn)
    started = time.perf_counter()
    deadline = started + seconds
    for conn in conns:
        conn.send()
    active = len(conns)
    while active:
        for key, _ in selector.select(timeout=5):
            conn = key.data
            try:
                data = conn.sock.recv(1 << 18)
            except BlockingIOError:
                continue
            if not data:
                errors.append("connection closed by the server")
                selector.unregister(conn.sock)
                active -= 1
                continue
            try:
                conn.parser.feed_data(data)
            except httptools.HttpParserError as exc:
                errors.append(f"bad response: {exc}")
            if not conn.complete:
                continue
            now = time.perf_counter()
            latencies.append((now - conn.sent_at) * 1000)
            status = conn.parser.get_status_code()
            statuses[status] = statuses.get(status, 0) + 1
            if len(bodies) < samples:
                bodies.append(bytes(conn.body))
                answered.append((conn.index - 1) % len(requests))
            if now < deadline:
                conn.send()
            else:
                selector.unregister(conn.sock)
                active -= 1
        if time.perf_counter() > deadline + 30:
            errors.append(f"{active} requests still unanswered 30 s after the end")
            break
    elapsed = time.perf_counter() - started
    for conn in conns:
        conn.sock.close()
    return LoadResult(len(latencies), elapsed, latencies, statuses, bodies, answered, errors)


def _serve(jobs: multiprocessing.Queue, results: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    while True:  # until the benchmark ends (a daemon)
        job = jobs.get()
        try:
            results.put(_run(*job))
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            results.put(exc)


# The child process that drives the load, started at the first run and kept: a child spawned per
# run imported the benchmark's whole __main__ again (grpc, SQLAlchemy, ...), about 1.1 s each on
# a 2-vCPU VM, and the quick run makes some 25 of them.
_worker: tuple[multiprocessing.process.BaseProcess, multiprocessing.Queue, multiprocessing.Queue] | None = None  # type: ignore[type-arg]
# One run at a time: the child's answers are taken in order.
_one_run = threading.Lock()


def run(url_host: str, port: int, requests: list[bytes], *, connections: int = 16, seconds: float = 5.0,
        samples: int = 4) -> LoadResult:
    """Drive `requests` (raw HTTP/1.1 requests, cycled) from the child process; returns when done."""
    with _one_run:
        return _run_in_child(url_host, port, requests, connections, seconds, samples)


def _run_in_child(url_host: str, port: int, requests: list[bytes], connections: int, seconds: float,
                  samples: int) -> LoadResult:
    global _worker
    if _worker is None or not _worker[0].is_alive():
        context = multiprocessing.get_context("spawn")
        jobs, results = context.Queue(), context.Queue()
        child = context.Process(target=_serve, args=(jobs, results), daemon=True)  # ends with the benchmark
        child.start()
        _worker = (child, jobs, results)
    _, jobs, results = _worker
    jobs.put((url_host, port, requests, connections, seconds, samples))
    try:
        result = results.get(timeout=seconds + 120)
    except BaseException:
        _worker[0].kill()  # a run still under way would answer the next one
        _worker = None
        raise
    if isinstance(result, Exception):
        raise result
    return result


def get_request(host: str, port: int, path: str, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()
