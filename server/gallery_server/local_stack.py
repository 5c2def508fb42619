"""A whole local stack in a subprocess: `gallery run` (gRPC server + Envoy) on free ports and a
data root of your choosing, started and stopped from Python.

For end-to-end tests and benchmarks, here and in projects that integrate with the gallery:

    stack = start_stack(tmp / "data", tmp / "gallery.log", jwt_secret="...")
    ... httpx.get(stack.url("/api/gallery/cam1/stats"), headers=...) ...
    stop_stack(stack)
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import random
import signal
import socket
import subprocess
import sys

from . import supervisor

# A port chosen free may be taken by another process before the stack binds it (tests run in
# several processes at once): a stack that fails to bind is started again on new ports.
BIND_ATTEMPTS = 3


def free_port() -> int:
    return free_ports(1)[0]


def _below_ephemeral() -> range:
    """The ports below the kernel's ephemeral range (Linux: ip_local_port_range), from 10000.

    A port the kernel handed out for a bind to port 0 and that was let go is the kernel's to hand
    out again as the local port of any outgoing connection (a test's database client, Envoy's
    upstream): one took a stack's gRPC port between its choice and its server's bind, in two of
    the whole suite's runs on 2026-12-01. A port below that range is only ever taken by a bind
    that names it."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return range(0)
    return range(10000, low)


def free_ports(count: int) -> tuple[int, ...]:
    """`count` distinct free ports, chosen at random below the ephemeral range where there is one
    (_below_ephemeral), else as the kernel hands them out: each is held while the next is chosen
    (a port closed a moment ago may be handed out again at once: one stack got the same port for
    Envoy and its server)."""
    candidates = _below_ephemeral()
    with contextlib.ExitStack() as held:
        chosen: list[int] = []
        for port in random.sample(candidates, min(len(candidates), 64 * count)):
            s = held.enter_context(socket.socket())
            try:
                s.bind(("127.0.0.1", port))  # free: no listener, no connection, none in TIME_WAIT
            except OSError:
                continue
            chosen.append(port)
            if len(chosen) == count:
                return tuple(chosen)
        sockets = [held.enter_context(socket.socket()) for _ in range(count - len(chosen))]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return (*chosen, *(int(s.getsockname()[1]) for s in sockets))


@dataclasses.dataclass
class Stack:
    process: subprocess.Popen[bytes]  # the supervisor
    data_dir: pathlib.Path
    log_path: pathlib.Path
    http_port: int  # Envoy: REST and native gRPC
    grpc_port: int  # the gRPC server itself, behind Envoy
    admin_port: int  # Envoy admin
    server_pid: int = 0
    envoy_pid: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def envoy_grpc_address(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def ports(self) -> tuple[int, int, int]:
        """(http, grpc, admin): pass to start_stack to restart on the same addresses."""
        return self.http_port, self.grpc_port, self.admin_port

    def url(self, path: str) -> str:
        return self.base_url + path

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def start_stack(
    data_dir: pathlib.Path,
    log_path: pathlib.Path,
    *,
    jwt_secret: str,
    extra_env: dict[str, str] | None = None,
    ports: tuple[int, int, int] | None = None,
) -> Stack:
    """Start `gallery run` and return once REST and gRPC answer through Envoy; without `ports`,
    on free ones (again on others if one was taken meanwhile).

    Raises RuntimeError (with the log) if it does not come up."""
    for _ in range(BIND_ATTEMPTS - 1):
        try:
            return _start(data_dir, log_path, jwt_secret, extra_env, ports or free_ports(3))
        except RuntimeError as exc:
            if ports is not None or "Address already in use" not in str(exc):
                raise
    return _start(data_dir, log_path, jwt_secret, extra_env, ports or free_ports(3))


def _start(
    data_dir: pathlib.Path, log_path: pathlib.Path, jwt_secret: str,
    extra_env: dict[str, str] | None, ports: tuple[int, ...],
) -> Stack:
    http_port, grpc_port, admin_port = ports
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
    stack = Stack(process, data_dir, log_path, http_port, grpc_port, admin_port)
    try:
        supervisor.wait_grpc_healthy(stack.grpc_address, process=process)
        supervisor.wait_envoy_ready(admin_port, process=process)
        # Envoy is ready before its health checker has seen the backend: wait for a real answer.
        supervisor.wait_grpc_healthy(stack.envoy_grpc_address, process=process)
        stack.server_pid, stack.envoy_pid = _children(process.pid)
    except (TimeoutError, ValueError) as exc:
        stop_stack(stack)
        raise RuntimeError(f"stack did not start: {exc}\n{stack.log()}") from None
    return stack


def stop_stack(stack: Stack) -> None:
    """SIGTERM the supervisor (as Ctrl-C would) and make sure no child outlives it."""
    if stack.process.poll() is None:
        stack.process.send_signal(signal.SIGTERM)
        try:
            stack.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            stack.process.kill()
            stack.process.wait()
    for pid in (stack.server_pid, stack.envoy_pid):
        if pid and _command(pid):  # still ours (a pid reused by another program has another line)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            line = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
    return line if ("gallery_server" in line or "envoy" in line) else ""


def _children(pid: int) -> tuple[int, int]:
    """(server, envoy) pids among the supervisor's children."""
    found: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found += [int(c) for c in f.read().split()]
    server = [p for p in found if "gallery_server" in _command(p)]
    # The program's name, not its folder's: a checkout under a path with "envoy" in it (its
    # .venv/bin/python) is not Envoy.
    envoy = [p for p in found if os.path.basename(_command(p).split(" ")[0]) == "envoy"]
    if len(server) != 1 or len(envoy) != 1:
        raise ValueError(f"expected the server and Envoy under pid {pid}, found {found}")
    return server[0], envoy[0]
