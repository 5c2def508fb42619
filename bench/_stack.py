"""/proc probes for the memory and CPU of the stack's processes. The stack itself comes from
gallery_server.local_stack (`gallery run` on free ports), as in the end-to-end tests.
"""

from __future__ import annotations

import os
import threading
import time

PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


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

