"""The device agent's local rules: what it announces, which paths it uploads, how it backs off."""

from __future__ import annotations

import hashlib
import io
import os
import pathlib
import queue
import threading
import time
from concurrent import futures

import grpc
import pytest
from PIL import Image

from gallery.v1 import device_pb2 as dpb
from gallery_server import agent, cli
from gallery_server.errors import Busy, InvalidArgument, Unavailable
from gallery_server.rpc import status

from ..conftest import wait_until


def touch(path: pathlib.Path, data: bytes = b"x") -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# -- scanning -----------------------------------------------------------------------------------


def test_list_files_skips_dotfiles_partial_files_and_symlinks(tmp_path):
    touch(tmp_path / "a.jpg")
    touch(tmp_path / "sub" / "deeper" / "b.mp4")
    touch(tmp_path / ".hidden")
    touch(tmp_path / ".thumbs" / "c.jpg")
    touch(tmp_path / "upload.part")
    touch(tmp_path / "sub" / "x.tmp")
    (tmp_path / "link.jpg").symlink_to(tmp_path / "a.jpg")
    (tmp_path / "linkdir").symlink_to(tmp_path / "sub")
    (tmp_path / "empty-dir").mkdir()
    os.mkfifo(tmp_path / "fifo")

    found = agent.list_files(tmp_path)

    assert sorted(found) == ["a.jpg", "sub/deeper/b.mp4"]
    info = found["sub/deeper/b.mp4"]
    assert info.path == tmp_path / "sub" / "deeper" / "b.mp4"
    assert info.size == 1


def test_scanner_reports_a_file_once_its_size_and_mtime_held_still(tmp_path):
    scanner = agent.Scanner(tmp_path)
    f = touch(tmp_path / "clip.mp4", b"12")
    assert scanner.scan() == []  # first sight: maybe still being written
    assert [i.key for i in scanner.scan()] == ["clip.mp4"]

    with f.open("ab") as out:  # grows: not stable until it holds still again
        out.write(b"345")
    assert scanner.scan() == []
    [info] = scanner.scan()
    assert (info.key, info.size) == ("clip.mp4", 5)

    os.utime(f, ns=(1, 1_000_000_000))  # same size, new mtime: changed
    assert scanner.scan() == []
    assert [i.key for i in scanner.scan()] == ["clip.mp4"]

    f.unlink()
    assert scanner.scan() == []


def test_scanner_sees_files_appearing_and_the_partial_file_renamed(tmp_path):
    scanner = agent.Scanner(tmp_path)
    touch(tmp_path / "a.jpg")
    scanner.scan()
    partial = touch(tmp_path / "b.jpg.part")
    assert [i.key for i in scanner.scan()] == ["a.jpg"]
    partial.rename(tmp_path / "b.jpg")
    assert [i.key for i in scanner.scan()] == ["a.jpg"]
    assert [i.key for i in scanner.scan()] == ["a.jpg", "b.jpg"]


def test_describe_hashes_the_file_and_uses_mtime_as_created(tmp_path):
    data = os.urandom(3 * agent.CHUNK + 17)
    f = touch(tmp_path / "v" / "clip.mp4", data)
    os.utime(f, ns=(1_700_000_000_123_456_789, 1_700_000_000_123_456_789))
    [info] = agent.list_files(tmp_path).values()

    event = agent.describe(info)

    assert event.device_key == "v/clip.mp4"
    assert event.name == "clip.mp4"
    assert event.size == len(data)
    assert event.sha256 == hashlib.sha256(data).hexdigest()
    assert event.created.ToNanoseconds() == 1_700_000_000_123_456_789
    assert event.thumbnail == b""  # not an image


# -- device_key resolution ----------------------------------------------------------------------


@pytest.mark.parametrize("key", [
    "../x", "a/../../x", "..", "/etc/passwd", "//etc/passwd", "", ".", "a/..", "x\x00y",
])
def test_resolve_key_refuses_keys_that_leave_the_folder(tmp_path, key):
    root = tmp_path / "media"
    root.mkdir()
    with pytest.raises(ValueError):
        agent.resolve_key(root, key)


def test_resolve_key_refuses_a_symlink_that_points_outside(tmp_path):
    root = tmp_path / "media"
    outside = touch(tmp_path / "secret.txt")
    root.mkdir()
    (root / "innocent.jpg").symlink_to(outside)
    with pytest.raises(ValueError):
        agent.resolve_key(root, "innocent.jpg")


def test_resolve_key_finds_files_inside_the_folder(tmp_path):
    f = touch(tmp_path / "sub" / "a b.jpg")
    assert agent.resolve_key(tmp_path, "sub/a b.jpg") == f.resolve()
    assert agent.resolve_key(tmp_path, "missing.jpg") == (tmp_path / "missing.jpg").resolve()


# -- backoff ------------------------------------------------------------------------------------


def test_backoff_doubles_from_half_a_second_to_a_30_second_cap():
    ceilings = [agent.backoff_delay(n, rng=lambda: 1.0) for n in range(10)]
    assert ceilings == [0.5, 1, 2, 4, 8, 16, 30, 30, 30, 30]
    assert agent.backoff_delay(10_000, rng=lambda: 1.0) == 30  # no overflow after long outages
    assert agent.backoff_delay(5, rng=lambda: 0.0) == 0


def test_backoff_has_full_jitter():
    for attempt in (0, 3, 20):
        delays = [agent.backoff_delay(attempt) for _ in range(200)]
        ceiling = min(30, 0.5 * 2**attempt)
        assert all(0 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 100  # spread out, not one fixed delay
        assert min(delays) < ceiling / 4 and max(delays) > ceiling * 3 / 4


# -- which failures are retried, and which blame a file --------------------------------------------

Code = grpc.StatusCode


# grpc's own words, without a reason, for a message above the server's limit and for a server
# whose threads are all taken (grpc/_server.py, maximum_concurrent_rpcs).
TOO_LARGE = "Received message larger than max (10296002 vs. 8388608)"
BUSY = "Concurrent RPC limit exceeded!"


@pytest.mark.parametrize("trailer", ["\u00b2", "\u0661\u0662", "soon", "-1"])
def test_a_retry_after_of_no_ascii_whole_seconds_asks_no_wait(trailer):
    """A trailer a server other than this one (or a proxy) made: float("²") raised inside the
    upload's error handling, and the pull was neither retried nor failed."""
    def refuse(request, context):
        context.set_trailing_metadata([(agent.RETRY_AFTER_HEADER, trailer)])
        context.abort(grpc.StatusCode.UNAVAILABLE, "later")

    assert agent.server_wait(_refused_by(refuse)) == 0.0


@pytest.mark.parametrize(("code", "reason", "details"), [
    *((code, "", "") for code in sorted(agent.TRANSIENT, key=lambda c: c.name)),
    (Code.UNAVAILABLE, "DATABASE_UNAVAILABLE", ""),
    # The server at capacity says "retry later".
    (Code.RESOURCE_EXHAUSTED, "TOO_MANY_DEVICE_UPLOADS", ""),
    (Code.RESOURCE_EXHAUSTED, "TOO_MANY_UPLOADS", ""),
    (Code.RESOURCE_EXHAUSTED, "INSUFFICIENT_STORAGE", ""),
    (Code.RESOURCE_EXHAUSTED, "", BUSY),
])
def test_retried_later(code, reason, details):
    assert agent.retry_later(code, reason, details)


@pytest.mark.parametrize(("error", "wait"), [
    (Busy("TOO_MANY_DEVICE_UPLOADS", "finish one first"), 1.0),
    (Unavailable("JWKS_UNAVAILABLE", "down", retry_after=4.2), 5.0),  # whole seconds, rounded up
    (Unavailable("JWKS_UNAVAILABLE", "down", retry_after=3600), agent.BACKOFF_CAP_S),  # a bound on a server's word
    (InvalidArgument("INVALID_SIZE", "no"), 0.0),
])
def test_an_upload_retries_no_sooner_than_the_server_asks(error, wait):
    """server_wait reads the `retry-after` trailer of a real call refused through rpc/status.py."""
    def refuse(request, context):
        context.abort_with_status(status.to_status(error))

    assert agent.server_wait(_refused_by(refuse)) == wait


def _refused_by(handler) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    """The error of a real call that `handler`, a unary method of a real server, refuses."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", {
        "Refuse": grpc.unary_unary_rpc_method_handler(handler),
    }),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError) as refused:
            channel.unary_unary("/t.T/Refuse")(b"", timeout=10)
    finally:
        server.stop(None)
    return refused.value


@pytest.mark.parametrize(("code", "reason", "details"), [
    (Code.RESOURCE_EXHAUSTED, "UPLOAD_TOO_LARGE", ""),  # the same upload would be refused again
    (Code.RESOURCE_EXHAUSTED, "THUMBNAIL_TOO_LARGE", ""),
    (Code.RESOURCE_EXHAUSTED, "", TOO_LARGE),
    (Code.INVALID_ARGUMENT, "INVALID_SIZE", ""),
    (Code.INVALID_ARGUMENT, "SHA256_MISMATCH", ""),  # the file changed since it was announced
    (Code.FAILED_PRECONDITION, "UPLOAD_INCOMPLETE", ""),
    (Code.NOT_FOUND, "EVENT_NOT_FOUND", ""),
    (Code.UNAUTHENTICATED, "TOKEN_INVALID", ""),
    (Code.PERMISSION_DENIED, "DEVICE_NOT_ALLOWED", ""),
])
def test_not_retried(code, reason, details):
    assert not agent.retry_later(code, reason, details)


@pytest.mark.parametrize(("code", "reason"), [
    (Code.INVALID_ARGUMENT, "INVALID_SIZE"),
    (Code.INVALID_ARGUMENT, "INVALID_DEVICE_KEY"),
    (Code.INVALID_ARGUMENT, "INVALID_SHA256"),
    (Code.RESOURCE_EXHAUSTED, "THUMBNAIL_TOO_LARGE"),
    (Code.RESOURCE_EXHAUSTED, "TOO_MANY_EVENTS"),
])
def test_an_announcement_refused_for_what_it_says_is_halved(code, reason):
    assert agent.refuses_content(code, reason)


def test_an_announcement_over_the_message_limit_is_halved_and_a_busy_server_is_not():
    assert agent.refuses_content(Code.RESOURCE_EXHAUSTED, "", TOO_LARGE)
    assert not agent.refuses_content(Code.RESOURCE_EXHAUSTED, "", BUSY)


@pytest.mark.parametrize(("code", "reason"), [
    (Code.UNAUTHENTICATED, "TOKEN_EXPIRED"),
    (Code.PERMISSION_DENIED, "DEVICE_NOT_ALLOWED"),
    (Code.INVALID_ARGUMENT, "INVALID_DEVICE_ID"),  # the request's device, in no file
    (Code.RESOURCE_EXHAUSTED, "INSUFFICIENT_STORAGE"),
    (Code.RESOURCE_EXHAUSTED, "TOO_MANY_UPLOADS"),
    *((code, "") for code in sorted(agent.TRANSIENT, key=lambda c: c.name)),
])
def test_an_announcement_refused_for_the_caller_or_the_moment_is_not_halved(code, reason):
    assert not agent.refuses_content(code, reason)


def pending(thumbnail_bytes: int, count: int) -> list[agent.Pending]:
    info = agent.FileInfo("k", pathlib.Path("k"), 1, 1)
    return [(info, dpb.AnnouncedEvent(device_key=f"k{n}", thumbnail=b"t" * thumbnail_bytes))
            for n in range(count)]


def test_announce_batches_hold_at_most_1000_events():
    assert [len(b) for b in agent.announce_batches(pending(0, 2500))] == [1000, 1000, 500]
    assert list(agent.announce_batches([])) == []


def test_announce_batches_hold_at_most_4_mib():
    # 1 MiB and a few bytes each: three fit under the cap, four do not.
    assert [len(b) for b in agent.announce_batches(pending(1 << 20, 7))] == [3, 3, 1]
    for batch in agent.announce_batches(pending(20 << 10, 500)):
        assert sum(e.ByteSize() for _, e in batch) <= agent.MAX_ANNOUNCE_BYTES


def test_an_event_larger_than_a_batch_goes_alone():
    big = pending(5 << 20, 1)
    small = pending(10, 2)
    batches = list(agent.announce_batches([small[0], *big, small[1]]))
    assert batches == [[small[0]], big, [small[1]]]


# -- thumbnails ---------------------------------------------------------------------------------


def image_file(path: pathlib.Path, size: tuple[int, int], mode: str, fmt: str) -> pathlib.Path:
    Image.new(mode, size, "red" if mode == "RGB" else (255, 0, 0, 128)).save(path, fmt)
    return path


def test_thumbnail_of_a_jpeg_is_a_jpeg_at_most_320_px(tmp_path):
    thumb = agent.make_thumbnail(image_file(tmp_path / "p.jpg", (1000, 500), "RGB", "JPEG"))
    with Image.open(io.BytesIO(thumb)) as image:
        assert image.format == "JPEG"
        assert image.size == (320, 160)


def test_thumbnail_of_a_small_transparent_png_is_not_enlarged(tmp_path):
    thumb = agent.make_thumbnail(image_file(tmp_path / "p.png", (100, 240), "RGBA", "PNG"))
    with Image.open(io.BytesIO(thumb)) as image:
        assert image.format == "JPEG"
        assert image.size == (100, 240)


def test_thumbnail_of_a_broken_image_is_empty(tmp_path):
    assert agent.make_thumbnail(touch(tmp_path / "broken.jpg", b"\xff\xd8 not really")) == b""
    assert agent.make_thumbnail(tmp_path / "missing.jpg") == b""


def test_describe_adds_a_thumbnail_for_images_only(tmp_path):
    image_file(tmp_path / "p.png", (640, 640), "RGB", "PNG")
    image_file(tmp_path / "png-named.bin", (640, 640), "RGB", "PNG")
    events = {k: agent.describe(i) for k, i in agent.list_files(tmp_path).items()}
    with Image.open(io.BytesIO(events["p.png"].thumbnail)) as image:
        assert image.size == (320, 320)
    assert events["png-named.bin"].thumbnail == b""


# -- command line -------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "expected"), [
    ("http://localhost:8001", ("localhost:8001", False)),
    ("localhost:8001", ("localhost:8001", False)),
    ("http://127.0.0.1:8001/", ("127.0.0.1:8001", False)),
    ("https://gallery.example.com", ("gallery.example.com:443", True)),
    ("https://gallery.example.com:8443", ("gallery.example.com:8443", True)),
    ("http://[::1]:8001", ("[::1]:8001", False)),
])
def test_parse_server(url, expected):
    assert agent.parse_server(url) == expected


@pytest.mark.parametrize("url", ["ftp://host:1", "http://", "http://host:port"])
def test_parse_server_refuses_other_urls(url):
    with pytest.raises(ValueError):
        agent.parse_server(url)


def test_agent_command_needs_a_token_and_a_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("GALLERY_AGENT_TOKEN", raising=False)
    assert cli.main(["agent", "--device", "cam1", "--dir", str(tmp_path)]) == 2
    assert "GALLERY_AGENT_TOKEN" in capsys.readouterr().err
    monkeypatch.setenv("GALLERY_AGENT_TOKEN", "t0ken-value")
    assert cli.main(["agent", "--device", "cam1", "--dir", str(tmp_path / "nope")]) == 2
    assert "t0ken-value" not in capsys.readouterr().err
    assert cli.main(["agent", "--device", "dev/../x", "--dir", str(tmp_path)]) == 2
    assert "--device 'dev/../x'" in capsys.readouterr().err


# -- commands -----------------------------------------------------------------------------------


def upload_command(command_id: str, event_id: str, device_key: str) -> dpb.Command:
    return dpb.Command(id=command_id, upload_event=dpb.UploadEventCommand(
        event_id=event_id, device_key=device_key, name=pathlib.PurePosixPath(device_key).name))


@pytest.fixture
def offline_agent(tmp_path, monkeypatch):
    """An Agent whose channel messages land in a list and whose uploads are recorded, not sent."""
    a = agent.Agent(device="cam1", root=tmp_path, server="127.0.0.1:9", token="t")
    a._outbox = queue.Queue()
    a.uploads = []
    monkeypatch.setattr(a, "_send_file", lambda command_id, up, f: a.uploads.append((command_id, f.read())))
    yield a
    a.stop.set()
    a._channel.close()


def handle(a: agent.Agent, *commands: dpb.Command) -> list[tuple[str, str, str]]:
    """Feed commands one by one (each upload finished before the next); the channel replies."""
    for command in commands:
        a._on_command(command)
        for thread in a._upload_threads:
            thread.join(timeout=5)
    replies = []
    while not a._outbox.empty():
        m = a._outbox.get()
        kind = m.WhichOneof("message")
        replies.append((kind, getattr(m, kind).command_id, m.failure.reason))
    return replies


def test_a_command_delivered_twice_uploads_once(offline_agent, tmp_path):
    touch(tmp_path / "sub" / "a.jpg", b"content")
    command = upload_command("cmd_1", "evt_1", "sub/a.jpg")
    assert handle(offline_agent, command, command) == [("ack", "cmd_1", ""), ("ack", "cmd_1", "")]
    assert offline_agent.uploads == [("cmd_1", b"content")]
    # Another command for the same event (e.g. a second pull) is done too.
    assert handle(offline_agent, upload_command("cmd_2", "evt_1", "sub/a.jpg")) == [("ack", "cmd_2", "")]
    assert len(offline_agent.uploads) == 1


@pytest.mark.parametrize(("device_key", "reason"), [
    ("gone.jpg", "file no longer on device"),
    ("../outside.jpg", "refused: device_key '../outside.jpg' is not a path inside the folder"),
    ("/etc/passwd", "refused: device_key '/etc/passwd' is not a path inside the folder"),
    ("folder", "cannot read the file: Is a directory"),
])
def test_a_file_that_cannot_be_sent_is_reported_as_a_failure(offline_agent, tmp_path, device_key, reason):
    (tmp_path / "folder").mkdir()
    touch(tmp_path.parent / "outside.jpg")
    assert handle(offline_agent, upload_command("cmd_1", "evt_1", device_key)) == [
        ("ack", "cmd_1", ""), ("failure", "cmd_1", reason)]
    assert offline_agent.uploads == []
    # Not remembered as done: delivered again, it is tried again.
    assert handle(offline_agent, upload_command("cmd_1", "evt_1", device_key))[-1][0] == "failure"


class BlockedUploads:
    """Stands in for _send_file: each upload runs until released (or the agent stops)."""

    def __init__(self, a: agent.Agent) -> None:
        self.agent = a
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.running = 0
        self.most = 0
        self.done: list[str] = []

    def __call__(self, command_id: str, up: dpb.UploadEventCommand, f: object) -> None:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            while not self.release.wait(0.05):
                if self.agent.stop.is_set():
                    raise agent._Stopped()
            self.done.append(command_id)
        finally:
            with self.lock:
                self.running -= 1


def start_uploads(a: agent.Agent, root: pathlib.Path, count: int) -> None:
    for n in range(count):
        touch(root / f"{n}.mov", b"clip")
        a._on_command(upload_command(f"cmd_{n}", f"evt_{n}", f"{n}.mov"))


def test_at_most_max_uploads_run_at_once_and_the_others_wait_their_turn(offline_agent, tmp_path, monkeypatch):
    uploads = BlockedUploads(offline_agent)
    monkeypatch.setattr(offline_agent, "_send_file", uploads)
    start_uploads(offline_agent, tmp_path, 5)
    assert wait_until(lambda: uploads.running == agent.MAX_UPLOADS)
    time.sleep(0.3)  # time enough for a third to start, were it allowed
    assert uploads.running == agent.MAX_UPLOADS

    uploads.release.set()
    for thread in offline_agent._upload_threads:
        thread.join(timeout=5)
    assert sorted(uploads.done) == [f"cmd_{n}" for n in range(5)]
    assert uploads.most == agent.MAX_UPLOADS
    assert [m.WhichOneof("message") for m in offline_agent._outbox.queue] == ["ack"] * 5


def test_uploads_waiting_their_turn_do_not_hold_up_stop_nor_fail(offline_agent, tmp_path, monkeypatch):
    uploads = BlockedUploads(offline_agent)
    monkeypatch.setattr(offline_agent, "_send_file", uploads)
    start_uploads(offline_agent, tmp_path, 5)
    assert wait_until(lambda: uploads.running == agent.MAX_UPLOADS)

    offline_agent.stop.set()
    started = time.monotonic()
    for thread in offline_agent._upload_threads:
        thread.join(timeout=5)
    assert time.monotonic() - started < 1
    assert not any(t.is_alive() for t in offline_agent._upload_threads)
    # Unanswered rather than failed: the server delivers them again to the next connection.
    assert [m.WhichOneof("message") for m in offline_agent._outbox.queue] == ["ack"] * 5
    assert uploads.done == [] and offline_agent._uploading == set()


@pytest.mark.parametrize(("option", "value"), [
    ("--scan-interval", "0"), ("--scan-interval", "-1"), ("--scan-interval", "nan"), ("--scan-interval", "0.05"),
    ("--scan-interval", "x"), ("--max-rate", "-5"), ("--max-rate", "inf"), ("--max-rate", "nan"),
])
def test_the_agent_refuses_a_scan_interval_or_a_rate_that_means_nothing(tmp_path, capsys, option, value):
    """`--scan-interval 0` (or -1, nan) scanned the folder without pause, a core at 100%;
    `--max-rate -5` meant no limit."""
    with pytest.raises(SystemExit) as exited:
        cli.main(["agent", "--device", "cam-9", "--dir", str(tmp_path), "--token", "t", option, value])
    assert exited.value.code == 2
    assert f"argument {option}: {value}: must be a number" in capsys.readouterr().err
