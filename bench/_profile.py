"""Sampling profiles of the gallery server while a benchmark operation runs (py-spy, from the
`bench` extra), summarised as the Python frames where its threads spent their samples.

py-spy attaches to the running server process (ptrace); where the kernel does not allow that
(e.g. `kernel.yama.ptrace_scope` >= 2 without CAP_SYS_PTRACE) the profile is reported as missing.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

# Frames where a thread waits rather than works (sampled because py-spy's idle detection cannot see
# through grpc's and threading's waits): listed separately from the work.
WAITING = ("Condition.wait", "Event.wait", "_worker (concurrent/futures/thread.py:81)", "_serve (grpc/_server.py:1314)",
           "BackgroundLoop._run")


@dataclasses.dataclass
class Profile:
    what: str
    samples: int
    waiting: int
    top_self: list[tuple[str, int]]
    top_inclusive: list[tuple[str, int]]
    error: str = ""
    gil: bool = False  # only the thread holding the GIL was sampled


def py_spy() -> str | None:
    found = shutil.which("py-spy") or str(pathlib.Path(sys.executable).with_name("py-spy"))
    return found if os.access(found, os.X_OK) else None


def record(pid: int, what: str, action: Callable[[], object], rate: int = 200, gil: bool = False) -> Profile:
    """Profile process `pid` while `action()` runs; with `gil`, only the thread holding the GIL."""
    binary = py_spy()
    if binary is None:
        action()
        return Profile(what, 0, 0, [], [], "py-spy is not installed (pip install -e '.[bench]')")
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "profile.txt"
        spy = subprocess.Popen(
            [binary, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw", "--nonblocking",
             *(["--gil"] if gil else []), "-o", str(out)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        time.sleep(1.0)  # attach
        try:
            action()
        finally:
            spy.send_signal(signal.SIGINT)
            try:
                log, _ = spy.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                spy.kill()
                log, _ = spy.communicate()
        if not out.exists():
            return Profile(what, 0, 0, [], [], f"py-spy failed: {log.strip()[-300:]}")
        return dataclasses.replace(summarise(what, out.read_text()), gil=gil)


def summarise(what: str, folded: str, top: int = 12) -> Profile:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = waiting = 0
    for line in folded.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if f and not f.startswith(("Thread.", "<module>"))]
        if not frames:
            continue
        total += n
        if any(w in frames[-1] for w in WAITING):
            waiting += n
            continue
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    return Profile(what, total, waiting, own.most_common(top), inclusive.most_common(top))


def markdown(profile: Profile) -> str:
    if profile.error:
        return f"**{profile.what}**: no profile ({profile.error})."
    working = profile.samples - profile.waiting
    if not working:
        return f"**{profile.what}**: no samples."
    rows = ["| share of working samples | own time in (file:line) |", "| ---: | --- |"]
    rows += [f"| {n / working:.0%} | `{frame}` |" for frame, n in profile.top_self]
    rows += ["", "| share of working samples | inclusive (the frame and what it called) |", "| ---: | --- |"]
    rows += [f"| {n / working:.0%} | `{frame}` |" for frame, n in profile.top_inclusive]
    sampled = "the thread holding the GIL" if profile.gil else "the server's threads"
    return (
        f"**{profile.what}**: {profile.samples} samples of {sampled}, of which {profile.waiting} "
        f"({profile.waiting / profile.samples:.0%}) in waits (condition/queue waits, grpc's completion-queue "
        "poll, the background loop).\n\n" + "\n".join(rows)
    )
