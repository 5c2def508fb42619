"""Scenario: one large event downloaded whole on every path, against a plain-Python peer.

The event is uploaded once (native gRPC, direct; put in the page cache), then read back on each path
in turn, the order rotated each run: REST GET content through Envoy (received by httpx, or by a plain
socket with httptools' parser), native ReadEventContent direct and through Envoy, and the peers: a
separate Python process that sends the same stored file over loopback TCP (PeerSender), or as
HTTP/1.1 to httpx (HttpPeerSender). Every download is hashed as it arrives and checked against the
stored size and sha256 and what the server declared (check_received). Measured: throughput against the
peer received the same way, CPU per byte of each process, and the sender's and Envoy's memory.

fetch_grpc_envoy and check_received are shared with the profiles section (run.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import socket
import subprocess
import sys
import time
from collections.abc import Callable

import _stack
import grpc
import httptools
import httpx
from _common import (
    CHUNK_BYTES,
    DEVICE,
    REQUEST_TIMEOUT_S,
    Bench,
    BenchError,
    KiB,
    MiB,
    Section,
    cpu_now,
    fmt_size,
    md_table,
    median,
    median_of,
    rng,
    spread,
    text_table,
)
from _uploads import send_grpc_direct, verify_and_delete

from gallery.v1 import gallery_pb2 as pb
from gallery.v1 import gallery_pb2_grpc


@dataclasses.dataclass
class Received:
    """What one download delivered (hashed while received) and what the server declared."""

    size: int
    sha256: str
    declared_size: int | None  # x-content-length (None for the peer: it declares nothing)
    declared_sha256: str | None  # x-content-sha256
    etag: str | None
    first_byte_s: float  # request sent until the first body bytes arrived
    chunked: bool = False  # HTTP/1.1 chunked: streamed by the server (Envoy sends with a Content-Length)


@dataclasses.dataclass(frozen=True)
class DownloadPath:
    name: str
    via_envoy: bool
    fetch: Callable[[Bench, str, float], Received]  # (bench, event id, request time) -> what arrived
    peer: str = ""  # the peer row received the same way: the path's ÷ peer is against it


def _header_int(value: str | None, what: str) -> int:
    try:
        return int(value or "")
    except ValueError:
        raise BenchError(f"{what}: x-content-length {value!r} is not a number") from None


def fetch_rest(bench: Bench, event_id: str, started: float) -> Received:
    """GET .../events/{id}/content through Envoy, httpx streaming in 1 MiB pieces, hashed on receipt."""
    return _fetch_httpx(
        bench.http, f"/api/gallery/{DEVICE}/events/{event_id}/content", bench.auth_header, started, "REST download"
    )


def _fetch_httpx(
    client: httpx.Client, url: str, headers: dict[str, str], started: float, what: str, *, declares: bool = True
) -> Received:
    """A GET streamed by httpx in 1 MiB pieces, hashed on receipt; `declares`: the answer must carry
    the gallery's size, checksum and etag headers (the peer's carries none)."""
    hasher, size, first = hashlib.sha256(), 0, None
    with client.stream("GET", url, headers=headers) as response:
        if response.status_code != 200:
            response.read()
            raise BenchError(f"{what}: HTTP {response.status_code}: {response.text[:300]}")
        if response.headers.get("content-encoding"):
            raise BenchError(f"{what}: unexpected content-encoding {response.headers['content-encoding']}")
        for chunk in response.iter_raw(CHUNK_BYTES):
            if first is None:
                first = time.monotonic()
            hasher.update(chunk)
            size += len(chunk)
        declared = response.headers.get("x-content-length")
        return Received(
            size, hasher.hexdigest(), _header_int(declared, what) if declares else None,
            response.headers.get("x-content-sha256"), response.headers.get("etag"),
            (first or time.monotonic()) - started, response.headers.get("transfer-encoding") == "chunked",
        )


class _RawResponse:
    """httptools callbacks of one download: headers kept, body hashed as it arrives."""

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.hasher = hashlib.sha256()
        self.size = 0
        self.first: float | None = None
        self.done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, data: bytes) -> None:
        if self.first is None:
            self.first = time.monotonic()
        self.hasher.update(data)
        self.size += len(data)

    def on_message_complete(self) -> None:
        self.done = True


def fetch_rest_socket(bench: Bench, event_id: str, started: float) -> Received:
    """The same GET through Envoy with the receiving side of the peer: a plain socket, recv_into 1 MiB,
    httptools' C parser for the body; so the comparison with the peer is about the sending side."""
    port = bench.stack.http_port
    request = (
        f"GET /api/gallery/{DEVICE}/events/{event_id}/content HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {bench.token}\r\nConnection: close\r\n\r\n"
    ).encode()
    response = _RawResponse()
    parser = httptools.HttpResponseParser(response)
    buf = bytearray(CHUNK_BYTES)
    view = memoryview(buf)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(REQUEST_TIMEOUT_S)
        sock.sendall(request)
        while not response.done and (n := sock.recv_into(buf)):
            parser.feed_data(view[:n])
    if parser.get_status_code() != 200 or not response.done:
        raise BenchError(f"REST download (socket): HTTP {parser.get_status_code()}, complete={response.done}")
    headers = response.headers
    return Received(
        response.size, response.hasher.hexdigest(),
        _header_int(headers.get("x-content-length"), "REST download (socket)"),
        headers.get("x-content-sha256"), headers.get("etag"), (response.first or time.monotonic()) - started,
        headers.get("transfer-encoding") == "chunked",
    )


def _fetch_grpc(bench: Bench, channel: grpc.Channel, event_id: str, started: float) -> Received:
    stub = gallery_pb2_grpc.GalleryServiceStub(channel)
    hasher, size, first = hashlib.sha256(), 0, None
    try:
        call = stub.ReadEventContent(
            pb.ReadEventContentRequest(device=DEVICE, event_id=event_id),
            metadata=list(bench.auth_header.items()), timeout=REQUEST_TIMEOUT_S,
        )
        for message in call:
            if first is None:
                first = time.monotonic()
            hasher.update(message.data)
            size += len(message.data)
        metadata = dict(call.initial_metadata())
    except grpc.RpcError as exc:
        raise BenchError(f"gRPC ReadEventContent: {exc.code()} {exc.details()}") from None
    return Received(
        size, hasher.hexdigest(), _header_int(metadata.get("x-content-length"), "gRPC ReadEventContent"),
        metadata.get("x-content-sha256"), metadata.get("etag"), (first or time.monotonic()) - started,
    )


def fetch_grpc_direct(bench: Bench, event_id: str, started: float) -> Received:
    """Native ReadEventContent straight to the gRPC server (1 MiB messages)."""
    return _fetch_grpc(bench, bench.direct_channel, event_id, started)


def fetch_grpc_envoy(bench: Bench, event_id: str, started: float) -> Received:
    """Native ReadEventContent through Envoy's listener (h2c)."""
    return _fetch_grpc(bench, bench.envoy_channel, event_id, started)


# The peer's sender: a separate Python process (as the gRPC server is) that waits for a one-byte
# request, then reads the stored file with readinto into one 1 MiB buffer and writes each piece
# with sendall; it stays alive until the receiver closes, so that its CPU time and RSS can be read.
_SEND_FILE = r"""
buf = bytearray(1 << 20)
view = memoryview(buf)
with open(path, "rb", buffering=0) as f:
    while n := f.readinto(buf):
        sock.sendall(view[:n])
"""
_UNTIL_CLOSED = r"""
while sock.recv(65536):
    pass
sock.close()
"""
PEER_SENDER = r"""
import socket, sys
path, port = sys.argv[1], int(sys.argv[2])
sock = socket.create_connection(("127.0.0.1", port))
sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
sys.stdout.write("connected\n"); sys.stdout.flush()
if sock.recv(1) != b"G":
    sys.exit(2)
""" + _SEND_FILE + "sock.shutdown(socket.SHUT_WR)\n" + _UNTIL_CLOSED

# The same sender for an HTTP client: it accepts one connection, reads a request, writes a status
# line and a Content-Length, then the file as above.
PEER_HTTP_SENDER = r"""
import os, socket, sys
path = sys.argv[1]
listener = socket.create_server(("127.0.0.1", 0))
sys.stdout.write(f"{listener.getsockname()[1]}\n"); sys.stdout.flush()
sock, _ = listener.accept()
sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
request = b""
while b"\r\n\r\n" not in request:
    data = sock.recv(65536)
    if not data:
        sys.exit(2)
    request += data
sock.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {os.path.getsize(path)}\r\n\r\n".encode())
""" + _SEND_FILE + _UNTIL_CLOSED  # no end of stream: httpx keeps the connection until close()


class PeerSender:
    """The plain-Python peer: a subprocess sending the stored file over loopback TCP to a socket
    accepted here. Started before the measurement (so its interpreter start-up is not timed)."""

    def __init__(self, path: pathlib.Path) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        port = self.listener.getsockname()[1]
        self.process = subprocess.Popen(
            [sys.executable, "-c", PEER_SENDER, str(path), str(port)], stdout=subprocess.PIPE, text=True
        )
        self.listener.settimeout(60)
        self.sock, _ = self.listener.accept()
        self.sock.settimeout(REQUEST_TIMEOUT_S)
        if self.process.stdout is None or self.process.stdout.readline().strip() != "connected":
            raise BenchError("peer sender did not start")
        self.cpu_at_end = 0.0
        self.hwm_kib = 0
        self.client: httpx.Client | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def receive(self, started: float) -> Received:
        """Ask for the file and receive it with recv_into 1 MiB, hashing each piece as it arrives."""
        hasher, size, first = hashlib.sha256(), 0, None
        buf = bytearray(CHUNK_BYTES)
        view = memoryview(buf)
        self.sock.sendall(b"G")
        while n := self.sock.recv_into(buf):
            if first is None:
                first = time.monotonic()
            hasher.update(view[:n])
            size += n
        return Received(size, hasher.hexdigest(), None, None, None, (first or time.monotonic()) - started)

    def close(self) -> None:
        """Read the sender's CPU time and peak RSS while it still exists, then let it end."""
        try:
            self.cpu_at_end = _stack.cpu_seconds(self.pid)
            self.hwm_kib = _stack.status_kib(self.pid, "VmHWM")
        except (FileNotFoundError, ProcessLookupError, KeyError):
            pass
        if self.client is not None:
            self.client.close()
        else:
            self.sock.close()
            self.listener.close()
        try:
            code = self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise BenchError("peer sender did not exit") from None
        if self.process.stdout is not None:
            self.process.stdout.close()
        if code != 0:
            raise BenchError(f"peer sender exited with status {code}")


class HttpPeerSender(PeerSender):
    """The peer for an HTTP client: the same sender behind a status line and a Content-Length,
    received with httpx as the REST path is (fetch_rest)."""

    def __init__(self, path: pathlib.Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", PEER_HTTP_SENDER, str(path)], stdout=subprocess.PIPE, text=True
        )
        line = self.process.stdout.readline().strip() if self.process.stdout is not None else ""
        if not line.isdigit():
            raise BenchError("HTTP peer sender did not start")
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{line}", timeout=REQUEST_TIMEOUT_S)
        self.cpu_at_end = 0.0
        self.hwm_kib = 0

    def receive(self, started: float) -> Received:
        assert self.client is not None
        return _fetch_httpx(self.client, "/file", {}, started, "HTTP peer", declares=False)


PEER = "peer: plain Python file → loopback TCP"
PEER_HTTP = "peer: the same, as HTTP/1.1 to httpx"
PEERS = {PEER: PeerSender, PEER_HTTP: HttpPeerSender}
_PEER_ROW = lambda *_: Received(0, "", None, None, None, 0.0)  # noqa: E731 - see measure_download
REST_HTTPX = "REST GET content via Envoy (httpx)"
REST_SOCKET = "REST GET content via Envoy (socket + httptools)"
GRPC_DIRECT = "gRPC ReadEventContent direct"
GRPC_ENVOY = "gRPC ReadEventContent via Envoy"
DOWNLOAD_PATHS = [
    DownloadPath(REST_HTTPX, True, fetch_rest, PEER_HTTP),
    DownloadPath(REST_SOCKET, True, fetch_rest_socket, PEER),
    DownloadPath(GRPC_DIRECT, False, fetch_grpc_direct, PEER),
    DownloadPath(GRPC_ENVOY, True, fetch_grpc_envoy, PEER),
    DownloadPath(PEER, False, _PEER_ROW),
    DownloadPath(PEER_HTTP, False, _PEER_ROW),
]


@dataclasses.dataclass
class DownloadSample:
    path: str
    size: int
    run: int
    seconds: float  # request sent until the last byte received
    first_byte_s: float
    rss_base_kib: dict[str, int]  # "sender" is the gRPC server, or the peer's sender process
    rss_peak_kib: dict[str, int]
    cpu_seconds: dict[str, float]  # sender, envoy, client, other
    chunked: bool = False  # see Received

    @property
    def mb_s(self) -> float:
        return self.size / self.seconds / 1e6


def check_received(what: str, got: Received, size: int, sha256: str) -> None:
    if got.size != size or got.sha256 != sha256:
        raise BenchError(f"{what}: received {got.size} bytes sha256 {got.sha256}, stored {size} bytes {sha256}")
    if got.declared_size is not None and got.declared_size != size:
        raise BenchError(f"{what}: x-content-length {got.declared_size}, stored {size}")
    if got.declared_sha256 is not None and got.declared_sha256 != sha256:
        raise BenchError(f"{what}: x-content-sha256 {got.declared_sha256}, stored {sha256}")
    if got.declared_size is not None and got.etag != f'"{sha256}"':
        raise BenchError(f"{what}: etag {got.etag!r}, expected \"{sha256}\"")


def measure_download(bench: Bench, path: DownloadPath, event_id: str, size: int, sha256: str, run: int) -> (
    DownloadSample
):
    sender = PEERS.get(path.name)
    peer = sender(bench.stack.data_dir / "media" / DEVICE / event_id) if sender is not None else None
    pids = {"server": bench.stack.server_pid, "envoy": bench.stack.envoy_pid, "client": os.getpid()}
    if peer is not None:
        pids["peer"] = peer.pid
    try:
        before = cpu_now(pids)
        with _stack.MemoryProbe(pids) as probe:
            started = time.monotonic()
            got = peer.receive(started) if peer is not None else path.fetch(bench, event_id, started)
            finished = time.monotonic()
        after = cpu_now(pids)
    finally:
        if peer is not None:
            peer.close()
    if peer is not None:  # the sender's last CPU ticks, counted until it was told to stop
        after["peer"] = max(after["peer"], peer.cpu_at_end)
        probe.peak["peer"] = max(probe.peak["peer"], peer.hwm_kib)
    check_received(path.name, got, size, sha256)
    cpu = {name: after[name] - before[name] for name in before}
    cpu["other"] = max(0.0, cpu.pop("machine") - sum(cpu.values()))
    sender = "peer" if peer is not None else "server"
    cpu["sender"] = cpu[sender]
    base, peak = dict(probe.baseline), dict(probe.peak)
    base["sender"], peak["sender"] = base[sender], peak[sender]
    return DownloadSample(path.name, size, run, finished - started, got.first_byte_s, base, peak, cpu, got.chunked)


def scenario_downloads(bench: Bench) -> Section:
    opts = bench.options
    size = opts.size
    # One upload of the configured size (native gRPC direct), read back on every path; a 1 MiB one
    # warms each path up first (connections, thread pools, the peer's code paths).
    uploaded = {}
    for n in (MiB, size):
        stream = bench.payload.stream(n)
        event_id = send_grpc_direct(bench, stream, f"bench-download-{n}.bin")
        uploaded[n] = (event_id, stream.sha256)
    print(f"  uploaded {fmt_size(size)} as {uploaded[size][0]}", flush=True)
    # Uploads are written past the page cache (server/gallery_server/_direct_io.py): one read of each
    # stored file puts it there, so that every path, the peer's included, reads it from memory.
    for eid, _ in uploaded.values():
        with open(bench.stack.data_dir / "media" / DEVICE / eid, "rb") as stored:
            while stored.read(8 * MiB):
                pass
    for path in DOWNLOAD_PATHS:
        measure_download(bench, path, uploaded[MiB][0], MiB, uploaded[MiB][1], run=-1)
    samples: list[DownloadSample] = []
    event_id, sha256 = uploaded[size]
    for run in range(opts.runs):
        k = run % len(DOWNLOAD_PATHS)  # rotate the order so that no path always goes first
        for path in DOWNLOAD_PATHS[k:] + DOWNLOAD_PATHS[:k]:
            s = measure_download(bench, path, event_id, size, sha256, run)
            samples.append(s)
            print(
                f"  run {run + 1}/{opts.runs}  {path.name:<40} {fmt_size(size):>8}  {s.seconds:6.2f} s  "
                f"{s.mb_s:7.1f} MB/s  sender RSS MiB {s.rss_base_kib['sender'] / KiB:4.0f} -> "
                f"{s.rss_peak_kib['sender'] / KiB:4.0f}  envoy {s.rss_peak_kib['envoy'] / KiB:4.0f}  "
                f"CPU s sender {s.cpu_seconds['sender']:.2f} envoy {s.cpu_seconds['envoy']:.2f} "
                f"client {s.cpu_seconds['client']:.2f}",
                flush=True,
            )
    for n, (eid, sha) in uploaded.items():
        verify_and_delete(bench, eid, n, sha)
    return render_downloads(bench, samples)



# -- the section: tables, the memory check and the interpretation -------------------------------

Groups = dict[str, list[DownloadSample]]  # the samples of each path
Memory = dict[str, dict[str, float]]  # path name -> figure (MiB)


def render_downloads(bench: Bench, samples: list[DownloadSample]) -> Section:
    opts = bench.options
    size = opts.size
    by: Groups = {}
    for s in samples:
        by.setdefault(s.path, []).append(s)
    header, rows = _throughput_table(bench, by)
    mem_header, mem_rows, memory = _memory_table(by)
    failures = _memory_failures(size, memory)
    medians = {p.name: median_of(by[p.name], lambda s: s.mb_s) for p in DOWNLOAD_PATHS}
    ratios = {p.name: median(_peer_ratios(by, p)) for p in DOWNLOAD_PATHS if p.peer}
    text = interpret_downloads(bench, medians, ratios, memory, by, failures)
    markdown = (
        _method_text(size, opts.runs)
        + md_table(header, rows)
        + f"\n\nMemory during a {fmt_size(size)} download (peak RSS; the sender's rise is peak minus the RSS "
        "before that download):\n\n"
        + md_table(mem_header, mem_rows)
        + "\n\n" + text
    )
    console = text_table(header, rows) + "\n\n" + text_table(mem_header, mem_rows)
    raw = [dataclasses.asdict(s) for s in samples]
    return Section(f"Downloads: {fmt_size(size)} on every path vs plain Python", console, markdown, raw, failures)


def _method_text(size: int, runs: int) -> str:
    """How the section measures, and what each path is, ahead of its tables."""
    return (
        f"One {fmt_size(size)} event, uploaded once (native gRPC, direct), then read back whole on each path, "
        f"{runs} runs interleaved (the order rotates each run). Every download is hashed by the client as the "
        "bytes arrive (sha256, in series with receiving, in the client's one Python thread) and must match the "
        "uploaded size and sha256 and the server's `x-content-length` / `x-content-sha256` / `etag` (REST "
        "headers or gRPC initial metadata). Paths:\n\n"
        "- **REST GET content via Envoy**: `GET /api/gallery/{device}/events/{eventId}/content`, received by "
        "httpx `stream()` + `iter_raw(1 MiB)`, or by a plain socket (`recv_into` 1 MiB) with httptools' C "
        "parser. Envoy sends the file itself (its file_server filter, with a Content-Length) once the server's "
        "Check has let it (rpc/file_handoff.py); the server's \"sender\" CPU is that Check (a download that "
        "came chunked was streamed by the server instead: the interpretation counts them).\n"
        "- **gRPC ReadEventContent direct / via Envoy**: the native server-streaming read (1 MiB messages), to "
        "the server's port or through Envoy's h2c listener.\n"
        "- **peer**: what plain Python does without gRPC, HTTP or Envoy: a separate Python process (as the "
        "server is) reads the same stored file (`<data>/media/<device>/<event_id>`, in the page cache like the "
        "server's reads) with `readinto` into a 1 MiB buffer and writes it to a loopback TCP socket with "
        "`sendall`; the client receives with `recv_into` (1 MiB) and hashes each piece. Its interpreter "
        "starts before the clock; the clock starts when the one-byte request is sent. **The same, as HTTP/1.1 "
        "to httpx**: the sender answers an HTTP request with a status line and a Content-Length before the "
        "file, and the client is httpx as on the REST path, whose ÷ peer is against this row (the raw-socket "
        "client costs less per byte than httpx's, so a path compares with the peer received the same way).\n\n"
        "\"÷ peer\" is the median of the per-run ratios path MB/s ÷ peer MB/s (same run). \"sender\" is the "
        "process that reads the file: the gRPC server, or the peer's process. Time runs from the request to "
        "the last byte; first byte ms is the request-to-first-body-bytes latency.\n\n"
    )



def _peer_ratios(by: Groups, path: DownloadPath) -> list[float]:
    """MB/s of `path` over its peer's, one ratio per run that measured both."""
    peer = {s.run: s for s in by[path.peer]}
    return [s.mb_s / peer[s.run].mb_s for s in by[path.name] if s.run in peer]


def _throughput_table(bench: Bench, by: Groups) -> tuple[list[str], list[list[str]]]:
    """Throughput and cost of every path; adds the targets (the REST and proxied paths) to bench.targets."""
    size = bench.options.size
    per_gb = size / 1e9
    header = [
        "path", "MB/s median", "MB/s min – max", "÷ peer (same run) median", "÷ peer min – max",
        "first byte ms", "sender CPU s/GB", "Envoy CPU s/GB", "client CPU s/GB", "other processes CPU/s",
    ]
    rows = []
    for path in DOWNLOAD_PATHS:
        group = by[path.name]
        ratios = _peer_ratios(by, path) if path.peer else [1.0]
        if path.peer and path.via_envoy:
            bench.targets.append((f"download {fmt_size(size)}, {path.name}", ">= 0.9x plain Python",
                                  f"{median(ratios):.2f}x", median(ratios) >= 0.9))
        rows.append([
            path.name,
            f"{median_of(group, lambda s: s.mb_s):.0f}",
            spread([s.mb_s for s in group]),
            f"{median(ratios):.2f}" + (" (HTTP peer)" if path.peer == PEER_HTTP else "") if path.peer else "1",
            spread(ratios, "{:.2f}") if path.peer else "–",
            f"{median_of(group, lambda s: s.first_byte_s) * 1000:.0f}",
            f"{median_of(group, lambda s: s.cpu_seconds['sender']) / per_gb:.2f}",
            f"{median_of(group, lambda s: s.cpu_seconds['envoy']) / per_gb:.2f}" if path.via_envoy else "–",
            f"{median_of(group, lambda s: s.cpu_seconds['client']) / per_gb:.2f}",
            f"{median_of(group, lambda s: s.cpu_seconds['other'] / s.seconds):.2f}",
        ])
    return header, rows


def _memory_table(by: Groups) -> tuple[list[str], list[list[str]], Memory]:
    """Peak RSS of the sender, Envoy and the client during a download: the table, and its figures."""
    mem_header = [
        "path", "sender RSS before MiB", "sender peak MiB", "sender rise, median (max)",
        "Envoy peak MiB", "Envoy rise", "client peak MiB",
    ]
    mem_rows = []
    memory: Memory = {}
    for path in DOWNLOAD_PATHS:
        group = by[path.name]
        m = {
            "before": median_of(group, lambda s: s.rss_base_kib["sender"]) / KiB,
            "peak": median_of(group, lambda s: s.rss_peak_kib["sender"]) / KiB,
            "rise": median_of(group, lambda s: s.rss_peak_kib["sender"] - s.rss_base_kib["sender"]) / KiB,
            "max_rise": max(s.rss_peak_kib["sender"] - s.rss_base_kib["sender"] for s in group) / KiB,
            "envoy": median_of(group, lambda s: s.rss_peak_kib["envoy"]) / KiB,
            "envoy_rise": median_of(group, lambda s: s.rss_peak_kib["envoy"] - s.rss_base_kib["envoy"]) / KiB,
            "client": median_of(group, lambda s: s.rss_peak_kib["client"]) / KiB,
        }
        memory[path.name] = m
        mem_rows.append([
            path.name + (" (sender = peer process)" if not path.peer else " (sender column: the gRPC server)"),
            f"{m['before']:.0f}", f"{m['peak']:.0f}", f"+{m['rise']:.0f} (+{m['max_rise']:.0f})",
            f"{m['envoy']:.0f}" if path.via_envoy else "–",
            f"{m['envoy_rise']:+.0f}" if path.via_envoy else "–",
            f"{m['client']:.0f}",
        ])
    return mem_header, mem_rows, memory


def _memory_failures(size: int, memory: Memory) -> list[str]:
    """The gallery's paths whose server RSS rose by over a quarter of the file during a download: it
    should stream. Judged on real sizes only (256 MiB and up), where the rise is not noise."""
    failures = []
    for path in DOWNLOAD_PATHS:
        if path.peer and memory[path.name]["max_rise"] > 0.25 * size / MiB and size >= 256 * MiB:
            failures.append(
                f"{path.name}: the server's RSS rose by {memory[path.name]['max_rise']:.0f} MiB during a "
                f"{fmt_size(size)} download (does it stream?)"
            )
    return failures


FOR_SCALE = (
    "\n\nFor scale (performance-baseline notes, same kind of machine): loopback TCP 2,900 MB/s (iperf3) / "
    "3,700 MB/s (Python socket) without hashing, sha256 on one core 1,350 MB/s. The machine is shared and "
    "noisy: compare paths by the same-run ratios, not by absolute figures from different days."
)


def interpret_downloads(
    bench: Bench,
    medians: dict[str, float],
    ratios: dict[str, float],
    memory: Memory,
    by: Groups,
    failures: list[str],
) -> str:
    size = bench.options.size
    return (
        _paths_text(size, medians, ratios, by)
        + _cpu_text(bench, medians, by)
        + _memory_text(size, memory, failures)
        + FOR_SCALE
    )


def _cpu_per_gb(by: Groups, path: str, proc: str, size: int) -> float:
    return median([s.cpu_seconds[proc] for s in by[path]]) / (size / 1e9)


def _paths_text(size: int, medians: dict[str, float], ratios: dict[str, float], by: Groups) -> str:
    """Each gallery path against the peer, and what each process spent per byte on it."""
    rest, raw, direct, envoy = REST_HTTPX, REST_SOCKET, GRPC_DIRECT, GRPC_ENVOY

    def cpu(p: str, proc: str) -> float:
        return _cpu_per_gb(by, p, proc, size)

    rest_samples = [s for p in (rest, raw) for s in by[p]]
    chunked = sum(s.chunked for s in rest_samples)
    streamed = chunked > 0
    return (
        "**Interpretation.** "
        f"The plain-Python peer moved the file at {medians[PEER]:.0f} MB/s to a raw socket and "
        f"{medians[PEER_HTTP]:.0f} MB/s to httpx. "
        + (
            f"**{chunked} of the {len(rest_samples)} REST downloads came chunked, i.e. streamed by the server** "
            "(GALLERY_ENVOY_SENDS_FILES=false, or Check declined or failed), so the REST figures are not "
            "those of Envoy sending the file; they reached "
            if streamed else
            "A REST download of a whole file is sent by Envoy itself once the server's Check has let it "
            "(server/gallery_server/rpc/file_handoff.py, Envoy's file_server filter): "
        )
        + f"{ratios[raw]:.2f}x the peer with the raw-socket client ({medians[raw]:.0f} MB/s) and {ratios[rest]:.2f}x "
        f"the HTTP peer with httpx ({medians[rest]:.0f} MB/s), each ratio the median of same-run ratios. For those "
        f"the server spent {rng([cpu(p, 'sender') for p in (raw, rest)], '{:.2f}')} CPU-s per GB "
        + ("" if streamed else "(one Check) ")
        + "and "
        f"Envoy {rng([cpu(p, 'envoy') for p in (raw, rest)], '{:.2f}')}, against the peer sender's "
        f"{cpu(PEER, 'sender'):.2f}. The native reads stream through the server: {ratios[direct]:.2f}x the "
        f"peer direct ({medians[direct]:.0f} MB/s) and {ratios[envoy]:.2f}x through Envoy ({medians[envoy]:.0f} "
        f"MB/s), the server at {rng([cpu(p, 'sender') for p in (direct, envoy)], '{:.2f}')} CPU-s per GB "
        "(protobuf messages, HTTP/2 framing and grpcio's threads on top of the same file reads), Envoy adding "
        f"{cpu(envoy, 'envoy'):.2f} through its listener, and the grpcio client "
        f"{rng([cpu(p, 'client') for p in (direct, envoy)], '{:.2f}')} against the raw socket's "
        f"{cpu(PEER, 'client'):.2f}. "
    )


def _cpu_text(bench: Bench, medians: dict[str, float], by: Groups) -> str:
    """The CPU all processes spent per byte on each path, and how busy the machine was meanwhile."""
    size = bench.options.size
    rest, raw, direct, envoy = REST_HTTPX, REST_SOCKET, GRPC_DIRECT, GRPC_ENVOY

    def cpu(p: str, proc: str) -> float:
        return _cpu_per_gb(by, p, proc, size)

    total = {p: cpu(p, "sender") + cpu(p, "envoy") + cpu(p, "client") for p in medians}
    load = {
        p: median([(s.cpu_seconds["sender"] + s.cpu_seconds["envoy"] + s.cpu_seconds["client"]
                    + s.cpu_seconds["other"]) / s.seconds for s in by[p]])
        for p in medians
    }
    vcpus = len(os.sched_getaffinity(0))
    calibration = bench.facts.get("calibration")
    hash_mb = calibration["sha256_mb_s"] if isinstance(calibration, dict) else 1350.0
    peer_of = {p.name: p.peer for p in DOWNLOAD_PATHS}
    return (
        f"sha256 alone is about {1e3 / hash_mb:.2f} CPU-s "
        f"per GB at {'this run' if isinstance(calibration, dict) else 'the baseline'}'s {hash_mb:.0f} MB/s and "
        "is the same on every path (the client hashes in series with receiving, the peers included), so the "
        "clients' differences are their receive paths (raw socket, httpx, grpcio), not the hashing. "
        "In all, the processes spent "
        + ", ".join(f"{total[p]:.2f}" for p in medians)
        + " CPU-s per GB (table order), and the machine was "
        + ", ".join(f"{load[p]:.2f}" for p in medians)
        + f" of its {vcpus} vCPUs busy during the downloads (ours plus other processes and the kernel's "
        "loopback work)"
        + (
            ": it was essentially saturated, so throughput here follows total CPU per byte, and the ratio to "
            "the peer roughly tracks the ratio of those CPU costs "
            f"({', '.join(f'{total[peer_of[p]] / total[p]:.2f}' for p in (rest, raw, direct, envoy))} for REST "
            "with httpx, REST with a raw socket, gRPC direct and gRPC via Envoy). "
            if min(load.values()) >= 0.85 * vcpus
            else ". "
        )
    )


def _memory_text(size: int, memory: Memory, failures: list[str]) -> str:
    """Whether the downloads streamed: the server's and Envoy's memory against the peers' senders'."""
    direct, envoy, rest = GRPC_DIRECT, GRPC_ENVOY, REST_HTTPX
    envoy_peaks = [memory[p]["envoy"] for p in (envoy, rest)]
    rises = [memory[p]["max_rise"] for p in (direct, envoy, rest)]
    return (
        f"\n\nMemory: the server's RSS rose by at most {max(rises):.0f} MiB during a {fmt_size(size)} download "
        f"(medians {rng([memory[p]['rise'] for p in (direct, envoy, rest)], '{:.0f}')} MiB) and Envoy peaked at "
        f"{rng(envoy_peaks, '{:.0f}')} MiB, "
        + (
            "so downloads stream: nothing close to the file is held in memory. "
            if not failures
            else "**which is more than a streaming download should hold**: " + "; ".join(failures) + ". "
        )
        + "The peers' sender processes peaked at "
        f"{rng([memory[p]['peak'] for p in PEERS], '{:.0f}')} MiB (a bare interpreter and one 1 MiB buffer)."
    )
