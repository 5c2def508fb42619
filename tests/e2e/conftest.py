"""The real stack for end-to-end tests: `gallery run` as a subprocess (as `make run` starts it),
owning the gRPC server and the real Envoy binary, on free ports and a temporary data root."""

from __future__ import annotations

import contextlib
import json
import pathlib
import time
from collections.abc import Callable, Iterator

import grpc
import httpx
import pytest

from gallery_server import local_stack
from gallery_server.local_stack import Stack, stop_stack

from ..conftest import JWT_SECRET
from .test_resumable_cuts import Server


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Everything under tests/e2e needs the real stack: `make unit` deselects it with -m "not e2e".
    here = pathlib.Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.e2e)


def start_stack(
    data_dir: pathlib.Path,
    log_path: pathlib.Path,
    *,
    extra_env: dict[str, str] | None = None,
    ports: tuple[int, int, int] | None = None,
) -> Stack:
    """The real stack, signed with the tests' JWT secret; a failure to start fails the test."""
    try:
        return local_stack.start_stack(
            data_dir, log_path, jwt_secret=JWT_SECRET, extra_env=extra_env, ports=ports
        )
    except RuntimeError as exc:
        raise AssertionError(str(exc)) from None


@contextlib.contextmanager
def running_stack(root: pathlib.Path, extra_env: dict[str, str]) -> Iterator[Stack]:
    """A stack of its own under `root` with these settings, stopped afterwards: it must then have
    stopped cleanly (exit status 0), or the test that used it fails with its log."""
    stack = start_stack(root / "data", root / "gallery.log", extra_env=extra_env)
    try:
        yield stack
    finally:
        stop_stack(stack)
    assert stack.process.returncode == 0, stack.log()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # Background thumbnails would change the store while tests compare snapshots of it: the
    # shared stack makes none; test_thumbnails.py runs its own stack that does.
    with running_stack(tmp_path_factory.mktemp("stack"), {"GALLERY_MAKE_THUMBNAILS": "false"}) as stack:
        yield stack


@pytest.fixture
def server(tmp_path: pathlib.Path) -> Iterator[Server]:
    """`gallery serve` alone (no Envoy) in a subprocess, on the gRPC port: killed and started again at will."""
    running = Server(tmp_path)
    running.start()
    yield running
    running.stop()


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




def log_entries(stack: Stack) -> list[dict[str, object]]:
    """The stack's JSON log lines so far; whole lines only (the last may be half-written: Envoy
    writes its lines a second's worth at a time)."""
    return [json.loads(line) for line in stack.log().split("\n")[:-1] if line.startswith("{")]


def access_line(stack: Stack, request_id: object, timeout: float = 10) -> dict[str, object] | None:
    """The access line of the RPC with this request id: it is written as the answer goes out, so
    it may follow the client's answer by a moment."""
    found = _lines_of(stack, "rpc", request_id, timeout)
    return found[0] if found else None


def envoy_lines(stack: Stack, request_id: object, timeout: float = 10) -> list[dict[str, object]]:
    """Envoy's lines about an answer it made itself with this request id (envoy.yaml, access_log):
    Envoy writes them every second (supervisor.envoy_command), so they may follow the answer by
    that. Empty if none came within `timeout`."""
    return _lines_of(stack, "envoy reply", request_id, timeout)


def _lines_of(stack: Stack, message: str, request_id: object, timeout: float) -> list[dict[str, object]]:
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in log_entries(stack) if e.get("message") == message and e.get("request_id") == request_id]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)
