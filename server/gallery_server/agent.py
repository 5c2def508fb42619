"""`gallery agent`: the device side of the gallery, and the reference for device integrators.

A device keeps its media and tells the gallery what it holds; the gallery fetches the content only
when someone pulls it. The protocol (protos/gallery/v1/device.proto), as this agent speaks it:

1. Every call carries `authorization: Bearer <token>` metadata. The token's `devices` claim names
   this device and its scope includes `gallery:device`.
2. DeviceService.AnnounceEvents(device, events) lists files without their content: device_key
   (the device's stable key; here the path relative to the watched folder), name, size, created,
   sha256 and an optional small JPEG thumbnail. It is idempotent per device_key (the same key gets
   the same event id back), so the agent keeps no state file: it announces everything again on
   start and after every reconnect, which also lets a server that lost its database converge.
   New content under a key is a new capture (a new event id). A capture whose event a user
   deleted is answered `deleted` and stays deleted; the agent leaves its file alone.
   A call carries at most 1000 events and must fit the server's 8 MiB message limit, so the agent
   cuts its list by count and by serialized size. The server checks the whole list and refuses it
   all for one file it will not take (INVALID_ARGUMENT, e.g. INVALID_SIZE; RESOURCE_EXHAUSTED
   THUMBNAIL_TOO_LARGE): the agent then announces each half on its own, down to the file at
   fault, which it leaves out until the file changes or the channel reconnects. An unreachable
   or busy server is retried whole at the next scan; a refused token or device (UNAUTHENTICATED,
   PERMISSION_DENIED) stops the agent with exit status 2, since no retry can mend it.
3. DeviceService.Connect is the command channel, a bidirectional stream. The device sends
   `hello{device}` first; the server streams a heartbeat at once and every few seconds, and
   `command`s. Commands are durable and delivered at least once, so one may arrive twice.
4. On `upload_event{event_id, device_key, name}` the device sends `ack`, then streams the file
   with GalleryService.UploadEvent: a header{device, event_id, name, size} then 1 MiB media_chunk
   messages, reporting `progress{bytes_sent}` on the channel. The header also carries the sha256
   the agent has for the file as it is now, if it has hashed it so: the server refuses one that
   is not the announced capture's before any byte (else, at the end: the announced sha256
   binds). The upload succeeding is the command's success; when the file cannot be sent the
   device answers `failure{reason}`. FAILED_PRECONDITION with reason EVENT_ALREADY_STORED means an
   earlier attempt got through; NOT_FOUND, that the event is gone (deleted, or replaced by a
   newer capture under its key).
5. When the channel ends or fails (or stays silent), reconnect with exponential backoff and full
   jitter. Uploads run in their own threads, at most MAX_UPLOADS at once (the server refuses a
   device more than GALLERY_MAX_UPLOADS_PER_DEVICE at once); the others wait their turn. An
   upload retries the same way after a transient error and after a refusal for want of capacity,
   which the server means as "retry later": RESOURCE_EXHAUSTED with reason TOO_MANY_UPLOADS,
   TOO_MANY_DEVICE_UPLOADS or INSUFFICIENT_STORAGE, or grpc's own without a reason (too many
   calls at once), and no sooner than the `retry-after` the server names. Any other refusal fails
   the command. Slots are held while sending only, not while backing off. A failed announcement
   is retried at the next scan, later and later.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import io
import logging
import mimetypes
import os
import pathlib
import queue
import random
import signal
import stat
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import BinaryIO

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from gallery.v1 import device_pb2 as dpb
from gallery.v1 import device_pb2_grpc, gallery_pb2_grpc
from gallery.v1 import gallery_pb2 as gpb

from .errors import RETRY_AFTER_HEADER

log = logging.getLogger("gallery.agent")

CHUNK = 1 << 20  # bytes per media_chunk message
MAX_ANNOUNCE = 1000  # events per AnnounceEvents call (the server's limit)
# Serialized events per AnnounceEvents call: half the server's 8 MiB message limit, which leaves
# room for the request's own framing and for a server configured tighter than the default.
MAX_ANNOUNCE_BYTES = 4 << 20
# Uploads at once. Each holds one of the server's upload slots for as long as it sends, and the
# server refuses a device past GALLERY_MAX_UPLOADS_PER_DEVICE (4 by default) with "retry later".
# Staying below that leaves room for a slot the server has not freed yet (an upload cut short) or
# a second agent of the device; more streams would not finish sooner over one uplink anyway.
MAX_UPLOADS = 2
UPLOAD_SLOT_POLL_S = 0.2  # how often an upload waiting for its turn checks whether we stop
MAX_KEY_CHARS = 512  # the server's limit on device_key
THUMBNAIL_PX = 320
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0
CHANNEL_SILENCE_S = 30.0  # the server heartbeats every 5 s: this much silence means a dead channel
PROGRESS_EVERY_S = 1.0
IGNORED_SUFFIXES = (".part", ".tmp")  # files still being written by convention
# The server refuses this agent itself, its token (expired, revoked, signed with another key) or
# its device: no retry can help, and the agent stops (exit status 2) so that whatever runs it
# sees the failure and can start it again with a new token.
REFUSED = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})

# Worth retrying: the server or the network is away, or had a passing problem.
TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                       grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                       grpc.StatusCode.CANCELLED})
# RESOURCE_EXHAUSTED reasons that mean the server is at capacity (uploads at once, free disk), not
# that the request is too big: the same request may succeed later.
CAPACITY_REASONS = frozenset({"TOO_MANY_UPLOADS", "TOO_MANY_DEVICE_UPLOADS", "INSUFFICIENT_STORAGE"})
# INVALID_ARGUMENT reasons about the request rather than a file in it: no file is at fault, so
# announcing the list in halves would only refuse every file one by one.
REQUEST_REASONS = frozenset({"INVALID_DEVICE_ID"})


# What grpc itself says, without a reason, of a message above the server's limit.
TOO_LARGE_MESSAGE = "larger than max"


def retry_later(code: grpc.StatusCode, reason: str, details: str = "") -> bool:
    """Whether a call that failed so may succeed if made again later, unchanged: transient
    errors, the server's capacity refusals, and grpc's own RESOURCE_EXHAUSTED without a reason
    ("Concurrent RPC limit exceeded!") unless it is about the message's size."""
    if code in TRANSIENT:
        return True
    return code == grpc.StatusCode.RESOURCE_EXHAUSTED and (
        reason in CAPACITY_REASONS or (not reason and TOO_LARGE_MESSAGE not in details))


def refuses_content(code: grpc.StatusCode, reason: str, details: str = "") -> bool:
    """Whether an AnnounceEvents failure refuses what the events say (so some file is at fault)
    rather than the caller (token, device) or the moment (network, capacity)."""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return reason not in REQUEST_REASONS
    # A limit on what was sent: THUMBNAIL_TOO_LARGE, TOO_MANY_EVENTS, or grpc's own "Received
    # message larger than max", which has no reason.
    return code == grpc.StatusCode.RESOURCE_EXHAUSTED and not retry_later(code, reason, details)


def server_wait(error: grpc.RpcError) -> float:
    """The seconds a refused call was asked to wait (the server's `retry-after` trailer, rpc/status.py),
    at most BACKOFF_CAP_S; 0 without one."""
    metadata = error.trailing_metadata() if isinstance(error, grpc.Call) else None
    for key, value in metadata or ():
        if key == RETRY_AFTER_HEADER and isinstance(value, str) and value.isascii() and value.isdigit():
            return min(float(value), BACKOFF_CAP_S)
    return 0.0


def backoff_delay(attempt: int, rng: Callable[[], float] = random.random) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**attempt))."""
    return rng() * min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** min(attempt, 32))


def parse_server(url: str) -> tuple[str, bool]:
    """`http://host:port` or `host:port` -> (host:port, insecure); `https://...` -> secure."""
    parsed = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
    secure = parsed.scheme in ("https", "grpcs")
    if parsed.scheme not in ("http", "https", "grpc", "grpcs") or not parsed.hostname:
        raise ValueError(f"not a server URL: {url!r}")
    host = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname
    return f"{host}:{parsed.port or (443 if secure else 80)}", secure


def resolve_key(root: pathlib.Path, device_key: str) -> pathlib.Path:
    """The file a device_key names; ValueError for a key that would leave the watched folder."""
    key = pathlib.PurePosixPath(device_key)
    if not device_key or "\x00" in device_key or key.is_absolute() or ".." in key.parts:
        raise ValueError(f"device_key {device_key!r} is not a path inside the folder")
    base = root.resolve()
    path = (base / key).resolve()  # follows symlinks, so a link pointing outside is refused too
    if path == base or not path.is_relative_to(base):
        raise ValueError(f"device_key {device_key!r} leads outside the folder")
    return path


@dataclasses.dataclass(frozen=True)
class FileInfo:
    key: str  # path relative to the folder, with "/" separators: the device_key
    path: pathlib.Path
    size: int
    mtime_ns: int


def list_files(root: pathlib.Path) -> dict[str, FileInfo]:
    """Regular files under root, skipping dotfiles, dot-folders, *.part/*.tmp and symlinks."""
    found = {}
    for folder, subfolders, names in os.walk(root):  # does not descend into symlinked folders
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        for name in names:
            if name.startswith(".") or name.endswith(IGNORED_SUFFIXES) or not name.isprintable():
                continue
            path = pathlib.Path(folder, name)
            try:
                st = path.lstat()
            except OSError:
                continue  # gone since the listing
            key = path.relative_to(root).as_posix()
            if stat.S_ISREG(st.st_mode) and len(key) <= MAX_KEY_CHARS and len(name) <= 255:
                found[key] = FileInfo(key, path, st.st_size, st.st_mtime_ns)
    return found


class Scanner:
    """Polls the folder; a file counts once its size and mtime held still for one scan interval."""

    def __init__(self, root: pathlib.Path) -> None:
        self.root = root
        self._previous: dict[str, tuple[int, int]] = {}

    def scan(self) -> list[FileInfo]:
        current = list_files(self.root)
        stable = [f for k, f in current.items() if self._previous.get(k) == (f.size, f.mtime_ns)]
        self._previous = {k: (f.size, f.mtime_ns) for k, f in current.items()}
        return sorted(stable, key=lambda f: f.key)


def make_thumbnail(path: pathlib.Path) -> bytes:
    """A JPEG at most THUMBNAIL_PX on its longer side, or b"" if the image cannot be read."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            image.draft("RGB", (THUMBNAIL_PX, THUMBNAIL_PX))  # JPEG: decode at a reduced scale
            image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))  # small before it is turned: no full-size copy
            small = ImageOps.exif_transpose(image).convert("RGB")
            out = io.BytesIO()
            small.save(out, "JPEG", quality=80)
            return out.getvalue()
    except Exception:  # noqa: BLE001  (a thumbnail is optional: any failure means none)
        return b""


def file_sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def describe(info: FileInfo, sha256: str = "") -> dpb.AnnouncedEvent:
    """The announcement of one file, with a thumbnail for an image; hashes it unless given."""
    created = Timestamp()
    created.FromNanoseconds(info.mtime_ns)
    is_image = (mimetypes.guess_type(info.path.name)[0] or "").startswith("image/")
    return dpb.AnnouncedEvent(
        device_key=info.key, name=info.path.name, size=info.size, created=created,
        sha256=sha256 or file_sha256(info.path), thumbnail=make_thumbnail(info.path) if is_image else b"",
    )


Pending = tuple[FileInfo, dpb.AnnouncedEvent]  # a file and its announcement, not sent yet


def announce_batches(pending: list[Pending]) -> Iterator[list[Pending]]:
    """Consecutive runs of at most MAX_ANNOUNCE events and MAX_ANNOUNCE_BYTES serialized bytes; an
    event larger than that on its own goes alone (the server says whether it takes it)."""
    batch: list[Pending] = []
    batch_bytes = 0
    for item in pending:
        item_bytes = item[1].ByteSize()
        if batch and (len(batch) == MAX_ANNOUNCE or batch_bytes + item_bytes > MAX_ANNOUNCE_BYTES):
            yield batch
            batch, batch_bytes = [], 0
        batch.append(item)
        batch_bytes += item_bytes
    if batch:
        yield batch


def error_reason(error: grpc.RpcError) -> str:
    """The ErrorInfo reason of a gallery error (e.g. EVENT_ALREADY_STORED), or ""."""
    status = rpc_status.from_call(error) if isinstance(error, grpc.Call) else None
    for detail in status.details if status else []:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return ""


class _ReadError(Exception):
    """The file could not be read while uploading it."""


class _Stopped(Exception):
    """The agent is stopping: the upload was cancelled."""


class Agent:
    def __init__(self, *, device: str, root: pathlib.Path, server: str, token: str,
                 scan_interval: float = 2.0, max_rate: float = 0) -> None:
        self.device, self.root, self.scan_interval, self.max_rate = device, root, scan_interval, max_rate
        self.exit_status = 0
        self._target, self._secure = parse_server(server)
        self._open_connection()
        self._metadata = (("authorization", f"Bearer {token}"),)
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._outbox: queue.Queue[dpb.ConnectRequest | None] | None = None  # the open channel's
        self._call: grpc.Call | None = None
        self._reannounce = threading.Event()
        self._announced: dict[str, tuple[int, int]] = {}  # key -> (size, mtime_ns) announced
        # key -> (size, mtime_ns) the server refused to take: not sent again until it changes
        self._refused: dict[str, tuple[int, int]] = {}
        self._hashes: dict[str, tuple[int, int, str]] = {}  # key -> (size, mtime_ns, sha256)
        self._upload_threads: list[threading.Thread] = []
        self._upload_slots = threading.BoundedSemaphore(MAX_UPLOADS)
        # A command concerns one event, so event ids stand for handled command ids: an event
        # uploaded (or being uploaded) is not uploaded again, whichever command asks.
        self._uploaded: set[str] = set()
        self._uploading: set[str] = set()

    # -- main loop: watch the folder and announce --------------------------------------------

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.stop.set())
        log.info("agent for device %s watching %s", self.device, self.root)
        channel_thread = threading.Thread(target=self._channel_loop, name="channel", daemon=True)
        channel_thread.start()
        scanner = Scanner(self.root)
        failures = 0
        while not self.stop.is_set():
            if self._reannounce.is_set():  # a (re)connected server may have forgotten us
                self._reannounce.clear()
                self.forget_announced()
            todo = [f for f in scanner.scan() if self._announced.get(f.key) != (f.size, f.mtime_ns)]
            try:
                self.announce(todo)
                failures = 0
            except grpc.RpcError as exc:
                if self._stop_if_refused(exc):
                    break
                # Backs off: each try describes the pending files again (thumbnails included).
                failures += 1
                log.warning("announce failed (%s: %s); will retry", exc.code().name, exc.details())
            self.stop.wait(self.scan_interval + (backoff_delay(failures) if failures else 0))
        log.info("stopping")
        if self._call is not None:
            self._call.cancel()
        for thread in [channel_thread, *self._upload_threads]:
            thread.join(timeout=5)
        self._channel.close()
        return self.exit_status

    def _stop_if_refused(self, exc: grpc.RpcError) -> bool:
        """Stops the agent if the server refuses it (REFUSED); True then."""
        if exc.code() not in REFUSED:
            return False
        log.error("the server refuses this agent (%s: %s): stopping; start it again with a token"
                  " that has scope gallery:device for device %s", exc.code().name, exc.details(), self.device)
        self.exit_status = 2
        self.stop.set()
        return True

    def forget_announced(self) -> None:
        """Announce everything again, refused files too: the server may have lost its database, or
        changed its limits."""
        self._announced.clear()
        self._refused.clear()

    def announce(self, files: list[FileInfo]) -> None:
        """Announces the files but those the server refused as they are now. Raises the RpcError
        of a failure that is not about one file (token, network, capacity): retry them all later."""
        wanted = [f for f in files if self._refused.get(f.key) != (f.size, f.mtime_ns)]
        for batch in announce_batches(self._described(wanted)):
            self._announce_batch(batch)

    def _described(self, files: list[FileInfo]) -> Iterator[Pending]:
        """Each file's announcement, made as the batches need them: one batch's thumbnails are
        held at a time, not a whole folder's."""
        for info in files:
            try:
                event = describe(info, self._known_sha256(info.key, info.size, info.mtime_ns))
            except OSError:
                continue  # vanished or unreadable: the next scan decides
            self._hashes[info.key] = (info.size, info.mtime_ns, event.sha256)
            yield info, event

    def _known_sha256(self, key: str, size: int, mtime_ns: int) -> str:
        """The file's hash from an earlier reading of it as it is now, or "" (hash a file once,
        not on every announcement or upload)."""
        known = self._hashes.get(key)
        return known[2] if known and known[:2] == (size, mtime_ns) else ""

    def _announce_batch(self, batch: list[Pending]) -> None:
        try:
            response = self._devices.AnnounceEvents(
                dpb.AnnounceEventsRequest(device=self.device, events=[e for _, e in batch]),
                metadata=self._metadata, timeout=60,
            )
        except grpc.RpcError as exc:
            if not refuses_content(exc.code(), error_reason(exc), exc.details() or ""):
                raise
            # The server refuses the whole list for one file: halve it until that file is alone,
            # so that it does not keep the others unannounced for ever.
            if len(batch) == 1:
                self._refuse(batch[0][0], exc)
                return
            middle = len(batch) // 2
            self._announce_batch(batch[:middle])
            self._announce_batch(batch[middle:])
            return
        for info, _ in batch:
            self._announced[info.key] = (info.size, info.mtime_ns)
        states = collections.Counter(r.state for r in response.results)
        log.info("announced %d file(s) (%d already stored, %d deleted by a user)",
                 len(batch), states["stored"], states["deleted"])

    def _refuse(self, info: FileInfo, exc: grpc.RpcError) -> None:
        log.warning("not announcing %s until it changes: the server refused it (%s %s: %s)",
                    info.key, exc.code().name, error_reason(exc) or "-", exc.details())
        self._refused[info.key] = (info.size, info.mtime_ns)

    # -- the command channel ------------------------------------------------------------------

    def _channel_loop(self) -> None:
        attempt = 0
        while not self.stop.is_set():
            if self._connect_once():
                attempt = 0  # it worked for a while: start the backoff over
            if self.stop.is_set():
                return
            delay = backoff_delay(attempt)
            attempt += 1
            log.info("reconnecting in %.1fs", delay)
            self.stop.wait(delay)

    def _open_connection(self) -> None:
        """A new gRPC channel (its own TCP connection) and the stubs on it."""
        # grpc shares connections between channels of the same target and options: without a
        # pool of its own, the new channel would take the old one's dead connection.
        options = [("grpc.use_local_subchannel_pool", 1)]
        channel = (grpc.secure_channel(self._target, grpc.ssl_channel_credentials(), options) if self._secure
                   else grpc.insecure_channel(self._target, options))
        self._channel = channel
        self._devices = device_pb2_grpc.DeviceServiceStub(channel)
        self._gallery = gallery_pb2_grpc.GalleryServiceStub(channel)

    def _replace_connection(self) -> None:
        """Leave a connection that went silent: grpc would send every new call into it until the
        kernel gave up on it (~15 min), so the reconnected channel would hear nothing either.
        New calls take the new one. The old one is closed CHANNEL_SILENCE_S later, not at once
        (a call whose stub another thread took a moment ago would fail with ValueError, not an
        RpcError): its calls still waiting then end CANCELLED, and uploads retry on the new one."""
        old = self._channel
        self._open_connection()
        closer = threading.Timer(CHANNEL_SILENCE_S, old.close)
        closer.daemon = True
        closer.start()

    def _connect_once(self) -> bool:
        """Runs one Connect stream until it ends; True if the server answered at all."""
        outbox: queue.Queue[dpb.ConnectRequest | None] = queue.Queue()

        def requests() -> Iterator[dpb.ConnectRequest]:
            yield dpb.ConnectRequest(hello=dpb.DeviceHello(device=self.device, agent="gallery-agent/py"))
            while (message := outbox.get()) is not None:
                yield message

        call = self._devices.Connect(requests(), metadata=self._metadata)
        self._call = call
        if self.stop.is_set():  # stopped while connecting: run() may have missed this call
            call.cancel()
        last_seen = time.monotonic()
        ended, silent = threading.Event(), threading.Event()

        def watchdog() -> None:  # heartbeats stopped: the connection is dead without knowing it
            while not ended.wait(1):
                if time.monotonic() - last_seen > CHANNEL_SILENCE_S:
                    log.warning("no heartbeat for %.0fs; dropping the channel", CHANNEL_SILENCE_S)
                    silent.set()
                    call.cancel()
                    return

        threading.Thread(target=watchdog, name="watchdog", daemon=True).start()
        established = False
        try:
            for response in call:
                last_seen = time.monotonic()
                if not established:
                    established = True
                    with self._lock:
                        self._outbox = outbox
                    self._reannounce.set()
                    log.info("channel open")
                if response.HasField("command"):
                    self._on_command(response.command)
            log.info("channel closed by the server")
        except grpc.RpcError as exc:
            if not self.stop.is_set() and not self._stop_if_refused(exc):
                log.warning("channel failed: %s: %s", exc.code().name, exc.details())
        finally:
            ended.set()
            with self._lock:
                self._outbox = None
            outbox.put(None)  # ends requests(), so gRPC's sending thread finishes
        if silent.is_set() and not self.stop.is_set():
            self._replace_connection()
        return established

    def _send(self, message: dpb.ConnectRequest) -> None:
        """Sends on the open channel; dropped when there is none (an unanswered command is
        delivered again after the reconnect)."""
        with self._lock:
            if self._outbox is not None:
                self._outbox.put(message)

    def _on_command(self, command: dpb.Command) -> None:
        if command.WhichOneof("action") != "upload_event":
            log.warning("command %s: unknown action; refusing it", command.id)
            self._send(dpb.ConnectRequest(failure=dpb.CommandFailure(
                command_id=command.id, reason="this agent does not support the command")))
            return
        self._send(dpb.ConnectRequest(ack=dpb.CommandAck(command_id=command.id)))
        up = command.upload_event
        with self._lock:
            if up.event_id in self._uploaded or up.event_id in self._uploading:
                log.info("command %s: %s already uploaded or uploading", command.id, up.device_key)
                return
            self._uploading.add(up.event_id)
        log.info("command %s: upload %s as %s", command.id, up.device_key, up.event_id)
        thread = threading.Thread(target=self._upload, args=(command.id, up), name="upload", daemon=True)
        thread.start()
        self._upload_threads = [t for t in self._upload_threads if t.is_alive()] + [thread]

    # -- uploads ------------------------------------------------------------------------------

    def _upload(self, command_id: str, up: dpb.UploadEventCommand) -> None:
        try:
            if self._upload_with_retries(command_id, up):
                with self._lock:
                    self._uploaded.add(up.event_id)
        finally:
            with self._lock:
                self._uploading.discard(up.event_id)

    @contextlib.contextmanager
    def _upload_slot(self) -> Iterator[None]:
        """Holds one of the MAX_UPLOADS slots while sending (not while backing off between
        attempts); raises _Stopped if the agent stops while waiting for one."""
        while not self._upload_slots.acquire(timeout=UPLOAD_SLOT_POLL_S):
            if self.stop.is_set():
                raise _Stopped()
        try:
            yield
        finally:
            self._upload_slots.release()

    def _fail(self, command_id: str, up: dpb.UploadEventCommand, reason: str) -> bool:
        log.warning("command %s: %s: %s", command_id, up.device_key, reason)
        self._send(dpb.ConnectRequest(failure=dpb.CommandFailure(command_id=command_id, reason=reason)))
        return False

    def _upload_with_retries(self, command_id: str, up: dpb.UploadEventCommand) -> bool:
        attempt = 0
        while not self.stop.is_set():
            try:
                path = resolve_key(self.root, up.device_key)
                f = path.open("rb")
            except ValueError as exc:
                return self._fail(command_id, up, f"refused: {exc}")
            except FileNotFoundError:
                return self._fail(command_id, up, "file no longer on device")
            except OSError as exc:
                return self._fail(command_id, up, f"cannot read the file: {exc.strerror}")
            try:
                with f, self._upload_slot():
                    self._send_file(command_id, up, f)
                log.info("command %s: uploaded %s", command_id, up.device_key)
                return True
            except _ReadError as exc:
                return self._fail(command_id, up, f"cannot read the file: {exc}")
            except _Stopped:  # the command, unanswered, is delivered again next time
                return False
            except grpc.RpcError as exc:
                if self.stop.is_set():
                    return False
                code, reason = exc.code(), error_reason(exc)
                if code == grpc.StatusCode.FAILED_PRECONDITION and reason == "EVENT_ALREADY_STORED":
                    log.info("command %s: %s was already stored", command_id, up.device_key)
                    return True
                if not retry_later(code, reason, exc.details() or ""):
                    return self._fail(command_id, up, f"upload refused: {exc.details()}")
                # No sooner than the server asked: full jitter alone may retry at once.
                delay = max(backoff_delay(attempt), server_wait(exc))
                attempt += 1
                log.warning("command %s: upload failed (%s: %s); retrying in %.1fs",
                            command_id, code.name, exc.details(), delay)
                self.stop.wait(delay)
        return False

    def _send_file(self, command_id: str, up: dpb.UploadEventCommand, f: BinaryIO) -> None:
        # Only a stream that ends with `finish` is stored, so one cut short (stop, read error) is
        # refused; the declared size catches a file that grew, the announced sha256 changed content.
        # The hash known for the file as it is now goes in the header: a file changed since it
        # was announced is refused (SHA256_MISMATCH) before its bytes are sent, and announced
        # again, as a new capture, at the next scan.
        st = os.fstat(f.fileno())
        size = st.st_size
        sha256 = self._known_sha256(up.device_key, size, st.st_mtime_ns)
        read_error: list[OSError] = []

        def requests() -> Iterator[gpb.UploadEventRequest]:
            yield gpb.UploadEventRequest(header=gpb.UploadHeader(
                device=self.device, event_id=up.event_id, name=up.name, size=size, sha256=sha256))
            sent, started, reported = 0, time.monotonic(), time.monotonic()
            while not self.stop.is_set():
                try:
                    chunk = f.read(CHUNK)
                except OSError as exc:
                    read_error.append(exc)
                    return
                except ValueError:  # closed: the call has ended already
                    return
                if not chunk:
                    yield gpb.UploadEventRequest(finish=gpb.UploadFinish())
                    return
                yield gpb.UploadEventRequest(media_chunk=chunk)
                sent += len(chunk)
                if self.max_rate:  # optional bandwidth cap
                    self.stop.wait(max(0.0, started + sent / self.max_rate - time.monotonic()))
                if time.monotonic() - reported >= PROGRESS_EVERY_S:
                    reported = time.monotonic()
                    self._send(dpb.ConnectRequest(progress=dpb.CommandProgress(
                        command_id=command_id, bytes_sent=sent)))

        future = self._gallery.UploadEvent.future(requests(), metadata=self._metadata)
        done = threading.Event()
        future.add_done_callback(lambda _: done.set())
        try:
            while not done.wait(0.2):
                if self.stop.is_set():
                    future.cancel()
                    raise _Stopped()
            future.result()
        except grpc.RpcError:
            if read_error:
                raise _ReadError(read_error[0].strerror or str(read_error[0])) from None
            raise
