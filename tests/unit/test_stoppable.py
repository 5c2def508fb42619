"""A signal that stops `gallery backup` or `gallery restore` (cli.py turns it into an exception)
never leaves its pg_dump or pg_restore running, whenever it arrives: while the child starts too,
where subprocess.run would leave it (Popen does not kill a child it has started when interrupted
before it returns: 104 of 263 children outlived subprocess.run in this test). Real signals, at
random moments, to real children."""

from __future__ import annotations

import os
import pathlib
import random
import signal
import threading
import time

import pytest

from gallery_server import stoppable

from .test_backup import _running


class Stopped(BaseException):
    pass


def _stop(signum: int, frame: object) -> None:
    raise Stopped


def interrupted_runs(run, tmp_path: pathlib.Path, runs: int) -> list[int]:  # type: ignore[no-untyped-def]
    """Start `runs` children with `run`, each stopped by a SIGTERM at a random moment of its first
    milliseconds; the pids of those still running afterwards."""
    pids = tmp_path / "pids"
    command = ["sh", "-c", f"echo $$ >> {pids}; exec sleep 30"]
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        for _ in range(runs):
            timer = threading.Timer(random.uniform(0, 0.004), os.kill, (os.getpid(), signal.SIGTERM))
            try:
                timer.start()
                run(command)
                pytest.fail("the child ran to its end: the signal never came")
            except Stopped:  # once per run, wherever it came
                pass
            timer.join()
    finally:
        signal.signal(signal.SIGTERM, previous)
    time.sleep(0.2)  # a killed child's parent reaps it at once; give a leaked one's `sh` time to write
    started = [int(line) for line in pids.read_text().split()] if pids.exists() else []
    return [pid for pid in started if _running(pid)]


def test_a_signal_never_leaves_the_child_running(tmp_path):
    left = interrupted_runs(lambda command: stoppable.run(command, dict(os.environ)), tmp_path, 40)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert left == []


def test_signals_held_arrive_when_the_block_ends():
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        with pytest.raises(Stopped):
            with stoppable.signals_held():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
                done = True  # reached: the signal waited
        assert done
    finally:
        signal.signal(signal.SIGTERM, previous)

