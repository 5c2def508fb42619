"""Benchmarks of the real gallery stack (`gallery run`: gRPC server + Envoy) on this machine.

    .venv/bin/python bench/run.py            # full suite; rewrites BENCHMARKS.md
    .venv/bin/python bench/run.py --quick    # small sizes, 1 run, correctness asserted; < 2 min

Each scenario is a function `(Bench) -> Section` registered in SCENARIOS; a Section renders itself
to the console and to BENCHMARKS.md. Every measured operation is verified (the listed size and
sha256 of each upload must match what the client sent); any failure makes the exit status nonzero.

Conventions (see /work/shared/notes/performance-baselines.md): MB/s = 10^6 bytes/s; RSS in MiB;
medians over --runs repetitions, interleaved so that noise spreads over every path; comparisons are
ratios of measurements taken in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import pathlib
import platform
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator

import _stack
import grpc
import httpx

from gallery.v1 import gallery_pb2 as pb
from gallery.v1 import gallery_pb2_grpc
from gallery_server import auth, local_stack, supervisor

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
RESULTS_DIR = ROOT / "bench" / "results"

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
CHUNK_BYTES = MiB
DEVICE = "bench-device"
JWT_SECRET = "bench-secret-" + secrets.token_hex(24)
REQUEST_TIMEOUT_S = 900


class BenchError(Exception):
    """A measured operation failed or returned a wrong result."""


# -- options and shared state -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Options:
    quick: bool
    runs: int
    size: int  # bytes of the large upload
    ref_size: int  # bytes of the reference upload (memory must not grow from ref_size to size)
    scenarios: list[str]
    write_report: bool


class Payload:
    """Upload bytes, never materialised: a few distinct random 1 MiB blocks, reused in turn.

    Seven (prime) distinct blocks rather than one make a dropped, duplicated or reordered chunk
    change the sha256, while the client still holds only 7 MiB whatever the upload size.
    """

    BLOCKS = 7

    def __init__(self, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.blocks = [os.urandom(chunk_bytes) for _ in range(self.BLOCKS)]
        self.chunk_bytes = chunk_bytes

    def stream(self, size: int) -> Stream:
        return Stream(self, size)


class Stream:
    """The `size` bytes of one upload, iterated once in chunks: hashes what it yields (sha256 of
    what was sent) and notes when the last chunk was taken by the client library."""

    def __init__(self, payload: Payload, size: int) -> None:
        self.payload = payload
        self.size = size
        self.hasher = hashlib.sha256()
        self.last_chunk_taken: float | None = None  # time.monotonic()

    def __iter__(self) -> Iterator[bytes]:
        blocks, count = self.payload.blocks, self.payload.BLOCKS
        full, rest = divmod(self.size, self.payload.chunk_bytes)
        for i in range(full):
            block = blocks[i % count]
            self.hasher.update(block)
            yield block
        if rest:
            tail = blocks[full % count][:rest]
            self.hasher.update(tail)
            yield tail
        self.last_chunk_taken = time.monotonic()

    @property
    def sha256(self) -> str:
        return self.hasher.hexdigest()


@dataclasses.dataclass
class Bench:
    """Everything a scenario needs: the running stack, clients, a token and the payload."""

    options: Options
    stack: local_stack.Stack
    token: str
    http: httpx.Client
    envoy_channel: grpc.Channel
    direct_channel: grpc.Channel
    payload: Payload
    facts: dict[str, object] = dataclasses.field(default_factory=dict)  # shared between scenarios

    @property
    def auth_header(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"}

    @property
    def pids(self) -> dict[str, int]:
        return {"server": self.stack.server_pid, "envoy": self.stack.envoy_pid, "client": os.getpid()}


@dataclasses.dataclass
class Section:
    """One scenario's results: console text, Markdown for BENCHMARKS.md, raw data, failures."""

    title: str
    console: str
    markdown: str
    raw: object
    failures: list[str] = dataclasses.field(default_factory=list)


# -- scenario: uploads through every path -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UploadPath:
    name: str
    via_envoy: bool
    send: Callable[[Bench, Stream, str], str]  # (bench, bytes, filename) -> event id


def _check_response(response: httpx.Response, what: str) -> dict[str, object]:
    if response.status_code != 200:
        raise BenchError(f"{what}: HTTP {response.status_code}: {response.text[:500]}")
    body = response.json()
    if not isinstance(body, dict):
        raise BenchError(f"{what}: unexpected JSON {body!r:.200}")
    return body


def _event_id(body: dict[str, object], what: str) -> str:
    event_id = body.get("eventId")
    if not isinstance(event_id, str) or not event_id.startswith("evt_"):
        raise BenchError(f"{what}: response has no eventId: {body!r:.300}")
    return event_id


def send_rest_multipart(bench: Bench, stream: Stream, filename: str) -> str:
    """POST /api/gallery/{device}/upload through Envoy, the multipart body generated by hand."""
    boundary = "gallery-bench-" + secrets.token_hex(16)
    head = (
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="name"\r\n\r\n'
        f"{filename}\r\n"
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="event"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def body() -> Iterator[bytes]:
        yield head
        yield from stream
        yield tail

    response = bench.http.post(
        f"/api/gallery/{DEVICE}/upload",
        content=body(),
        headers={
            **bench.auth_header,
            "content-type": f"multipart/form-data; boundary={boundary}",
            "content-length": str(len(head) + stream.size + len(tail)),  # not chunked
        },
    )
    return _event_id(_check_response(response, "multipart upload"), "multipart upload")


def send_presigned_put(bench: Bench, stream: Stream, filename: str) -> str:
    """GET upload-url (bearer token), then PUT the raw body to the pre-signed URL (no token)."""
    issued = _check_response(
        bench.http.get(
            f"/api/gallery/{DEVICE}/upload-url", params={"filename": filename}, headers=bench.auth_header
        ),
        "upload-url",
    )
    url = issued.get("upload_url")
    if not isinstance(url, str) or not url.startswith(bench.stack.base_url):
        raise BenchError(f"upload-url: unexpected upload_url in {issued!r:.300}")
    response = bench.http.put(
        url,
        content=iter(stream),
        headers={"content-type": "application/octet-stream", "content-length": str(stream.size)},
    )
    event_id = _event_id(_check_response(response, "pre-signed PUT"), "pre-signed PUT")
    if event_id != issued.get("eventId"):
        raise BenchError(f"pre-signed PUT stored {event_id}, the URL was issued for {issued.get('eventId')}")
    return event_id


def _send_grpc(bench: Bench, channel: grpc.Channel, stream: Stream, filename: str) -> str:
    def requests() -> Iterator[pb.UploadEventRequest]:
        yield pb.UploadEventRequest(
            header=pb.UploadHeader(device=DEVICE, name=filename, media_type="other", size=stream.size)
        )
        for chunk in stream:
            yield pb.UploadEventRequest(media_chunk=chunk)
        # The server checks the hash too; the finish message marks the stream complete.
        yield pb.UploadEventRequest(finish=pb.UploadFinish(sha256=stream.sha256))

    stub = gallery_pb2_grpc.GalleryServiceStub(channel)
    try:
        reply = stub.UploadEvent(
            requests(), metadata=list(bench.auth_header.items()), timeout=REQUEST_TIMEOUT_S
        )
    except grpc.RpcError as exc:
        raise BenchError(f"gRPC UploadEvent: {exc.code()} {exc.details()}") from None
    if not reply.success or not reply.event_id.startswith("evt_"):
        raise BenchError(f"gRPC UploadEvent: unexpected reply {reply}")
    return reply.event_id


def send_grpc_envoy(bench: Bench, stream: Stream, filename: str) -> str:
    """Native gRPC UploadEvent (1 MiB chunks) to Envoy's listener (h2c), proxied to the server."""
    return _send_grpc(bench, bench.envoy_channel, stream, filename)


def send_grpc_direct(bench: Bench, stream: Stream, filename: str) -> str:
    """Native gRPC UploadEvent (1 MiB chunks) straight to the gRPC server, bypassing Envoy."""
    return _send_grpc(bench, bench.direct_channel, stream, filename)


DIRECT = "gRPC UploadEvent direct"
UPLOAD_PATHS = [
    UploadPath("REST multipart POST via Envoy", True, send_rest_multipart),
    UploadPath("pre-signed PUT via Envoy", True, send_presigned_put),
    UploadPath("gRPC UploadEvent via Envoy", True, send_grpc_envoy),
    UploadPath(DIRECT, False, send_grpc_direct),
]


def verify_and_delete(bench: Bench, event_id: str, size: int, sha256: str) -> None:
    """The event must be listed with exactly the size and sha256 the client sent; then delete it."""
    listed = bench.http.get(
        f"/api/gallery/{DEVICE}/events", params={"limit": 1000}, headers=bench.auth_header
    )
    if listed.status_code != 200:
        raise BenchError(f"list events: HTTP {listed.status_code}: {listed.text[:300]}")
    events = {e["id"]: e for e in listed.json()}
    event = events.get(event_id)
    if event is None:
        raise BenchError(f"{event_id} is not listed")
    if event["size"] != size:
        raise BenchError(f"{event_id}: listed size {event['size']!r}, sent {size}")
    if event["sha256"] != sha256:
        raise BenchError(f"{event_id}: listed sha256 {event['sha256']}, sent {sha256}")
    deleted = bench.http.delete(f"/api/gallery/{DEVICE}/events/{event_id}", headers=bench.auth_header)
    if deleted.status_code != 200:
        raise BenchError(f"delete {event_id}: HTTP {deleted.status_code}: {deleted.text[:300]}")


@dataclasses.dataclass
class UploadSample:
    path: str
    size: int
    run: int
    seconds: float  # first request byte until the response
    tail_seconds: float  # last chunk handed to the client library until the response (fsync, commit)
    rss_base_kib: dict[str, int]
    rss_peak_kib: dict[str, int]
    rss_trend_mib_per_gib: dict[str, float | None]  # RSS slope while the bytes flowed
    cpu_seconds: dict[str, float]  # server, envoy, client, other (everything else on the machine)
    series: list[tuple[float, ...]]  # RSS samples: (s, KiB per process in `pids` order)

    @property
    def mb_s(self) -> float:
        return self.size / self.seconds / 1e6


def _client_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _cpu_now(pids: dict[str, int]) -> dict[str, float]:
    cpu = {name: _stack.cpu_seconds(pid) for name, pid in pids.items() if name != "client"}
    cpu["client"] = _client_cpu()
    cpu["machine"] = _stack.machine_busy_seconds()
    return cpu


def rss_trend(
    series: list[tuple[float, ...]], column: int, transfer_s: float, size: int
) -> float | None:
    """Slope of RSS over the middle 80% of the transfer, in MiB per GiB sent (bytes assumed to flow
    evenly): ~0 for a server that streams, ~1024 for one that keeps what it receives."""
    points = [(row[0], row[column] / KiB) for row in series if 0.1 * transfer_s <= row[0] <= 0.9 * transfer_s]
    if len(points) < 5 or transfer_s <= 0:
        return None
    slope, _ = statistics.linear_regression([t for t, _ in points], [r for _, r in points])
    return slope * transfer_s / (size / GiB)


def measure_upload(bench: Bench, path: UploadPath, size: int, run: int) -> UploadSample:
    pids = bench.pids
    filename = f"bench-{run}-{size}.bin"
    stream = bench.payload.stream(size)
    before = _cpu_now(pids)
    with _stack.MemoryProbe(pids) as probe:
        started = time.monotonic()
        event_id = path.send(bench, stream, filename)
        finished = time.monotonic()
    after = _cpu_now(pids)
    cpu = {name: after[name] - before[name] for name in before}
    cpu["other"] = max(0.0, cpu.pop("machine") - sum(cpu.values()))
    verify_and_delete(bench, event_id, size, stream.sha256)
    last_chunk = stream.last_chunk_taken or finished
    transfer_s = last_chunk - probe.started
    trend = {name: rss_trend(probe.series, i + 1, transfer_s, size) for i, name in enumerate(pids)}
    return UploadSample(
        path.name, size, run, finished - started, finished - last_chunk,
        probe.baseline, probe.peak, trend, cpu, probe.series,
    )


def scenario_uploads(bench: Bench) -> Section:
    opts = bench.options
    sizes = [opts.ref_size, opts.size]
    # Warm-up (not reported): first connections, lazy imports, thread pools, the SQLite file.
    for path in UPLOAD_PATHS:
        measure_upload(bench, path, MiB, run=-1)
    samples: list[UploadSample] = []
    for run in range(opts.runs):
        for path in UPLOAD_PATHS:
            for size in sizes:
                sample = measure_upload(bench, path, size, run)
                samples.append(sample)
                base, peak = sample.rss_base_kib, sample.rss_peak_kib
                print(
                    f"  run {run + 1}/{opts.runs}  {path.name:<32} {fmt_size(size):>8}  "
                    f"{sample.seconds:6.2f} s  {sample.mb_s:7.1f} MB/s  "
                    f"RSS MiB server {base['server'] / KiB:4.0f} -> {peak['server'] / KiB:4.0f}"
                    f"  envoy {base['envoy'] / KiB:4.0f} -> {peak['envoy'] / KiB:4.0f}",
                    flush=True,
                )
    return render_uploads(bench, samples)


# -- statistics and rendering -------------------------------------------------------------------


def fmt_size(n: int) -> str:
    if n >= GiB and n % GiB == 0:
        return f"{n // GiB} GiB"
    if n >= MiB and n % MiB == 0:
        return f"{n // MiB} MiB"
    return f"{n} B"


def median(values: list[float]) -> float:
    return statistics.median(values)


def rng(values: Iterable[float], fmt: str) -> str:
    """ "lo – hi" of some values, or the single value when the two print alike."""
    values = list(values)
    lo, hi = fmt.format(min(values)), fmt.format(max(values))
    return lo if lo == hi else f"{lo} – {hi}"


def spread(values: list[float], fmt: str = "{:.0f}") -> str:
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(min(values))} – {fmt.format(max(values))}"


def md_table(header: list[str], rows: list[list[str]], align: str = "") -> str:
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    out.append("  ".join("-" * w for w in widths))
    for row in rows:
        cells = zip(row, widths, strict=True)
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(cells)))
    return "\n".join(out)


def _mib(kib: float) -> str:
    return f"{kib / KiB:.0f}"


def _mib_or_dash(value: float | None, fmt: str = "{:.0f}") -> str:
    return "–" if value is None else fmt.format(value)


def render_uploads(bench: Bench, samples: list[UploadSample]) -> Section:
    opts = bench.options
    by: dict[tuple[str, int], list[UploadSample]] = {}
    for s in samples:
        by.setdefault((s.path, s.size), []).append(s)

    def med(path: str, size: int, fn: Callable[[UploadSample], float]) -> float:
        return median([fn(s) for s in by[(path, size)]])

    def med_opt(path: str, size: int, fn: Callable[[UploadSample], float | None]) -> float | None:
        values = [v for v in (fn(s) for s in by[(path, size)]) if v is not None]
        return median(values) if values else None

    # Throughput and cost at both sizes.
    header = [
        "path", "size", "MB/s median", "MB/s min – max", "wall s", "of which after last byte s",
        "server CPU s/GB", "Envoy CPU s/GB", "client CPU s/GB", "other processes CPU/s",
    ]
    rows = []
    for path in UPLOAD_PATHS:
        for size in (opts.size, opts.ref_size):
            group = by[(path.name, size)]
            per_gb = size / 1e9
            rows.append([
                path.name, fmt_size(size),
                f"{med(path.name, size, lambda s: s.mb_s):.0f}",
                spread([s.mb_s for s in group]),
                f"{med(path.name, size, lambda s: s.seconds):.2f}",
                f"{med(path.name, size, lambda s: s.tail_seconds):.2f}",
                f"{med(path.name, size, lambda s: s.cpu_seconds['server']) / per_gb:.2f}",
                f"{med(path.name, size, lambda s: s.cpu_seconds['envoy']) / per_gb:.2f}" if path.via_envoy else "–",
                f"{med(path.name, size, lambda s: s.cpu_seconds['client']) / per_gb:.2f}",
                f"{med(path.name, size, lambda s: s.cpu_seconds['other'] / s.seconds):.2f}",
            ])

    # Memory must not grow with the upload size: peak RSS at size vs at ref_size, same path, and the
    # RSS trend while the bytes flow.
    big, ref = fmt_size(opts.size), fmt_size(opts.ref_size)
    growth_header = [
        "path", "process", "RSS before MiB", f"peak @ {ref}", f"peak @ {big}", "growth MiB",
        f"rise during {big} upload, median (max)", f"RSS trend @ {big} MiB/GiB",
    ]
    growth_rows = []
    memory: dict[str, dict[str, dict[str, float | None]]] = {}
    for path in UPLOAD_PATHS:
        memory[path.name] = {}
        for proc in ("server", "envoy", "client"):
            if proc == "envoy" and not path.via_envoy:
                continue
            small = med(path.name, opts.ref_size, lambda s, p=proc: s.rss_peak_kib[p]) / KiB
            large = med(path.name, opts.size, lambda s, p=proc: s.rss_peak_kib[p]) / KiB
            m: dict[str, float | None] = {
                "before": med(path.name, opts.size, lambda s, p=proc: s.rss_base_kib[p]) / KiB,
                "small": small,
                "large": large,
                "growth": large - small,
                "rise": med(path.name, opts.size, lambda s, p=proc: s.rss_peak_kib[p] - s.rss_base_kib[p]) / KiB,
                "max_rise": max(s.rss_peak_kib[proc] - s.rss_base_kib[proc] for s in by[(path.name, opts.size)])
                / KiB,
                "trend": med_opt(path.name, opts.size, lambda s, p=proc: s.rss_trend_mib_per_gib[p]),
            }
            memory[path.name][proc] = m
            growth_rows.append([
                path.name, proc if proc != "envoy" else "Envoy", f"{m['before']:.0f}", f"{small:.0f}",
                f"{large:.0f}", f"{large - small:+.0f}", f"+{m['rise']:.0f} (+{m['max_rise']:.0f})",
                _mib_or_dash(m["trend"], "{:+.0f}"),
            ])

    # Ratios of paths measured in the same run (per run, then the median).
    def ratio(a: str, b: str) -> list[float]:
        out = []
        for run in range(opts.runs):
            sa = [s for s in by[(a, opts.size)] if s.run == run]
            sb = [s for s in by[(b, opts.size)] if s.run == run]
            if sa and sb:
                out.append(sa[0].mb_s / sb[0].mb_s)
        return out

    ratio_rows = []
    ratios: dict[str, list[float]] = {}
    for path in UPLOAD_PATHS:
        if path.name == DIRECT:
            continue
        values = ratio(path.name, DIRECT)
        ratios[path.name] = values
        ratio_rows.append([f"{path.name} / gRPC direct", f"{median(values):.2f}", spread(values, "{:.2f}")])

    failures, warnings = memory_verdicts(opts, memory)
    medians = {p.name: med(p.name, opts.size, lambda s: s.mb_s) for p in UPLOAD_PATHS}
    interpretation = interpret_uploads(bench, medians, ratios, memory, by, warnings, failures)

    tables_md = (
        f"#### Throughput and cost ({opts.runs} runs per row, medians)\n\n"
        + md_table(header, rows, "ll" + "r" * (len(header) - 2))
        + f"\n\n#### Memory: peak RSS at {ref} vs {big} (medians over runs)\n\n"
        + md_table(growth_header, growth_rows, "ll" + "r" * (len(growth_header) - 2))
        + "\n\n#### Ratios to direct gRPC, measured in the same run\n\n"
        + md_table([f"ratio of MB/s at {big}", "median", "min – max"], ratio_rows)
    )
    markdown = (
        "One upload at a time, one stream, 1 MiB client chunks (REST bodies with a Content-Length; native "
        "gRPC uploads declare the size in their header and end with a finish message carrying the sha256). "
        "Each upload is timed from its first request until the response, i.e. until the server has hashed, "
        "fsynced and committed the event; \"after last byte\" is the part of that after the client library "
        "took the last chunk (mostly the server's fsync of the file). The event is then listed and checked "
        "(size and sha256 equal to what the client sent, hashed incrementally on the client) and deleted. "
        f"Sizes {big} and, as the memory reference, {ref}, interleaved path by path within each run; one "
        "warm-up upload of 1 MiB per path is not reported. Peak RSS is VmHWM, reset before each upload through "
        "`/proc/<pid>/clear_refs`, together with VmRSS sampled every 50 ms. \"RSS trend\" is the slope of the "
        "sampled RSS over the middle 80% of the transfer, scaled to MiB per GiB sent: about 0 when a process "
        "streams, about 1024 when it keeps what it receives. CPU is user+system time of each process during the "
        "upload per 10^9 bytes; \"other processes\" is the CPU that everything else on the machine used "
        "meanwhile (CPU-seconds per second; the machine has "
        f"{len(os.sched_getaffinity(0))} vCPUs).\n\n"
        + tables_md + "\n\n" + interpretation
    )
    console = (
        text_table(header, rows) + "\n\n" + text_table(growth_header, growth_rows) + "\n\n"
        + text_table(["ratio", "median", "min – max"], ratio_rows)
        + "".join(f"\nWARNING: {w}" for w in warnings)
    )
    raw = [dataclasses.asdict(s) for s in samples]
    return Section(f"Uploads of {big}, one stream", console, markdown, raw, failures)


def memory_verdicts(
    opts: Options, memory: dict[str, dict[str, dict[str, float | None]]]
) -> tuple[list[str], list[str]]:
    """Failures: memory that grows with the upload size (a steady RSS trend, or a peak that grew by a
    quarter of the extra bytes and at least 64 MiB). Warnings: bounded but notable bursts (median peak
    +32 MiB or more)."""
    failures, warnings = [], []
    extra_mib = (opts.size - opts.ref_size) / MiB
    for name, procs in memory.items():
        for proc, m in procs.items():
            if proc == "client":
                continue
            trend, growth = m["trend"], m["growth"]
            assert growth is not None
            where = f"{name}: {proc} peak RSS {m['small']:.0f} MiB at {fmt_size(opts.ref_size)}, " \
                f"{m['large']:.0f} MiB at {fmt_size(opts.size)} (largest rise during one upload +{m['max_rise']:.0f})"
            if (trend is not None and trend > 64) or growth > max(64.0, 0.25 * extra_mib):
                trend_text = "n/a" if trend is None else f"{trend:+.0f}"
                failures.append(f"memory grows with upload size: {where}, RSS trend {trend_text} MiB/GiB")
            elif growth >= 32:
                warnings.append(f"bounded but bursty memory: {where}")
    return failures, warnings


def interpret_uploads(
    bench: Bench,
    medians: dict[str, float],
    ratios: dict[str, list[float]],
    memory: dict[str, dict[str, dict[str, float | None]]],
    by: dict[tuple[str, int], list[UploadSample]],
    warnings: list[str],
    failures: list[str],
) -> str:
    opts = bench.options
    big, ref = fmt_size(opts.size), fmt_size(opts.ref_size)
    vcpus = len(os.sched_getaffinity(0))
    ranked = sorted(medians.items(), key=lambda kv: kv[1], reverse=True)
    parts = [
        "**Interpretation.** "
        f"At {big} the paths ranked "
        + ", ".join(f"{name} {mb:.0f} MB/s" for name, mb in ranked)
        + " (medians). "
    ]
    envoy_grpc = median(ratios["gRPC UploadEvent via Envoy"])
    rest = {name: median(v) for name, v in ratios.items() if name != "gRPC UploadEvent via Envoy"}
    parts.append(
        f"Putting Envoy in front of native gRPC gave {envoy_grpc:.2f}x the direct throughput (median of the per-run "
        "ratios; the notes measured 0.76 – 1.0x with a toy server); the REST paths, also through Envoy, reached "
        + ", ".join(f"{ratio:.2f}x ({name.removesuffix(' via Envoy')})" for name, ratio in rest.items())
        + ". "
    )

    def med_of(name: str, fn: Callable[[UploadSample], float]) -> float:
        return median([fn(s) for s in by[(name, opts.size)]])

    tail = {name: med_of(name, lambda s: s.tail_seconds / s.seconds) for name in medians}
    tail_s = {name: med_of(name, lambda s: s.tail_seconds) for name in medians}
    server_per_gb = {name: med_of(name, lambda s: s.cpu_seconds["server"] / (s.size / 1e9)) for name in medians}
    ours = {
        name: med_of(
            name, lambda s: (s.cpu_seconds["server"] + s.cpu_seconds["envoy"] + s.cpu_seconds["client"]) / s.seconds
        )
        for name in medians
    }
    other = {name: med_of(name, lambda s: s.cpu_seconds["other"] / s.seconds) for name in medians}
    parts.append(
        f"{rng(tail.values(), '{:.0%}')} of each {big} upload's wall time "
        f"({rng(tail_s.values(), '{:.1f}')} s) came after the client had handed over its "
        "last byte: that is the server making the file durable (fsync) and committing the row, the same for "
        f"every path. The server process spent {rng(server_per_gb.values(), '{:.1f}')} "
        "CPU-seconds per GB (receiving, hashing, writing; plus multipart "
        "parsing on the REST multipart path). Averaged over the uploads, server, Envoy and client used "
        f"{rng(ours.values(), '{:.2f}')} of the {vcpus} vCPUs and other processes on this "
        f"shared machine (including kernel softirq work) {rng(other.values(), '{:.2f}')}"
        + (
            ": the machine was close to saturated, so throughput here was bounded by CPU shared with unrelated "
            "work, on top of the per-byte costs. "
            if median([ours[n] + other[n] for n in medians]) >= 0.85 * vcpus
            else ". "
        )
    )
    calibration = bench.facts.get("calibration")
    if isinstance(calibration, dict):
        h, wf = calibration["sha256_mb_s"], calibration["write_fsync_mb_s"]
        ceiling = 1 / (1 / h + 1 / wf)
        parts.append(
            f"The calibration section gives this run's local ceilings: sha256 {h:.0f} MB/s, file write "
            f"{calibration['write_mb_s']:.0f} MB/s, write + fsync {wf:.0f} MB/s on one core without any network. "
            "The server hashes and writes each chunk in series in the handler thread, so hashing plus writing plus "
            f"fsync alone would cap one upload near {ceiling:.0f} MB/s on an idle core; the paths reached "
            f"{rng([v / ceiling for v in medians.values()], '{:.0%}')} of that while also "
            "receiving the bytes over gRPC (and HTTP and Envoy). "
        )

    server_growth = {name: procs["server"]["growth"] for name, procs in memory.items()}
    envoy_peaks = [procs["envoy"]["large"] for procs in memory.values() if "envoy" in procs]
    client_peaks = [procs["client"]["large"] for procs in memory.values()]
    max_rise = max(procs["server"]["max_rise"] or 0.0 for procs in memory.values())
    trends = [
        m["trend"]
        for procs in memory.values()
        for proc, m in procs.items()
        if proc != "client" and m["trend"] is not None
    ]
    parts.append(
        f"\n\nMemory. Envoy's peak RSS stayed at {rng(envoy_peaks, '{:.0f}')} MiB at {big} "
        f"on every path through it, and the client's at {rng(client_peaks, '{:.0f}')} MiB. "
        "The gRPC server's median peak RSS was "
        + ", ".join(f"{g:+.0f} MiB" for g in server_growth.values())
        + f" higher at {big} than at {ref} (table order), and the RSS trend while the bytes flowed was "
        + (f"{rng(trends, '{:+.0f}')} MiB per GiB" if trends else "not measurable")
        + " (a process that kept what it receives would show about +1024). "
    )
    if failures:
        parts.append("**Memory grows with the upload size:** " + "; ".join(failures) + ". ")
    else:
        parts.append(
            "Memory does not grow with the upload size: every path streams. "
            + (
                "The server's RSS is bursty, though: during a large upload it rises and falls by tens of MiB, "
                f"at most +{max_rise:.0f} MiB above its level before the upload in this run, and a longer upload "
                "has more chances of a high burst, which is why its median peak is higher at "
                f"{big} than at {ref}. A likely cause: grpc-core's BDP probing raises the server's per-stream "
                "HTTP/2 receive window far above Envoy's 1 MiB settings (GRPC_TRACE=flowctl showed 4 MiB growing "
                "to 32 MiB within a second of a 1 GiB upload on 2026-11-28), so whenever the Python handler falls "
                "behind, tens of MiB per stream queue up in the server, and the allocator keeps part of it "
                "afterwards (the \"RSS before\" column drifts). "
                if warnings or max_rise >= 32
                else ""
            )
        )
    parts.append(
        "\n\nFor scale, the project's performance-baseline notes (a 2-vCPU machine of this kind, 512 MiB, "
        "one stream, no hashing or fsync in the server): grpcio sync server with 1 MiB chunks 629 MB/s, "
        "python-multipart straight to disk 836 MB/s, raw PUT 913 MB/s; sha256 on one core 1,350 MB/s. "
        "The gallery server hashes every byte, fsyncs before the event exists and shares the vCPUs with "
        "Envoy and the Python client, and the machine is shared and noisy (single runs vary by up to 2.5x): "
        "compare paths by the same-run ratios, not by absolute figures from different days."
    )
    return "".join(parts)


# -- scenario: downloads through every path, against a plain-Python peer ------------------------


@dataclasses.dataclass
class Received:
    """What one download delivered (hashed while received) and what the server declared."""

    size: int
    sha256: str
    declared_size: int | None  # x-content-length (None for the peer: it declares nothing)
    declared_sha256: str | None  # x-content-sha256
    etag: str | None
    first_byte_s: float  # request sent until the first body bytes arrived


@dataclasses.dataclass(frozen=True)
class DownloadPath:
    name: str
    via_envoy: bool
    fetch: Callable[[Bench, str, float], Received]  # (bench, event id, request time) -> what arrived


def _header_int(value: str | None, what: str) -> int:
    try:
        return int(value or "")
    except ValueError:
        raise BenchError(f"{what}: x-content-length {value!r} is not a number") from None


def fetch_rest(bench: Bench, event_id: str, started: float) -> Received:
    """GET .../events/{id}/content through Envoy, httpx streaming in 1 MiB pieces, hashed on receipt."""
    hasher, size, first = hashlib.sha256(), 0, None
    with bench.http.stream(
        "GET", f"/api/gallery/{DEVICE}/events/{event_id}/content", headers=bench.auth_header
    ) as response:
        if response.status_code != 200:
            response.read()
            raise BenchError(f"REST download: HTTP {response.status_code}: {response.text[:300]}")
        if response.headers.get("content-encoding"):
            raise BenchError(f"REST download: unexpected content-encoding {response.headers['content-encoding']}")
        for chunk in response.iter_raw(CHUNK_BYTES):
            if first is None:
                first = time.monotonic()
            hasher.update(chunk)
            size += len(chunk)
        headers = response.headers
        return Received(
            size, hasher.hexdigest(), _header_int(headers.get("x-content-length"), "REST download"),
            headers.get("x-content-sha256"), headers.get("etag"), (first or time.monotonic()) - started,
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
PEER_SENDER = r"""
import socket, sys
path, port = sys.argv[1], int(sys.argv[2])
sock = socket.create_connection(("127.0.0.1", port))
sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
sys.stdout.write("connected\n"); sys.stdout.flush()
if sock.recv(1) != b"G":
    sys.exit(2)
buf = bytearray(1 << 20)
view = memoryview(buf)
with open(path, "rb", buffering=0) as f:
    while n := f.readinto(buf):
        sock.sendall(view[:n])
sock.shutdown(socket.SHUT_WR)
while sock.recv(65536):
    pass
sock.close()
"""


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


PEER = "peer: plain Python file → loopback TCP"
DOWNLOAD_PATHS = [
    DownloadPath("REST GET content via Envoy (httpx)", True, fetch_rest),
    DownloadPath("gRPC ReadEventContent direct", False, fetch_grpc_direct),
    DownloadPath("gRPC ReadEventContent via Envoy", True, fetch_grpc_envoy),
    DownloadPath(PEER, False, lambda *_: Received(0, "", None, None, None, 0.0)),  # see measure_download
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
    peer = PeerSender(bench.stack.data_dir / "media" / DEVICE / event_id) if path.name == PEER else None
    pids = {"server": bench.stack.server_pid, "envoy": bench.stack.envoy_pid, "client": os.getpid()}
    if peer is not None:
        pids["peer"] = peer.pid
    try:
        before = _cpu_now(pids)
        with _stack.MemoryProbe(pids) as probe:
            started = time.monotonic()
            got = peer.receive(started) if peer is not None else path.fetch(bench, event_id, started)
            finished = time.monotonic()
        after = _cpu_now(pids)
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
    return DownloadSample(path.name, size, run, finished - started, got.first_byte_s, base, peak, cpu)


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


def render_downloads(bench: Bench, samples: list[DownloadSample]) -> Section:
    opts = bench.options
    size = opts.size
    per_gb = size / 1e9
    by: dict[str, list[DownloadSample]] = {}
    for s in samples:
        by.setdefault(s.path, []).append(s)

    def med(path: str, fn: Callable[[DownloadSample], float]) -> float:
        return median([fn(s) for s in by[path]])

    def peer_ratios(path: str) -> list[float]:
        peer = {s.run: s for s in by[PEER]}
        return [s.mb_s / peer[s.run].mb_s for s in by[path] if s.run in peer]

    header = [
        "path", "MB/s median", "MB/s min – max", "÷ peer (same run) median", "÷ peer min – max",
        "first byte ms", "sender CPU s/GB", "Envoy CPU s/GB", "client CPU s/GB", "other processes CPU/s",
    ]
    rows = []
    for path in DOWNLOAD_PATHS:
        ratios = peer_ratios(path.name)
        rows.append([
            path.name,
            f"{med(path.name, lambda s: s.mb_s):.0f}",
            spread([s.mb_s for s in by[path.name]]),
            f"{median(ratios):.2f}" if path.name != PEER else "1",
            spread(ratios, "{:.2f}") if path.name != PEER else "–",
            f"{med(path.name, lambda s: s.first_byte_s) * 1000:.0f}",
            f"{med(path.name, lambda s: s.cpu_seconds['sender']) / per_gb:.2f}",
            f"{med(path.name, lambda s: s.cpu_seconds['envoy']) / per_gb:.2f}" if path.via_envoy else "–",
            f"{med(path.name, lambda s: s.cpu_seconds['client']) / per_gb:.2f}",
            f"{med(path.name, lambda s: s.cpu_seconds['other'] / s.seconds):.2f}",
        ])
    mem_header = [
        "path", "sender RSS before MiB", "sender peak MiB", "sender rise, median (max)",
        "Envoy peak MiB", "Envoy rise", "client peak MiB",
    ]
    mem_rows = []
    memory: dict[str, dict[str, float]] = {}
    for path in DOWNLOAD_PATHS:
        group = by[path.name]
        m = {
            "before": med(path.name, lambda s: s.rss_base_kib["sender"]) / KiB,
            "peak": med(path.name, lambda s: s.rss_peak_kib["sender"]) / KiB,
            "rise": med(path.name, lambda s: s.rss_peak_kib["sender"] - s.rss_base_kib["sender"]) / KiB,
            "max_rise": max(s.rss_peak_kib["sender"] - s.rss_base_kib["sender"] for s in group) / KiB,
            "envoy": med(path.name, lambda s: s.rss_peak_kib["envoy"]) / KiB,
            "envoy_rise": med(path.name, lambda s: s.rss_peak_kib["envoy"] - s.rss_base_kib["envoy"]) / KiB,
            "client": med(path.name, lambda s: s.rss_peak_kib["client"]) / KiB,
        }
        memory[path.name] = m
        mem_rows.append([
            path.name + (" (sender = peer process)" if path.name == PEER else " (sender = gRPC server)"),
            f"{m['before']:.0f}", f"{m['peak']:.0f}", f"+{m['rise']:.0f} (+{m['max_rise']:.0f})",
            f"{m['envoy']:.0f}" if path.via_envoy else "–",
            f"{m['envoy_rise']:+.0f}" if path.via_envoy else "–",
            f"{m['client']:.0f}",
        ])
    failures = []
    for path in DOWNLOAD_PATHS:
        if path.name != PEER and memory[path.name]["max_rise"] > 0.25 * size / MiB and size >= 256 * MiB:
            failures.append(
                f"{path.name}: the server's RSS rose by {memory[path.name]['max_rise']:.0f} MiB during a "
                f"{fmt_size(size)} download (does it stream?)"
            )
    medians = {p.name: med(p.name, lambda s: s.mb_s) for p in DOWNLOAD_PATHS}
    ratios = {p.name: median(peer_ratios(p.name)) for p in DOWNLOAD_PATHS if p.name != PEER}
    text = interpret_downloads(bench, medians, ratios, memory, by, failures)
    markdown = (
        f"One {fmt_size(size)} event, uploaded once (native gRPC, direct), then read back whole on each path, "
        f"{opts.runs} runs interleaved (the order rotates each run). Every download is hashed by the client as the "
        "bytes arrive (sha256, in series with receiving, in the client's one Python thread) and must match the "
        "uploaded size and sha256 and the server's `x-content-length` / `x-content-sha256` / `etag` (REST "
        "headers or gRPC initial metadata). Paths:\n\n"
        "- **REST GET content via Envoy**: `GET /api/gallery/{device}/events/{eventId}/content`, httpx "
        "`stream()` + `iter_raw(1 MiB)` (chunked HTTP/1.1 from Envoy's transcoder of `GetEventContent`).\n"
        "- **gRPC ReadEventContent direct / via Envoy**: the native server-streaming read (1 MiB messages), to "
        "the server's port or through Envoy's h2c listener.\n"
        "- **peer**: what plain Python does without gRPC, HTTP or Envoy: a separate Python process (as the "
        "server is) reads the same stored file (`<data>/media/<device>/<event_id>`, in the page cache like the "
        "server's reads) with `readinto` into a 1 MiB buffer and writes it to a loopback TCP socket with "
        "`sendall`; the client receives with `recv_into` (1 MiB) and hashes each piece. Its interpreter "
        "starts before the clock; the clock starts when the one-byte request is sent.\n\n"
        "\"÷ peer\" is the median of the per-run ratios path MB/s ÷ peer MB/s (same run). \"sender\" is the "
        "process that reads the file: the gRPC server, or the peer's process. Time runs from the request to "
        "the last byte; first byte ms is the request-to-first-body-bytes latency.\n\n"
        + md_table(header, rows)
        + f"\n\nMemory during a {fmt_size(size)} download (peak RSS; the sender's rise is peak minus the RSS "
        "before that download):\n\n"
        + md_table(mem_header, mem_rows)
        + "\n\n" + text
    )
    console = text_table(header, rows) + "\n\n" + text_table(mem_header, mem_rows)
    raw = [dataclasses.asdict(s) for s in samples]
    return Section(f"Downloads: {fmt_size(size)} on every path vs plain Python", console, markdown, raw, failures)


def interpret_downloads(
    bench: Bench,
    medians: dict[str, float],
    ratios: dict[str, float],
    memory: dict[str, dict[str, float]],
    by: dict[str, list[DownloadSample]],
    failures: list[str],
) -> str:
    size = bench.options.size
    per_gb = size / 1e9
    rest, direct, envoy = (p.name for p in DOWNLOAD_PATHS[:3])
    parts = [
        "**Interpretation.** "
        f"The plain-Python peer moved the file at {medians[PEER]:.0f} MB/s; the gallery paths reached "
        f"{ratios[direct]:.2f}x of it on native gRPC direct ({medians[direct]:.0f} MB/s), "
        f"{ratios[envoy]:.2f}x through Envoy ({medians[envoy]:.0f} MB/s) and {ratios[rest]:.2f}x on REST "
        f"({medians[rest]:.0f} MB/s), each ratio the median of same-run ratios. "
    ]

    def cpu(p: str, proc: str) -> float:
        return median([s.cpu_seconds[proc] for s in by[p]]) / per_gb

    total = {p: cpu(p, "sender") + cpu(p, "envoy") + cpu(p, "client") for p in medians}
    load = {
        p: median([(s.cpu_seconds["sender"] + s.cpu_seconds["envoy"] + s.cpu_seconds["client"]
                    + s.cpu_seconds["other"]) / s.seconds for s in by[p]])
        for p in medians
    }
    vcpus = len(os.sched_getaffinity(0))
    calibration = bench.facts.get("calibration")
    hash_mb = calibration["sha256_mb_s"] if isinstance(calibration, dict) else 1350.0
    parts.append(
        f"Per GB, the gRPC server used {rng([cpu(p, 'sender') for p in (direct, envoy, rest)], '{:.2f}')} CPU-s "
        f"against the peer sender's {cpu(PEER, 'sender'):.2f} (protobuf messages, HTTP/2 framing and grpcio's "
        "threads on top of the same file reads); Envoy added "
        f"{rng([cpu(p, 'envoy') for p in (envoy, rest)], '{:.2f}')}; and the client used "
        f"{rng([cpu(p, 'client') for p in (direct, envoy, rest)], '{:.2f}')} on the gallery paths against "
        f"{cpu(PEER, 'client'):.2f} on the peer's raw socket. sha256 alone is about {1e3 / hash_mb:.2f} CPU-s "
        f"per GB at {'this run' if isinstance(calibration, dict) else 'the baseline'}'s {hash_mb:.0f} MB/s and "
        "is the same on every path (the client hashes in series with receiving, the peer included), so most of "
        "the client's extra cost is the Python gRPC / httpx receive path, not the hashing. "
        "In all, the three processes spent "
        + ", ".join(f"{total[p]:.2f}" for p in medians)
        + " CPU-s per GB (table order), and the machine was "
        + ", ".join(f"{load[p]:.2f}" for p in medians)
        + f" of its {vcpus} vCPUs busy during the downloads (ours plus other processes and the kernel's "
        "loopback work)"
        + (
            ": it was essentially saturated, so throughput here follows total CPU per byte, and the ratio to "
            "the peer roughly tracks the ratio of those CPU costs "
            f"({', '.join(f'{total[PEER] / total[p]:.2f}' for p in (rest, direct, envoy))} for REST, gRPC "
            "direct and gRPC via Envoy). "
            if min(load.values()) >= 0.85 * vcpus
            else ". "
        )
    )
    envoy_peaks = [memory[p]["envoy"] for p in (envoy, rest)]
    rises = [memory[p]["max_rise"] for p in (direct, envoy, rest)]
    parts.append(
        f"\n\nMemory: the server's RSS rose by at most {max(rises):.0f} MiB during a {fmt_size(size)} download "
        f"(medians {rng([memory[p]['rise'] for p in (direct, envoy, rest)], '{:.0f}')} MiB) and Envoy peaked at "
        f"{rng(envoy_peaks, '{:.0f}')} MiB, "
        + (
            "so downloads stream: nothing close to the file is held in memory. "
            if not failures
            else "**which is more than a streaming download should hold**: " + "; ".join(failures) + ". "
        )
        + f"The peer's sender process peaked at {memory[PEER]['peak']:.0f} MiB (a bare interpreter and one "
        "1 MiB buffer)."
    )
    parts.append(
        "\n\nFor scale (performance-baseline notes, same kind of machine): loopback TCP 2,900 MB/s (iperf3) / "
        "3,700 MB/s (Python socket) without hashing, sha256 on one core 1,350 MB/s. The machine is shared and "
        "noisy: compare paths by the same-run ratios, not by absolute figures from different days."
    )
    return "".join(parts)


# -- scenario: local ceilings of this machine, measured in the same run -------------------------


def scenario_calibration(bench: Bench) -> Section:
    """sha256 and file write (+ fsync) of the upload size on one core, in the stack's data directory."""
    opts = bench.options
    size = opts.size
    rows_raw = []
    scratch = bench.stack.data_dir / "calibration.bin"
    for _ in range(opts.runs):
        stream = bench.payload.stream(size)
        started = time.monotonic()
        for _chunk in stream:
            pass
        hash_s = time.monotonic() - started
        fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            blocks = bench.payload.blocks
            started = time.monotonic()
            for i in range(size // bench.payload.chunk_bytes):
                os.write(fd, blocks[i % len(blocks)])
            write_s = time.monotonic() - started
            os.fsync(fd)
            fsync_s = time.monotonic() - started - write_s
        finally:
            os.close(fd)
            scratch.unlink(missing_ok=True)
        rows_raw.append({"hash_s": hash_s, "write_s": write_s, "fsync_s": fsync_s})
        print(f"  sha256 {size / hash_s / 1e6:6.0f} MB/s   write {size / write_s / 1e6:6.0f} MB/s   "
              f"fsync {fsync_s:5.2f} s", flush=True)
    hash_mb = [size / r["hash_s"] / 1e6 for r in rows_raw]
    write_mb = [size / r["write_s"] / 1e6 for r in rows_raw]
    fsync_s = [r["fsync_s"] for r in rows_raw]
    both_mb = [size / (r["write_s"] + r["fsync_s"]) / 1e6 for r in rows_raw]
    bench.facts["calibration"] = {
        "sha256_mb_s": median(hash_mb), "write_mb_s": median(write_mb), "write_fsync_mb_s": median(both_mb),
    }
    header = ["what (one core, no network)", "median", "min – max"]
    rows = [
        [f"sha256 of {fmt_size(size)} (hashlib, 1 MiB updates), MB/s", f"{median(hash_mb):.0f}", spread(hash_mb)],
        [f"write {fmt_size(size)} to the data directory (1 MiB os.write), MB/s", f"{median(write_mb):.0f}",
         spread(write_mb)],
        ["then fsync, s", f"{median(fsync_s):.2f}", spread(fsync_s, "{:.2f}")],
        ["write + fsync, MB/s", f"{median(both_mb):.0f}", spread(both_mb)],
    ]
    markdown = (
        "What one core of this machine managed in the same run, without gRPC, HTTP or Envoy: the per-byte work "
        "that every upload path has to do in the server. The data directory is the stack's (same filesystem as "
        "the uploads).\n\n" + md_table(header, rows)
    )
    return Section("Calibration: local ceilings in this run", text_table(header, rows), markdown, rows_raw)


SCENARIOS: dict[str, Callable[[Bench], Section]] = {
    "calibration": scenario_calibration,
    "uploads": scenario_uploads,
    "downloads": scenario_downloads,
}


# -- machine description and report -------------------------------------------------------------


def machine() -> dict[str, str]:
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(next(line for line in f if line.startswith("MemTotal:")).split()[1])
    try:
        out = subprocess.run(
            [supervisor.envoy_binary(), "--version"], capture_output=True, text=True, timeout=30
        ).stdout
        envoy = out.split("version:", 1)[1].split("/")[1]
    except (OSError, IndexError, subprocess.SubprocessError):
        envoy = "unknown"
    return {
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": model,
        "memory": f"{mem_kib / (1 << 20):.1f} GiB",
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "httpx": httpx.__version__,
        "envoy": envoy,
        "date": datetime.date.today().isoformat(),
        "loadavg": " ".join(pathlib.Path("/proc/loadavg").read_text().split()[:3]),
        "commit": _git_commit(),
    }


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=30
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_benchmarks_md(sections: list[Section], info: dict[str, str], opts: Options, elapsed: float) -> None:
    lines = [
        "# Benchmarks",
        "",
        "Produced by `make bench` (`.venv/bin/python bench/run.py`), which rewrites this file; "
        "`make bench-quick` runs the same code on small sizes as a smoke test and leaves it alone. "
        "The stack is the real one (`python -m gallery_server run`: the gRPC server and Envoy, started by the "
        "supervisor on free ports with a temporary data directory on the local disk, SQLite).",
        "",
        "## Machine",
        "",
        f"- {info['nproc']} vCPU, {info['cpu']}, {info['memory']} RAM",
        f"- {info['kernel']}, Python {info['python']}, Envoy {info['envoy']}, grpcio {info['grpcio']}, "
        f"httpx {info['httpx']} (client)",
        f"- gallery commit {info['commit']} (server and Envoy configuration as measured)",
        f"- date {info['date']}; {opts.runs} runs per measurement; the whole run took {elapsed / 60:.1f} min; "
        f"load average when the run started {info['loadavg']}",
        "- client, Envoy and the gRPC server share this machine's CPUs (loopback networking); other, unrelated "
        "processes were running on the machine too (see \"other processes CPU/s\", which also counts the "
        "kernel's softirq work such as loopback networking)",
        "",
        "Units: MB/s = 10^6 bytes per second; RSS in MiB (2^20 bytes). The machine is shared and noisy: "
        "quote medians and compare only ratios measured in the same run.",
    ]
    for section in sections:
        lines += ["", f"## {section.title}", "", section.markdown]
    BENCHMARKS_MD.write_text("\n".join(lines) + "\n")


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, 1 run, do not rewrite BENCHMARKS.md")
    parser.add_argument("--runs", type=int, help="repetitions of each measurement (default 3; --quick: 1)")
    parser.add_argument("--size", type=int, help="bytes of the large upload (default 1 GiB; --quick: 16 MiB)")
    parser.add_argument("--ref-size", type=int, help="bytes of the reference upload (default 64 MiB; --quick: 4 MiB)")
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS), help="run only these")
    parser.add_argument("--no-write", action="store_true", help="do not rewrite BENCHMARKS.md")
    args = parser.parse_args(argv)
    size = args.size or (16 * MiB if args.quick else GiB)
    ref_size = args.ref_size or (4 * MiB if args.quick else 64 * MiB)
    if ref_size >= size:
        parser.error("--ref-size must be smaller than --size")
    runs = args.runs or (1 if args.quick else 3)
    if runs < 1:
        parser.error("--runs must be at least 1")
    return Options(
        quick=args.quick,
        runs=runs,
        size=size,
        ref_size=ref_size,
        scenarios=args.scenario or list(SCENARIOS),
        write_report=not (args.quick or args.no_write),
    )


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    # SIGTERM must unwind through the finally blocks below (stop the stack, remove the temp dir).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    info = machine()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="gallery-bench-"))
    stack: local_stack.Stack | None = None
    sections: list[Section] = []
    try:
        stack = local_stack.start_stack(
            tmp / "data", tmp / "gallery.log", jwt_secret=JWT_SECRET,
            extra_env={"GALLERY_MAX_UPLOAD_BYTES": str(max(opts.size * 2, 16 * GiB)), "GALLERY_LOG_LEVEL": "WARNING"},
        )
        print(
            f"stack up: Envoy {stack.base_url} (pid {stack.envoy_pid}), gRPC server {stack.grpc_address} "
            f"(pid {stack.server_pid}), data {stack.data_dir}",
            flush=True,
        )
        token = auth.mint(
            JWT_SECRET, subject="bench", devices=[DEVICE], scope=f"{auth.READ} {auth.WRITE}", ttl_seconds=6 * 3600
        )
        timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=10)
        with (
            httpx.Client(base_url=stack.base_url, timeout=timeout) as http,
            grpc.insecure_channel(stack.envoy_grpc_address) as envoy_channel,
            grpc.insecure_channel(stack.grpc_address) as direct_channel,
        ):
            bench = Bench(opts, stack, token, http, envoy_channel, direct_channel, Payload())
            for name in opts.scenarios:
                print(f"\n== {name}", flush=True)
                section = SCENARIOS[name](bench)
                sections.append(section)
                print(f"\n{section.title}\n\n{section.console}\n", flush=True)
    except (BenchError, RuntimeError) as exc:
        print(f"\nFAILED: {exc}", file=sys.stderr)
        if stack is not None:
            print(f"--- stack log (tail)\n{stack.log()[-6000:]}", file=sys.stderr)
        return 1
    finally:
        if stack is not None:
            local_stack.stop_stack(stack)
        shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.monotonic() - started
    failures = [f for s in sections for f in s.failures]
    for failure in failures:
        print(f"PROBLEM: {failure}", file=sys.stderr)
    print(f"finished in {elapsed:.0f} s", flush=True)
    if opts.write_report:
        write_benchmarks_md(sections, info, opts, elapsed)
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        raw = {"machine": info, "options": dataclasses.asdict(opts), "sections": {s.title: s.raw for s in sections}}
        (RESULTS_DIR / f"{stamp}.json").write_text(json.dumps(raw, indent=1))
        print(f"wrote {BENCHMARKS_MD.relative_to(ROOT)} and bench/results/{stamp}.json")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
