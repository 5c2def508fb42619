"""How `gallery run` starts its server and Envoy (supervisor.spawn): each gets SIGTERM when the
supervisor dies, and no Python runs in the forked child before exec. A child forked to run Python
in it (a `preexec_fn`) from a process with running grpc threads aborted now and then (SIGABRT) in
grpc's fork handlers: "envoy exited with -6 while starting", once in a CI run."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap
import time

from gallery_server import supervisor

SERVER_DIR = pathlib.Path(supervisor.__file__).parent.parent


def _run_script(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=30, env={**os.environ, "PYTHONPATH": str(SERVER_DIR)})


def _gone(pid: int) -> bool:
    """Exited; a zombie not yet reaped by its new parent counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_no_python_runs_in_the_forked_child(tmp_path):
    # Python calls its at-fork hooks in a child only when it runs Python code there before exec,
    # which is when grpc's fork handlers run too.
    marker = tmp_path / "ran-in-child"
    result = _run_script("""
        import os, sys
        from gallery_server import supervisor
        marker = sys.argv[1]
        os.register_at_fork(after_in_child=lambda: os.close(os.open(marker, os.O_CREAT | os.O_WRONLY)))
        child = supervisor.spawn([sys.executable, "-c", "print('child ran')"])
        child.wait()
        print(child.returncode)
    """, str(marker))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["child", "ran", "0"]
    assert not marker.exists()


def test_the_child_gets_sigterm_when_the_supervisor_is_killed():
    result = _run_script("""
        import os, sys, time
        from gallery_server import supervisor
        child = supervisor.spawn(["sleep", "60"])
        while os.path.basename(os.readlink(f"/proc/{child.pid}/exe")) != "sleep":
            time.sleep(0.01)  # until its first step has asked for the signal and exec'd
        print(child.pid, flush=True)
        os._exit(9)  # as kill -9 would: nothing stops the child
    """)
    assert result.returncode == 9, result.stderr
    pid = int(result.stdout)
    deadline = time.monotonic() + 10
    while not _gone(pid):
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            raise AssertionError("the child outlived its supervisor")
        time.sleep(0.05)


def test_a_program_that_cannot_run_says_so_and_keeps_its_name():
    child = supervisor.spawn(["/nonexistent/envoy", "-c", "x"], stderr=subprocess.PIPE)
    _, stderr = child.communicate(timeout=30)
    assert child.returncode == 1
    assert child.args == ["/nonexistent/envoy", "-c", "x"]  # the name the supervisor's messages give
    assert stderr.decode().strip() == "gallery: cannot run /nonexistent/envoy: No such file or directory"
