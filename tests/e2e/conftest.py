"""The real stack for end-to-end tests: `gallery run` as a subprocess (as `make run` starts it),
owning the gRPC server and the real Envoy binary, on free ports and a temporary data root."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator

import grpc
import httpx
import pytest

from gallery_server import supervisor

from ..conftest import JWT_SECRET


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Everything under tests/e2e needs the real stack: `make unit` deselects it with -m "not e2e".
    here = pathlib.Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.e2e)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclasses.dataclass
class Stack:
    process: subprocess.Popen[bytes]
    data_dir: pathlib.Path
    base_url: str  # http://127.0.0.1:<envoy port>
    grpc_address: str  # the gRPC server itself, behind Envoy
    envoy_grpc_address: str  # native gRPC through Envoy
    admin_port: int
    log_path: pathlib.Path

    def url(self, path: str) -> str:
        return self.base_url + path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_stack(
    data_dir: pathlib.Path,
    log_path: pathlib.Path,
    *,
    extra_env: dict[str, str] | None = None,
    ports: tuple[int, int, int] | None = None,
) -> Stack:
    """Start `gallery run`; `ports` (http, grpc, envoy admin) are free ones unless given."""
    http_port, grpc_port, admin_port = ports or (free_port(), free_port(), free_port())
    env = {
        **os.environ,
        "GALLERY_DATA_DIR": str(data_dir),
        "GALLERY_HTTP_ADDRESS": f"127.0.0.1:{http_port}",
        "GALLERY_GRPC_ADDRESS": f"127.0.0.1:{grpc_port}",
        "GALLERY_ENVOY_ADMIN_PORT": str(admin_port),
        "GALLERY_PUBLIC_URL": f"http://127.0.0.1:{http_port}",
        "GALLERY_JWT_SECRET": JWT_SECRET,
        **(extra_env or {}),
    }
    with log_path.open("wb") as log:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(
            [sys.executable, "-m", "gallery_server", "run"], env=env, stdout=log, stderr=log
        )
    stack = Stack(
        process, data_dir, f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}",
        f"127.0.0.1:{http_port}", admin_port, log_path,
    )
    try:
        supervisor.wait_grpc_healthy(stack.grpc_address, process=process)
        supervisor.wait_envoy_ready(admin_port, process=process)
        # Envoy is ready before its health checker has seen the backend: wait for a real answer.
        supervisor.wait_grpc_healthy(stack.envoy_grpc_address, process=process)
    except TimeoutError:
        stop_stack(stack)
        raise AssertionError("stack did not start:\n" + stack.log()) from None
    return stack


def stop_stack(stack: Stack) -> None:
    if stack.process.poll() is None:
        stack.process.send_signal(signal.SIGTERM)
        try:
            stack.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            stack.process.kill()
            stack.process.wait()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("stack")
    stack = start_stack(root / "data", root / "gallery.log")
    yield stack
    stop_stack(stack)
    assert stack.process.returncode == 0, stack.log()


@pytest.fixture
def http(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.base_url, timeout=120) as client:
        yield client


@pytest.fixture
def auth_headers(mint: Callable[..., str]) -> Callable[..., dict[str, str]]:
    def _headers(**kwargs: object) -> dict[str, str]:
        return {"Authorization": f"Bearer {mint(**kwargs)}"}

    return _headers


@pytest.fixture
def envoy_channel(stack: Stack) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(stack.envoy_grpc_address) as channel:
        yield channel


def stack_ports(stack: Stack) -> tuple[int, int, int]:
    """(http, grpc, envoy admin) ports of a stack: start_stack(..., ports=...) restarts it on the
    same address, so that clients that keep the address (device agents) reconnect to it."""
    http_port = int(stack.base_url.rpartition(":")[2])
    grpc_port = int(stack.grpc_address.rpartition(":")[2])
    return http_port, grpc_port, stack.admin_port
