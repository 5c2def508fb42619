"""Children that end with their parent, and commands that stop cleanly: `gallery run`'s server and
Envoy, `gallery backup`'s pg_dump and `gallery restore`'s pg_restore never outlive the process
that started them, even killed outright; and backup and restore, stopped by Ctrl-C, SIGTERM or
SIGHUP (cli.py turns each into an exception where the command is), end their child and remove
what they wrote without a second signal cutting that short."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

STOPPING = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
# How long a wait for a child goes without looking for a signal: CPython runs handlers in the main
# thread only, and a signal the kernel gives another thread (as it does while subprocess's vfork()
# blocks them all in the main thread) does not end the main thread's wait; the main thread sees it
# when it next takes the GIL (CPython's bpo-40010). Waiting in one piece, 4 of 400 stops sent in a
# child's first milliseconds waited for the child's end (test_stoppable.py).
SIGNAL_LOOK_SECONDS = 0.5


# The first step of each child, as `python -I -c`: it asks for SIGTERM when its parent dies,
# then becomes the child's own program. It cannot be asked for in a `preexec_fn`: with one,
# subprocess starts the child with fork(), not vfork(), and fork() runs grpc's pthread_atfork
# handlers, which in a process whose grpc threads are running crash the child now and then before
# it can exec (SIGABRT, about 1 in 1,000 while a call is in flight; grpc/grpc#43055). vfork() runs
# no fork handlers.
_DIE_WITH_PARENT = """\
import ctypes, os, signal, sys
parent, command = int(sys.argv[1]), sys.argv[2:]
prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)  # Linux only
if prctl is not None:
    prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the line above: no signal will come
        sys.exit(1)
try:
    os.execvp(command[0], command)
except OSError as exc:
    sys.exit(f"gallery: cannot run {command[0]}: {exc.strerror}")
"""


def spawn(command: list[str], **popen_options: Any) -> subprocess.Popen[bytes]:
    """Start `command` in a session of its own (Ctrl-C reaches this process only, which ends the
    child itself), to get SIGTERM when this process dies: a supervisor killed outright (kill -9,
    an OOM kill) leaves no server or Envoy on its ports, a backup or a restore no pg_dump or
    pg_restore committing after it. "This process" is the thread that starts it, in fact: the
    main thread here. The kernel clears the setting for a binary with file capabilities (an Envoy
    given cap_net_bind_service to bind a low port), which then outlives a killed supervisor."""
    process = subprocess.Popen(
        [sys.executable, "-I", "-c", _DIE_WITH_PARENT, str(os.getpid()), *command],
        start_new_session=True, **popen_options,
    )
    process.args = command  # what it runs once the first step has exec'd: the name messages give
    return process


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP wait until the block is done, then arrive (the first of them).
    Their handlers are replaced meanwhile, rather than the signals blocked: a blocked signal still
    reaches Python through any other thread. Only the main thread sets handlers; elsewhere this
    holds nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, _frame: arrived.append(signum)) for signum in STOPPING}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if arrived:
            signal.raise_signal(arrived[0])  # its own handler now: the exception it raises, from here


def run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """subprocess.run(capture_output, text), except that the child cannot outlive this process:
    killed outright, this process takes it along (spawn); interrupted, it ends it. subprocess.run
    kills its child when interrupted while it waits, but not when interrupted while the child
    starts (Popen leaves a started child as it is): the start waits for no signal."""
    process = None
    try:
        with signals_held():
            process = spawn(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
        while True:
            try:
                stdout, stderr = process.communicate(timeout=SIGNAL_LOOK_SECONDS)
                break
            except subprocess.TimeoutExpired:  # output so far is kept for the next call
                continue
    except BaseException:
        if process is not None:
            process.kill()
            process.wait()
            process.stdout.close()  # type: ignore[union-attr]
            process.stderr.close()  # type: ignore[union-attr]
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
