"""What every benchmark scenario shares: options, the running stack and its clients, the upload
payload, a scenario's result (Section), CPU probes and table rendering."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import resource
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import _stack
import grpc
import httpx

from gallery_server import local_stack

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
RESULTS_DIR = ROOT / "bench" / "results"

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
CHUNK_BYTES = MiB
DEVICE = "bench-device"
JWT_SECRET = "bench-secret-" + secrets.token_hex(24)
REQUEST_TIMEOUT_S = 900
# For a stack whose database is seeded with rows that have no files (the listing scenario's
# 1,000,000 events): a reconciliation pass (every 600 s by default, so within a slow run) would
# report each as lost, ~30 s of the server's CPU in the middle of whatever is measured then. The
# start-up pass still runs, over a database without them: it takes milliseconds, a seed seconds,
# and each seed commits its rows at once.
SEEDED_STACK_ENV = {"GALLERY_RECONCILE_INTERVAL_SECONDS": str(7 * 24 * 3600)}


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
    peer: PeerServer | None = None
    facts: dict[str, object] = dataclasses.field(default_factory=dict)  # shared between scenarios
    # (scenario, target, measured, met): collected by the scenarios for the Targets section
    targets: list[tuple[str, str, str, bool | None]] = dataclasses.field(default_factory=list)

    @property
    def auth_header(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"}

    @property
    def pids(self) -> dict[str, int]:
        return {"server": self.stack.server_pid, "envoy": self.stack.envoy_pid, "client": os.getpid()}

    def receiver_pids(self, receiver: str) -> dict[str, int]:
        """The processes of a measurement: `server` is whichever receives (gallery or peer)."""
        if receiver == "peer":
            assert self.peer is not None
            return {"server": self.peer.pid, "envoy": self.stack.envoy_pid, "client": os.getpid()}
        return self.pids


@dataclasses.dataclass
class Section:
    """One scenario's results: console text, Markdown for BENCHMARKS.md, raw data, failures."""

    title: str
    console: str
    markdown: str
    raw: object
    failures: list[str] = dataclasses.field(default_factory=list)


# -- CPU probes --------------------------------------------------------------------------------

def client_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_now(pids: dict[str, int]) -> dict[str, float]:
    cpu = {name: _stack.cpu_seconds(pid) for name, pid in pids.items() if name != "client"}
    cpu["client"] = client_cpu()
    cpu["machine"] = _stack.machine_busy_seconds()
    return cpu


# -- statistics and rendering -------------------------------------------------------------------


def fmt_size(n: int) -> str:
    if n >= GiB and n % GiB == 0:
        return f"{n // GiB} GiB"
    if n >= MiB and n % MiB == 0:
        return f"{n // MiB} MiB"
    return f"{n} B"


T = TypeVar("T")


def median(values: list[float]) -> float:
    return statistics.median(values)


def median_of(samples: Iterable[T], figure: Callable[[T], float]) -> float:
    """The median of one figure of each sample."""
    return median([figure(s) for s in samples])


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


def formatted_or_dash(value: float | None, fmt: str = "{:.0f}") -> str:
    return "–" if value is None else fmt.format(value)


# -- the peers' process ---------------------------------------------------------------------------


class PeerServer:
    """bench/_peers.py under uvicorn (httptools, one process), on a free loopback port; files in
    `folder` (its temporary files too, so that FastAPI's spooling hits the same disk)."""

    def __init__(self, folder: pathlib.Path, log_path: pathlib.Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = local_stack.free_port()
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "PEER_DIR": str(folder), "TMPDIR": str(folder)}
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "uvicorn", "--app-dir", str(ROOT / "bench"), "_peers:app",
                # uvicorn's default logging, access lines included, as the gallery keeps its own.
                "--host", "127.0.0.1", "--port", str(self.port), "--http", "httptools",
            ],
            env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            if self.process.poll() is not None:
                raise BenchError(f"peer server exited with {self.process.returncode}: see {log_path}")
            try:
                if httpx.get(f"{self.url}/ping", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise BenchError("peer server did not answer /ping within 60 s")
            time.sleep(0.1)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()
