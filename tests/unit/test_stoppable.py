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
    milliseconds; the pids of those still running afterwards. Each stop must end its run within
    a few seconds: the child would sleep 30.

    Another thread waits in a system call meanwhile, as a server's or pytest-xdist's do: the
    kernel gives it the signals that arrive while subprocess's vfork() blocks them all in the main
    thread, and the main thread sees those only when it next takes the GIL."""
    pids = tmp_path / "pids"
    command = ["sh", "-c", f"echo $$ >> {pids}; exec sleep 30"]
    bystander_end, bystander_start = os.pipe()
    bystander = threading.Thread(target=os.read, args=(bystander_end, 1), daemon=True)
    bystander.start()
    previous = signal.signal(signal.SIGTERM, _stop)
    slow = []
    try:
        for _ in range(runs):
            timer = threading.Timer(random.uniform(0, 0.004), os.kill, (os.getpid(), signal.SIGTERM))
            started = time.monotonic()
            try:
                timer.start()
                run(command)
                pytest.fail("the child ran to its end: the signal never came")
            except Stopped:  # once per run, wherever it came
                pass
            timer.join()
            if time.monotonic() - started > 5:
                slow.append(round(time.monotonic() - started, 1))
    finally:
        signal.signal(signal.SIGTERM, previous)
        os.write(bystander_start, b"x")
        bystander.join()
        os.close(bystander_start)
        os.close(bystander_end)
    assert slow == [], "stops seen only when the child ended"
    time.sleep(0.2)  # a killed child's parent reaps it at once; give a leaked one's `sh` time to write
    started = [int(line) for line in pids.read_text().split()] if pids.exists() else []
    return [pid for pid in started if _running(pid)]


def test_a_signal_never_leaves_the_child_running(tmp_path):
    left = interrupted_runs(lambda command: stoppable.run(command, dict(os.environ)), tmp_path, 400)
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

