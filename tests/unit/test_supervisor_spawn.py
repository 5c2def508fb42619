"""How `gallery run` starts its server and Envoy (supervisor.spawn): each gets SIGTERM when the
supervisor dies, and is started by vfork(), which runs no fork handlers. A child started with a
`preexec_fn` is fork()ed, which runs grpc's pthread_atfork handlers, and from a process with
running grpc threads they aborted it now and then (SIGABRT): "envoy exited with -6 while
starting", once in a CI run."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2_grpc

from gallery_server import cli, local_stack, supervisor

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


def test_no_fork_handler_runs_in_the_child(tmp_path):
    # Python's own at-fork hooks run in the child on the same path as grpc's C ones (fork(), for a
    # preexec_fn), and a test can see them.
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


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_the_child_is_started_by_vfork():
    traced = subprocess.run(
        ["strace", "-f", "-qq", "-e", "trace=fork,vfork,clone,clone3", sys.executable, "-c",
         "from gallery_server import supervisor; supervisor.spawn(['true']).wait()"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(SERVER_DIR)})
    assert traced.returncode == 0, traced.stderr
    calls = [line for line in traced.stderr.splitlines() if re.search(r"\b(fork|vfork|clone3?)\(", line)]
    assert any("vfork(" in line for line in calls), calls
    # fork() is glibc's clone() of a new process (SIGCHLD) that shares no memory (no CLONE_VM).
    assert not [line for line in calls if "SIGCHLD" in line and "CLONE_VM" not in line], calls


def test_envoys_lines_reach_the_shared_output_whole(tmp_path):
    """Envoy writes a line in two pieces now and then (its access log's buffer); the server writes
    its own line between them to the output they share: each still reaches it whole, and every
    line of Envoy's reaches it, also after the output stopped taking them."""
    output = tmp_path / "gallery.log"
    shared = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    read_end, write_end = os.pipe()
    relay = threading.Thread(target=supervisor.pass_lines, args=(os.fdopen(read_end, "rb"), shared))
    relay.start()
    os.write(write_end, b'{"logger": "envoy", "flags"')
    time.sleep(0.2)  # the relay has the first piece
    os.write(shared, b'{"logger": "server"}\n')
    os.write(write_end, b': "DC"}\n{"logger": "envoy", "last": true}\n')
    os.close(write_end)
    relay.join(timeout=10)
    os.close(shared)
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert lines == [{"logger": "server"}, {"logger": "envoy", "flags": "DC"}, {"logger": "envoy", "last": True}]

    # An output that fails (a terminal closed: EPIPE): Envoy's lines are still read, so it never
    # blocks on a full pipe.
    gone_reader, gone_output = os.pipe()
    os.close(gone_reader)
    read_end, write_end = os.pipe()
    relay = threading.Thread(target=supervisor.pass_lines, args=(os.fdopen(read_end, "rb"), gone_output))
    relay.start()
    for _ in range(200):  # past a pipe's 64 KiB
        os.write(write_end, b"x" * 1000 + b"\n")
    os.close(write_end)
    relay.join(timeout=10)
    assert not relay.is_alive()
    os.close(gone_output)


_HEALTHY_SERVER = """
    import sys, time
    from concurrent import futures
    import grpc
    from grpc_health.v1 import health, health_pb2_grpc
    server = grpc.server(futures.ThreadPoolExecutor(2), options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    server.add_insecure_port(sys.argv[1])
    server.start()
    time.sleep(60)
"""


def test_a_health_check_another_process_answers_is_not_the_servers():
    """A process that took the server's port between the port check and the server's bind answers
    the health check SERVING; the server then fails to bind and exits. `gallery run` waits for its
    own (a test's stack once printed "up" over another test's server), and says why it stopped."""
    other = grpc.server(futures.ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), other)
    address = f"127.0.0.1:{other.add_insecure_port('127.0.0.1:0')}"
    other.start()
    try:
        assert supervisor.listens(os.getpid(), int(address.rsplit(":", 1)[1])) is True
        failing = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1); raise SystemExit(1)"])
        with pytest.raises(TimeoutError, match="exited with 1 while starting"):
            supervisor.wait_grpc_healthy(address, process=failing, timeout=20, listening=True)
        failing.wait()
    finally:
        other.stop(None)
    own = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_HEALTHY_SERVER), address])
    try:
        supervisor.wait_grpc_healthy(address, process=own, timeout=30, listening=True)
        assert supervisor.listens(own.pid, int(address.rsplit(":", 1)[1])) is True
    finally:
        own.kill()
        own.wait()


def test_ports_for_a_stack_are_chosen_below_the_ephemeral_range():
    """Where no outgoing connection is given one as its local port (local_stack._below_ephemeral):
    distinct, and free to bind."""
    low = int(pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(20):
        ports = local_stack.free_ports(3)
        assert len(set(ports)) == 3 and all(10000 <= port < low for port in ports), ports
        for port in ports:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port))


@pytest.mark.parametrize("variable", ["GALLERY_HTTP_ADDRESS", "GALLERY_ENVOY_ADMIN_PORT"])
def test_gallery_envoy_refuses_a_port_another_process_holds(tmp_path, monkeypatch, capsys, variable):
    """Envoy binds its listener with SO_REUSEPORT: a second edge started on a running gallery's
    port shared its traffic, and sent 8 of 20 of its requests to a backend that was not up."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        other = local_stack.free_ports(1)[0]
        addresses = {"GALLERY_HTTP_ADDRESS": f"127.0.0.1:{other}", "GALLERY_ENVOY_ADMIN_PORT": str(other)}
        addresses[variable] = f"127.0.0.1:{port}" if variable == "GALLERY_HTTP_ADDRESS" else str(port)
        for name, value in {"GALLERY_DATA_DIR": str(tmp_path), **addresses}.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setattr(os, "execvp", lambda *_: pytest.fail("Envoy was started over a held port"))
        assert cli.main(["envoy", "--backend", "127.0.0.1:1", "--config", str(tmp_path / "envoy.yaml")]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"gallery: {variable} 127.0.0.1:{port}: ") and "in use" in error, error
    assert not (tmp_path / "envoy.yaml").exists()  # refused before anything was written
