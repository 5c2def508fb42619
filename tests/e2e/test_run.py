"""`gallery run` as a new user starts it: no secret configured, Ctrl-C/SIGTERM stops everything."""

from __future__ import annotations

import contextlib
import os
import pty
import re
import select
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import httpx
import pytest
from grpc_health.v1 import health as health_servicer
from grpc_health.v1 import health_pb2_grpc

from gallery_server import auth, supervisor
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
        # The supervisor prints its banner once its own readiness checks pass; its stdout is a
        # file here, so the banner tells how to mint a token instead of printing one.
        deadline = time.monotonic() + 30
        while not (match := re.search(r"export TOKEN=\$\((.*)\)", stack.log())):
            assert time.monotonic() < deadline, stack.log()
            time.sleep(0.1)
        assert not re.search(r"eyJ[\w-]+\.[\w-]+\.", stack.log())
        # Runnable as printed, from anywhere: this install's command, on this data folder.
        token = subprocess.run(match.group(1), shell=True, cwd="/", env={**os.environ, "GALLERY_JWT_SECRET": ""},
                               capture_output=True, text=True, check=True).stdout.strip()
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


def test_run_prints_a_development_token_to_a_terminal(tmp_path):
    """`make run` in a terminal: the banner's token works at once."""
    grpc_port, http_port, admin_port = free_ports(3)
    main, terminal = pty.openpty()
    with (tmp_path / "run.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gallery_server", "run"], stdin=subprocess.DEVNULL, stdout=terminal, stderr=log,
            env=run_env(tmp_path, grpc_port, http_port, admin_port, GALLERY_JWT_SECRET=""),
        )
    os.close(terminal)
    try:
        out, deadline = b"", time.monotonic() + 60
        while not (match := re.search(rb"export TOKEN=(eyJ\S+)", out)):
            assert time.monotonic() < deadline and process.poll() is None, out
            if select.select([main], [], [], 0.5)[0]:
                out += os.read(main, 65536)
        r = httpx.get(f"http://127.0.0.1:{http_port}/api/gallery/device123/paths",
                      headers={"Authorization": f"Bearer {match.group(1).decode()}"})
        assert r.status_code == 200, r.text
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
        os.close(main)
    assert process.returncode == 0


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


def run_env(tmp_path, grpc_port: int, http_port: int, admin_port: int, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "GALLERY_DATA_DIR": str(tmp_path / "data"),
        "GALLERY_GRPC_ADDRESS": f"127.0.0.1:{grpc_port}",
        "GALLERY_HTTP_ADDRESS": f"127.0.0.1:{http_port}",
        "GALLERY_ENVOY_ADMIN_PORT": str(admin_port),
        **extra,
    }


@contextlib.contextmanager
def held(variable: str) -> Iterator[int]:
    """A port held by another process's server: on GALLERY_GRPC_ADDRESS another gallery's health
    service (its answer once let `gallery run` print "up" over a server that failed to bind), on
    GALLERY_HTTP_ADDRESS a listener with SO_REUSEPORT as Envoy binds (a second Envoy would share
    it), on the admin port a plain listener."""
    if variable == "GALLERY_GRPC_ADDRESS":
        other = grpc.server(futures.ThreadPoolExecutor(2))
        health = health_servicer.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, other)
        port = other.add_insecure_port("127.0.0.1:0")
        other.start()
        try:
            yield port
        finally:
            other.stop(None)
        return
    with socket.socket() as busy:
        if variable == "GALLERY_HTTP_ADDRESS":
            busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        yield busy.getsockname()[1]


@pytest.mark.parametrize("variable", ["GALLERY_GRPC_ADDRESS", "GALLERY_HTTP_ADDRESS", "GALLERY_ENVOY_ADMIN_PORT"])
def test_run_refuses_a_port_another_process_holds(tmp_path, variable):
    with held(variable) as port:
        ports = dict(zip(("grpc_port", "http_port", "admin_port"), free_ports(3), strict=True))
        ports[{"GALLERY_GRPC_ADDRESS": "grpc_port", "GALLERY_HTTP_ADDRESS": "http_port",
               "GALLERY_ENVOY_ADMIN_PORT": "admin_port"}[variable]] = port
        result = subprocess.run(
            [sys.executable, "-m", "gallery_server", "run"], env=run_env(tmp_path, **ports),
            capture_output=True, text=True, timeout=60,
        )
    assert result.returncode == 1
    assert "gallery is up" not in result.stdout
    assert f"gallery: {variable} " in result.stderr and "Address already in use" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("command", "variable"), [
    ("serve", "GALLERY_GRPC_ADDRESS"), ("serve", "GALLERY_METRICS_ADDRESS"), ("run", "GALLERY_METRICS_ADDRESS"),
])
def test_an_address_another_process_holds_stops_the_server_with_one_line(tmp_path, command, variable):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = f"127.0.0.1:{busy.getsockname()[1]}"
        env = run_env(tmp_path, *free_ports(3), GALLERY_JWT_SECRET="s" * 40, **{variable: taken})
        result = subprocess.run([sys.executable, "-m", "gallery_server", command], env=env,
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"gallery: {variable}" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert "gallery is up" not in result.stdout


def test_a_killed_supervisor_leaves_no_server_or_envoy(tmp_path):
    stack = start_stack(tmp_path / "data", tmp_path / "run.log")
    children = [stack.server_pid, stack.envoy_pid]
    try:
        stack.process.kill()
        stack.process.wait(timeout=10)
        deadline = time.monotonic() + 15
        while any(_pid_alive(pid) for pid in children):
            assert time.monotonic() < deadline, "a child outlived its supervisor"
            time.sleep(0.1)
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def silent_database() -> Iterator[str]:
    """A PostgreSQL URL whose server takes the connection and never answers."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # the kernel completes the handshake; nothing ever reads or writes
        yield f"postgresql+psycopg://gallery@127.0.0.1:{silent.getsockname()[1]}/gallery"


def _server_child(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = f.read().split()
    except FileNotFoundError:
        return False
    for child in children:
        with contextlib.suppress(FileNotFoundError), open(f"/proc/{child}/cmdline", "rb") as f:
            if b"gallery_server\0serve" in f.read():
                return True
    return False


def test_ctrl_c_while_starting_stops_at_once(tmp_path):
    """Start-up waiting on a database that does not answer: Ctrl-C used to wait for the end of
    the 60 s start-up window."""
    with silent_database() as url:
        process = subprocess.Popen(
            [sys.executable, "-m", "gallery_server", "run"],
            env=run_env(tmp_path, *free_ports(3), GALLERY_DATABASE_URL=url),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            deadline = time.monotonic() + 30
            while not _server_child(process.pid):  # started: its supervisor is waiting for it
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
            time.sleep(0.5)  # and it is waiting for the database
            process.send_signal(signal.SIGINT)
            out, _ = process.communicate(timeout=5)
        finally:
            process.kill()
            process.wait()
    assert process.returncode == 0
    assert "gallery is up" not in out


def test_a_database_that_does_not_answer_stops_the_server_with_one_line(tmp_path):
    """libpq waits for ever by default: 10 s, then a message naming the setting."""
    with silent_database() as url:
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "gallery_server", "serve"],
            env=run_env(tmp_path, *free_ports(3), GALLERY_DATABASE_URL=f"{url}?password=hunter2",
                        GALLERY_JWT_SECRET="s" * 40),
            capture_output=True, text=True, timeout=60,
        )
    assert result.returncode == 1
    assert 9 < time.monotonic() - started < 30
    # Where it waited (host and port), for the operator to look; never the password.
    assert result.stderr.startswith(f"gallery: GALLERY_DATABASE_URL={url}: "), result.stderr
    assert "hunter2" not in result.stderr
    assert "timeout" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


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


def test_gallery_envoy_fronts_replicas_started_with_gallery_serve(tmp_path):
    """The multi-replica deployment as README tells it: two `gallery serve` on one database and
    one data folder, one `gallery envoy --backend ... --backend ...`; a replica stopped, the other
    answers."""
    grpc_a, grpc_b, http_port, admin_port = free_ports(4)
    secret = "r" * 40
    base = run_env(tmp_path, grpc_a, http_port, admin_port, GALLERY_JWT_SECRET=secret, GALLERY_DRAIN_SECONDS="0")
    processes: list[subprocess.Popen[bytes]] = []
    logs = (tmp_path / "logs").open("wb")
    try:
        for port in (grpc_a, grpc_b):
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "gallery_server", "serve"], stdout=logs, stderr=logs,
                env={**base, "GALLERY_GRPC_ADDRESS": f"127.0.0.1:{port}"}))
            supervisor.wait_grpc_healthy(f"127.0.0.1:{port}", process=processes[-1], listening=True)
        envoy = subprocess.Popen(
            [sys.executable, "-m", "gallery_server", "envoy",
             "--backend", f"127.0.0.1:{grpc_a}", "--backend", f"127.0.0.1:{grpc_b}"],
            stdout=logs, stderr=logs, env={**base, "TMPDIR": str(tmp_path)})  # where its configuration goes
        processes.append(envoy)
        supervisor.wait_envoy_ready(admin_port, process=envoy)
        supervisor.wait_grpc_healthy(f"127.0.0.1:{http_port}", process=envoy)
        token = auth.mint(secret, subject="ops", devices=["*"], scope=f"{auth.READ} {auth.WRITE}")
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", headers=headers, timeout=30) as http:
            r = http.post("/api/gallery/cam1/upload", files={"event": ("a.bin", b"replicated")},
                          data={"name": "a.bin"})
            assert r.status_code == 200, r.text
            event_id = r.json()["eventId"]
            processes[0].send_signal(signal.SIGTERM)  # one replica goes (a rolling restart)
            processes[0].wait(timeout=30)
            for _ in range(5):  # every request now reaches the other one
                r = http.get(f"/api/gallery/cam1/events/{event_id}/content")
                assert (r.status_code, r.content) == (200, b"replicated")
        # On this host, not on the shared storage, in a folder of this user's own; one name per
        # listener, so restarts leave no pile.
        config = tmp_path / f"gallery-{os.getuid()}" / f"envoy-{http_port}.yaml"
        assert (config.parent.stat().st_mode & 0o777) == 0o700
        assert str(grpc_a) in config.read_text() and str(grpc_b) in config.read_text()
        assert not (tmp_path / "data" / "run" / "envoy.yaml").exists()
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=30)
        logs.close()
    assert envoy.returncode == 0, (tmp_path / "logs").read_text()


def test_the_data_folder_is_for_its_servers_and_their_group(tmp_path, mint) -> None:
    """Under the usual umask (0022), every folder the stack makes is 0750 and every file 0640:
    another local user may not list the devices and event ids (folders were 0755 until
    2026-11-30). Envoy's config stays 0644: Envoy may run as another user."""
    data_dir = tmp_path / "new" / "data"
    old_umask = os.umask(0o022)
    try:
        stack = start_stack(data_dir, tmp_path / "gallery.log")  # `gallery run` makes the data folder
    finally:
        os.umask(old_umask)
    try:
        device, headers = "cam-modes", {"Authorization": f"Bearer {mint(devices=['cam-modes'])}"}
        with httpx.Client(base_url=stack.base_url, timeout=30) as http:
            assert http.get(f"/api/gallery/{device}/paths", headers=headers).status_code == 200
            r = http.post(f"/api/gallery/{device}/upload", headers=headers, data={"name": "a.jpg"},
                          files={"event": ("a.jpg", b"jpeg", "image/jpeg"), "thumbnail": ("t.jpg", b"t", "image/jpeg")})
            assert r.status_code == 200, r.text
            url = http.get(f"/api/gallery/{device}/upload-url", params={"filename": "b.bin"},
                           headers=headers).json()["upload_url"]
            r = httpx.put(url, content=b"abc", headers={"Content-Range": "bytes 0-2/10"})
            assert r.status_code == 308, r.text  # a resumable session: its folder and file
    finally:
        stop_stack(stack)
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode)
             for p in [data_dir.parent, *data_dir.parent.rglob("*")] if p.is_dir() or p.is_file()}
    assert any(name.startswith("new/data/staging/sessions/") and os.path.isfile(tmp_path / name) for name in modes)
    assert "new/data/gallery/cam-modes/incoming" in modes and "new/data/run/envoy.yaml" in modes
    expected = {name: 0o644 if name == "new/data/run/envoy.yaml" else 0o750 if (tmp_path / name).is_dir() else 0o640
                for name in modes}
    assert modes == expected


def test_a_server_starting_while_postgresql_ends_its_connections_tries_again(tmp_path, postgres_url):
    """A PostgreSQL restart or failover during a rolling restart (here: pg_terminate_backend of
    every connection, again and again): `gallery serve` exited at the first one, and nothing
    brought the replica back. It tries its schema step again, then serves."""
    import sqlalchemy as sa
    from grpc_health.v1 import health_pb2

    grpc_port, http_port, admin_port = free_ports(3)
    log = (tmp_path / "serve.log").open("w+")
    server = subprocess.Popen(
        [sys.executable, "-m", "gallery_server", "serve"], stdout=log, stderr=subprocess.STDOUT,
        env=run_env(tmp_path, grpc_port, http_port, admin_port, GALLERY_DATABASE_URL=postgres_url,
                    GALLERY_JWT_SECRET="s" * 40, GALLERY_METRICS_ADDRESS=""),
    )
    killer = sa.create_engine(postgres_url, poolclass=sa.pool.NullPool)
    try:
        deadline = time.monotonic() + 30
        with killer.connect() as connection:
            connection.execution_options(isolation_level="AUTOCOMMIT")
            while "trying again" not in (tmp_path / "serve.log").read_text():  # ended at least once
                assert server.poll() is None, (tmp_path / "serve.log").read_text()
                assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
                connection.execute(sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"))
                time.sleep(0.02)
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                assert server.poll() is None, (tmp_path / "serve.log").read_text()
                with contextlib.suppress(grpc.RpcError):
                    if health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
                            health_pb2.HealthCheckResponse.SERVING:
                        break
                assert time.monotonic() < deadline + 30, (tmp_path / "serve.log").read_text()
                time.sleep(0.2)
    finally:
        killer.dispose()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def test_a_server_whose_folder_is_another_gallerys_does_not_start(tmp_path):
    """A mistyped GALLERY_DATABASE_URL beside a gallery's folder (here a new SQLite file): the server
    served an empty gallery and stored new uploads into that database (identity.py)."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "gallery-id").write_text("e" * 32 + "\n")
    grpc_port, http_port, admin_port = free_ports(3)
    result = subprocess.run(
        [sys.executable, "-m", "gallery_server", "serve"], capture_output=True, text=True, timeout=60,
        env=run_env(tmp_path, grpc_port, http_port, admin_port, GALLERY_JWT_SECRET="s" * 40,
                    GALLERY_DATABASE_URL=f"sqlite:///{tmp_path / 'galery.db'}", GALLERY_METRICS_ADDRESS=""),
    )
    assert result.returncode == 1, result.stderr
    assert f"gallery: GALLERY_DATA_DIR={data} holds gallery {'e' * 32}'s files, and GALLERY_DATABASE_URL is no" \
           " gallery's" in result.stderr
    assert "Traceback" not in result.stderr
    assert (data / "gallery-id").read_text() == "e" * 32 + "\n"
