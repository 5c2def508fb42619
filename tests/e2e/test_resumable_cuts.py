"""Resumable uploads against a real server process (`gallery serve`), cut where it hurts most:

- the client's TCP connection cut at random byte offsets, most of them inside a gRPC message
  (a small proxy forwards N bytes, then resets both sides); the client resumes via QueryUpload
  on a new connection;
- the server SIGKILLed at random moments while large messages are in flight, restarted on the same
  port, and the upload resumed.

In every case the committed size counts only whole messages, the staged bytes equal the source up
to it, and the end is exactly one event whose stored bytes hash to the source's sha256. Offsets and
delays come from a seed printed at the start (pytest shows it on failure): rerun one with
GALLERY_CUT_SEED=<seed>.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import grpc

from gallery.v1 import gallery_pb2 as pb
from gallery.v1 import gallery_pb2_grpc
from gallery_server import supervisor
from gallery_server.local_stack import free_port

from ..conftest import JWT_SECRET, random_bytes, rich_error

DEVICE = "cut-cam"
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL,
             grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED}


def seeded() -> random.Random:
    seed = int(os.environ.get("GALLERY_CUT_SEED", random.randrange(2**32)))
    print(f"GALLERY_CUT_SEED={seed}")
    return random.Random(seed)


class Server:
    """`gallery serve` in a subprocess on a fixed port; kill() and start() again at will."""

    def __init__(self, root: pathlib.Path, *, name: str = "server", env: dict[str, str] | None = None) -> None:
        self.data_dir = root / "data"
        self.log_path = root / f"{name}.log"
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = env or {}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *, wait_healthy: bool = True) -> None:
        env = {**os.environ, "GALLERY_DATA_DIR": str(self.data_dir), "GALLERY_GRPC_ADDRESS": self.address,
               "GALLERY_JWT_SECRET": JWT_SECRET, "GALLERY_MAKE_THUMBNAILS": "false",
               "GALLERY_DRAIN_SECONDS": "0", **self.env}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "gallery_server", "serve"],
                                            env=env, stdout=log, stderr=log)
        if wait_healthy:
            try:
                # Its own health check, not that of a process that took the port in the meantime.
                supervisor.wait_grpc_healthy(self.address, process=self.process, listening=True)
            except BaseException:  # not left running after the test: nothing else would stop it
                self.kill()
                raise

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def session_file(self, upload_id: str) -> pathlib.Path:
        return self.data_dir / "staging" / "sessions" / DEVICE / upload_id


class CuttingProxy:
    """A TCP proxy that forwards the client's first `budget` bytes of a connection to the server,
    then resets both sides (SO_LINGER 0: an RST, as a dropped link looks to the peers)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.budget = 0

    def serve_one(self, budget: int) -> threading.Thread:
        self.budget = budget
        thread = threading.Thread(target=self._run, daemon=True)
        thread.start()
        return thread

    def _run(self) -> None:
        client, _ = self.listener.accept()
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        done = threading.Event()

        def back() -> None:  # server -> client, unlimited
            try:
                while data := upstream.recv(65536):
                    client.sendall(data)
            except OSError:
                pass
            done.set()

        backward = threading.Thread(target=back, daemon=True)
        backward.start()
        left = self.budget
        try:
            while left > 0 and not done.is_set():
                data = client.recv(min(65536, left))
                if not data:
                    break
                upstream.sendall(data)
                left -= len(data)
        except OSError:
            pass
        # close() alone would wait for the other thread's recv() to return (the kernel keeps the
        # socket while it is in use): wake it with SHUT_RD, which sends nothing, then reset.
        for sock in (client, upstream):
            try:
                sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass
        backward.join(5)
        for sock in (client, upstream):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()

    def close(self) -> None:
        self.listener.close()


def stub_for(address: str) -> tuple[grpc.Channel, gallery_pb2_grpc.GalleryServiceStub]:
    # A fresh channel per attempt: a new TCP connection, as a client on a flaky link makes.
    channel = grpc.insecure_channel(address, options=[("grpc.enable_retries", 0)])
    return channel, gallery_pb2_grpc.GalleryServiceStub(channel)


def writes(upload_id: str, data: bytes, offset: int, message: int, pause: float = 0.0,
           on_first: Callable[[], None] | None = None) -> Iterator[pb.WriteUploadRequest]:
    if offset == len(data):  # every byte is committed: only the finish is left to send
        yield pb.WriteUploadRequest(device=DEVICE, upload_id=upload_id, write_offset=offset,
                                    finish_write=True)
    for start in range(offset, len(data), message):
        piece = data[start:start + message]
        yield pb.WriteUploadRequest(device=DEVICE, upload_id=upload_id, write_offset=offset,
                                    data=piece, finish_write=start + len(piece) == len(data))
        if on_first is not None:
            on_first()
            on_first = None
        if pause:
            time.sleep(pause)


def committed_size(address: str, upload_id: str, metadata: list[tuple[str, str]]) -> pb.UploadSession:
    channel, stub = stub_for(address)
    with channel:
        return stub.QueryUpload(pb.QueryUploadRequest(device=DEVICE, upload_id=upload_id),
                                metadata=metadata, timeout=10)


def check_one_event(server: Server, session: pb.UploadSession, sha: str, size: int,
                    metadata: list[tuple[str, str]], note: str) -> None:
    assert session.event_id, note
    channel, stub = stub_for(server.address)
    with channel:
        events = list(stub.ListEvents(pb.ListEventsRequest(device=DEVICE), metadata=metadata))
    assert [(e.id, e.sha256, int(e.size)) for e in events] == [(session.event_id, sha, size)], note
    stored = server.data_dir / "media" / DEVICE / session.event_id
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == sha, note
    assert not [p for p in (server.data_dir / "staging").rglob("*") if p.is_file()], note


def test_connection_cut_inside_messages(server: Server, mint: Callable[..., str]) -> None:
    rng = seeded()
    metadata = [("authorization", f"Bearer {mint()}")]
    message = 512 * 1024 + 7  # odd-sized, so cuts land at every position within messages
    data = random_bytes(6 * 1024 * 1024 + 123)
    sha = hashlib.sha256(data).hexdigest()
    upload_id = "cut-inside-0001"
    channel, stub = stub_for(server.address)
    with channel:
        stub.StartUpload(pb.StartUploadRequest(device=DEVICE, name="cut.bin", size=len(data), sha256=sha,
                                               upload_id=upload_id), metadata=metadata)
    proxy = CuttingProxy(server.port)
    cuts: list[tuple[int, int, int]] = []
    try:
        offset, session = 0, None
        for attempt in range(7):
            last = attempt == 6
            # Bytes the proxy lets through on this connection (HTTP/2 preface and headers
            # included): anywhere from inside the first message to inside the last one.
            budget = 1 << 40 if last else rng.randrange(2_000, len(data) - offset)
            forwarding = proxy.serve_one(budget)
            proxy_channel, proxy_stub = stub_for(f"127.0.0.1:{proxy.port}")
            with proxy_channel:
                try:
                    session = proxy_stub.WriteUpload(writes(upload_id, data, offset, message),
                                                     metadata=metadata, timeout=30)
                except grpc.RpcError as error:
                    # Or WRONG_OFFSET: the cut stream's last whole message reached the session
                    # file after the committed size was asked (_recover counts it at the next
                    # open), and the client resumes where it is told, as README says.
                    assert error.code() in RETRYABLE or rich_error(error)[0].reason == "WRONG_OFFSET", (cuts, error)
            forwarding.join(10)
            if session is not None and session.event_id:
                break
            # Ask where to resume on a new connection; until the server has seen the reset, the
            # old stream holds the session (UPLOAD_BUSY) or its last bytes are uncommitted.
            deadline = time.monotonic() + 10
            while True:
                state = committed_size(server.address, upload_id, metadata)
                try:
                    channel, stub = stub_for(server.address)
                    with channel:
                        stub.WriteUpload(iter([pb.WriteUploadRequest(
                            device=DEVICE, upload_id=upload_id, write_offset=state.committed_size)]),
                            metadata=metadata, timeout=10)
                    break
                except grpc.RpcError as error:
                    assert time.monotonic() < deadline, (cuts, error)
                    time.sleep(0.05)
            committed = committed_size(server.address, upload_id, metadata).committed_size
            cuts.append((offset, budget, committed))
            note = f"cuts (offset, budget, committed): {cuts}"
            # Only whole messages count: a message cut in the middle left nothing behind.
            assert committed >= offset and (committed - offset) % message == 0, note
            assert server.session_file(upload_id).read_bytes() == data[:committed], note
            offset = committed
        assert session is not None
        print(f"cuts (offset, budget, committed): {cuts}")
        check_one_event(server, session, sha, len(data), metadata, f"cuts: {cuts}")
    finally:
        proxy.close()


def test_server_killed_with_messages_in_flight(server: Server, mint: Callable[..., str]) -> None:
    rng = seeded()
    metadata = [("authorization", f"Bearer {mint()}")]
    message = 2 * 1024 * 1024 + 11
    data = random_bytes(20 * 1024 * 1024 + 5)
    sha = hashlib.sha256(data).hexdigest()
    upload_id = "killed-0000001"
    channel, stub = stub_for(server.address)
    with channel:
        stub.StartUpload(pb.StartUploadRequest(device=DEVICE, name="kill.bin", size=len(data), sha256=sha,
                                               upload_id=upload_id), metadata=metadata)
    kills: list[tuple[int, float, int]] = []
    offset, session = 0, None
    for attempt in range(4):
        last = attempt == 3
        # About 2.5 s of sending; the server commits every 2 s (resumable.COMMIT_SECONDS): the
        # first kills come before a commit (everything received is truncated away), the last
        # one most likely after it (the upload resumes past the start) or after the upload
        # finished (a busy machine): every outcome must end in one correct event.
        delay = rng.uniform(0.1, 1.9) if attempt < 2 else rng.uniform(2.3, 2.7)
        killer = threading.Timer(delay, server.kill)

        channel, stub = stub_for(server.address)
        with channel:
            try:
                session = stub.WriteUpload(
                    writes(upload_id, data, offset, message, pause=0.25,
                           on_first=None if last else killer.start),
                    metadata=metadata, timeout=60)
            except grpc.RpcError as error:
                assert not last and error.code() in RETRYABLE, (kills, error)
        if last:
            break
        killer.join()
        if session is not None and session.event_id:  # finished before the kill came
            server.start()
            break
        server.start()
        state = committed_size(server.address, upload_id, metadata)
        kills.append((offset, round(delay, 3), state.committed_size))
        note = f"kills (offset, delay, committed): {kills}"
        whole_messages = (state.committed_size - offset) % message == 0 or state.committed_size == len(data)
        assert state.committed_size >= offset and whole_messages, note
        # Bytes written but never committed were truncated away when the session was opened
        # (unless the kill came after the completion, which removed the file).
        if not state.event_id:
            assert server.session_file(upload_id).read_bytes() == data[:state.committed_size], note
        offset = state.committed_size
    assert session is not None
    print(f"kills (offset, delay, committed): {kills}")
    check_one_event(server, session, sha, len(data), metadata, f"kills: {kills}")
    # A late retry of the finished upload answers the same event, stores nothing.
    channel, stub = stub_for(server.address)
    with channel:
        again = stub.WriteUpload(writes(upload_id, data, 0, message), metadata=metadata, timeout=30)
    assert again.event_id == session.event_id
    check_one_event(server, session, sha, len(data), metadata, f"kills: {kills}")
