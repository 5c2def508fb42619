"""The real stack for benchmarks: `python -m gallery_server run` (the supervisor that owns the gRPC
server and the real Envoy binary) on free ports and a temporary data root, plus /proc probes for the
memory and CPU of its processes.

Deliberately independent of tests/: benchmarks must not import test code.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

from gallery_server import supervisor

PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclasses.dataclass
class Stack:
    process: subprocess.Popen[bytes]  # the supervisor (`gallery run`)
    data_dir: pathlib.Path
    log_path: pathlib.Path
    base_url: str  # http://127.0.0.1:<envoy port>: REST and native gRPC
    grpc_address: str  # the gRPC server itself, behind Envoy
    envoy_grpc_address: str  # native gRPC through Envoy
    admin_port: int
    jwt_secret: str
    server_pid: int = 0
    envoy_pid: int = 0

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def start_stack(
    data_dir: pathlib.Path,
    log_path: pathlib.Path,
    *,
    jwt_secret: str,
    extra_env: dict[str, str] | None = None,
) -> Stack:
    http_port, grpc_port, admin_port = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "GALLERY_DATA_DIR": str(data_dir),
        "GALLERY_HTTP_ADDRESS": f"127.0.0.1:{http_port}",
        "GALLERY_GRPC_ADDRESS": f"127.0.0.1:{grpc_port}",
        "GALLERY_ENVOY_ADMIN_PORT": str(admin_port),
        "GALLERY_PUBLIC_URL": f"http://127.0.0.1:{http_port}",
        "GALLERY_JWT_SECRET": jwt_secret,
        **(extra_env or {}),
    }
    with log_path.open("wb") as log:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(
            [sys.executable, "-m", "gallery_server", "run"], env=env, stdout=log, stderr=log
        )
    stack = Stack(
        process=process,
        data_dir=data_dir,
        log_path=log_path,
        base_url=f"http://127.0.0.1:{http_port}",
        grpc_address=f"127.0.0.1:{grpc_port}",
        envoy_grpc_address=f"127.0.0.1:{http_port}",
        admin_port=admin_port,
        jwt_secret=jwt_secret,
    )
    try:
        supervisor.wait_grpc_healthy(stack.grpc_address, process=process)
        supervisor.wait_envoy_ready(admin_port, process=process)
        # Envoy is ready before its health checker has seen the backend: wait for a real answer.
        supervisor.wait_grpc_healthy(stack.envoy_grpc_address, process=process)
        stack.server_pid, stack.envoy_pid = _find_children(process.pid)
    except (TimeoutError, RuntimeError) as exc:
        stop_stack(stack)
        raise RuntimeError(f"stack did not start: {exc}\n{stack.log_tail()}") from None
    return stack


def stop_stack(stack: Stack) -> None:
    if stack.process.poll() is None:
        stack.process.send_signal(signal.SIGTERM)
        try:
            stack.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            stack.process.kill()
            stack.process.wait()
    # The supervisor normally stops its children; never leave one behind if it could not.
    for pid in (stack.server_pid, stack.envoy_pid):
        if pid and _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# -- /proc probes -------------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found.extend(int(p) for p in f.read().split())
        except FileNotFoundError:
            continue
    return found


def cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [part.decode(errors="replace") for part in f.read().split(b"\0") if part]


def _find_children(supervisor_pid: int) -> tuple[int, int]:
    """(gRPC server pid, Envoy pid) among the supervisor's children."""
    server = envoy = 0
    for pid in children(supervisor_pid):
        args = cmdline(pid)
        if "gallery_server" in args and "serve" in args:
            server = pid
        elif args and os.path.basename(args[0]) == "envoy":  # the envoy wrapper exec()s the binary
            envoy = pid
    if not server or not envoy:
        raise RuntimeError(f"could not find server ({server}) and envoy ({envoy}) processes")
    return server, envoy


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def status_kib(pid: int, field: str) -> int:
    """A `kB` field of /proc/<pid>/status (VmRSS, VmHWM, ...) in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def rss_kib(pid: int) -> int:
    # statm is cheaper to read than status: second field is resident pages.
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE_KIB


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False if the kernel refuses."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def machine_busy_seconds() -> float:
    """CPU time (all CPUs, every process and the kernel) spent not idle since boot."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class MemoryProbe:
    """Measures the peak RSS of some processes over an interval.

    The peak is the larger of VmHWM (after resetting it at the start, so it covers exactly the
    interval) and the maximum VmRSS sampled every `interval` seconds by a thread (the fallback if
    the kernel does not allow the reset).
    """

    def __init__(self, pids: dict[str, int], interval: float = 0.05) -> None:
        self.pids = pids
        self.interval = interval
        self.baseline: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.hwm_reset: dict[str, bool] = {}
        self.started = 0.0  # time.monotonic() at __enter__
        self.series: list[tuple[float, ...]] = []  # (seconds since start, RSS KiB of each pid in order)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)

    def __enter__(self) -> MemoryProbe:
        self.started = time.monotonic()
        for name, pid in self.pids.items():
            self.baseline[name] = rss_kib(pid)
            self.hwm_reset[name] = reset_peak(pid)
            self.peak[name] = self.baseline[name]
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            row: list[float] = [round(time.monotonic() - self.started, 3)]
            for name, pid in self.pids.items():
                try:
                    rss = rss_kib(pid)
                except (FileNotFoundError, ProcessLookupError):
                    rss = 0
                self.peak[name] = max(self.peak[name], rss)
                row.append(rss)
            self.series.append(tuple(row))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for name, pid in self.pids.items():
            try:
                if self.hwm_reset[name]:
                    self.peak[name] = max(self.peak[name], status_kib(pid, "VmHWM"))
                self.peak[name] = max(self.peak[name], rss_kib(pid))
            except (FileNotFoundError, ProcessLookupError):
                pass

