"""`gallery run` as a new user starts it: no secret configured, Ctrl-C/SIGTERM stops everything."""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time

import httpx

from gallery_server.local_stack import free_ports

from .conftest import start_stack, stop_stack


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) counts as gone.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_run_generates_secret_prints_token_and_stops_cleanly(tmp_path, monkeypatch):
    monkeypatch.delenv("GALLERY_JWT_SECRET", raising=False)
    data = tmp_path / "data"
    stack = start_stack(data, tmp_path / "run.log", extra_env={"GALLERY_JWT_SECRET": ""})
    try:
        secret_file = data / "jwt-secret"
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
        secret = secret_file.read_text().strip()
        assert len(secret) >= 32
        # The supervisor prints its banner once its own readiness checks pass.
        deadline = time.monotonic() + 30
        while not (match := re.search(r"export TOKEN=(\S+)", stack.log())):
            assert time.monotonic() < deadline, stack.log()
            time.sleep(0.1)
        token = match.group(1)
        r = httpx.get(stack.url("/api/gallery/device123/paths"),
                      headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200, r.text
        assert r.json()["success"] is True
        # The secret never reaches the log.
        assert secret not in stack.log()
        children = [stack.server_pid, stack.envoy_pid]  # found by their command lines
        assert all(_pid_alive(pid) for pid in children)
    finally:
        stop_stack(stack)
    assert stack.process.returncode == 0
    assert not any(_pid_alive(pid) for pid in children)


def test_run_reuses_existing_secret(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "jwt-secret").write_text("kept-secret-" + "k" * 40 + "\n")
    (data / "jwt-secret").chmod(0o600)
    stack = start_stack(data, tmp_path / "run.log", extra_env={"GALLERY_JWT_SECRET": ""})
    try:
        token = subprocess.run(
            [sys.executable, "-m", "gallery_server", "token", "--sub", "ops", "--device", "cam-1",
             "--scope", "gallery:read"],
            env={**os.environ, "GALLERY_DATA_DIR": str(data), "GALLERY_JWT_SECRET": ""},
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        headers = {"Authorization": f"Bearer {token}"}
        assert httpx.get(stack.url("/api/gallery/cam-1/stats"), headers=headers).status_code == 200
        # The minted token is limited to its device and scope.
        assert httpx.get(stack.url("/api/gallery/cam-2/stats"), headers=headers).status_code == 403
        assert httpx.get(stack.url("/api/gallery/cam-1/upload-url?filename=a.jpg"),
                         headers=headers).status_code == 403
    finally:
        stop_stack(stack)


def test_run_fails_fast_when_the_port_is_taken(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        http_port, admin_port = free_ports(2)
        env = {
            **os.environ,
            "GALLERY_DATA_DIR": str(tmp_path / "data"),
            "GALLERY_GRPC_ADDRESS": f"127.0.0.1:{port}",
            "GALLERY_HTTP_ADDRESS": f"127.0.0.1:{http_port}",
            "GALLERY_ENVOY_ADMIN_PORT": str(admin_port),
        }
        result = subprocess.run(
            [sys.executable, "-m", "gallery_server", "run"], env=env, capture_output=True,
            text=True, timeout=60,
        )
    assert result.returncode != 0
    assert "exited" in result.stderr


def test_sigint_stops_like_ctrl_c(tmp_path):
    stack = start_stack(tmp_path / "data", tmp_path / "run.log")
    children = [stack.server_pid, stack.envoy_pid]
    stack.process.send_signal(signal.SIGINT)
    stack.process.wait(timeout=30)
    assert stack.process.returncode == 0
    assert not any(_pid_alive(pid) for pid in children)


def test_run_refuses_a_data_directory_envoy_cannot_name(tmp_path):
    """Envoy's configuration is UTF-8: a data directory whose name is not stops `gallery run`
    with the way out (GALLERY_ENVOY_SENDS_FILES=false) instead of a traceback."""
    data_dir = os.fsdecode(os.fsencode(tmp_path) + b"/data-\xff")
    grpc_port, http_port, admin_port = free_ports(3)
    env = {
        **os.environ,
        "GALLERY_DATA_DIR": data_dir,
        "GALLERY_GRPC_ADDRESS": f"127.0.0.1:{grpc_port}",
        "GALLERY_HTTP_ADDRESS": f"127.0.0.1:{http_port}",
        "GALLERY_ENVOY_ADMIN_PORT": str(admin_port),
    }
    result = subprocess.run(
        [sys.executable, "-m", "gallery_server", "run"], env=env, capture_output=True,
        text=True, errors="replace", timeout=60,
    )
    assert result.returncode == 1
    assert "GALLERY_ENVOY_SENDS_FILES=false" in result.stderr
    assert "Traceback" not in result.stderr


def test_free_ports_are_distinct() -> None:
    for _ in range(200):
        assert len(set(free_ports(3))) == 3


def test_a_stack_whose_port_was_taken_meanwhile_starts_on_others(tmp_path, monkeypatch):
    """Ports chosen free may be taken before the stack binds them (another test process, or the
    OS handing a port just closed out again): start_stack then tries new ones."""
    from gallery_server import local_stack

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        first = [(taken, *local_stack.free_ports(2))]  # Envoy's port is in use
        chosen = local_stack.free_ports
        monkeypatch.setattr(local_stack, "free_ports", lambda n: first.pop() if first else chosen(n))
        stack = start_stack(tmp_path / "data", tmp_path / "run.log")
        try:
            assert not first and stack.http_port != taken
            assert httpx.get(stack.url("/api/gallery/cam1/stats"), timeout=10).status_code == 401
        finally:
            stop_stack(stack)
