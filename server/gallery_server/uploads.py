"""An upload in flight: staged media and thumbnail plus the fields that describe them.

Nothing here touches the database; Gallery.store() turns a finished Upload into an event.

Also the limits on uploads in flight, per replica: UploadSlots (how many at once, per device and
in total) and IdleWatchdog (a stream that sends nothing for a while is aborted).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from typing import TYPE_CHECKING, NoReturn, TypeVar

from .errors import Busy, Exhausted, FailedPrecondition, InvalidArgument
from .models import Event
from .quota import Room
from .storage import StagedFile, Storage, upload_too_large
from .threads import grant_share

if TYPE_CHECKING:
    from .auth import Principal


@dataclasses.dataclass
class UploadFields:
    """What the client said about the upload; validated by Gallery.store()."""

    name: str = ""
    media_type: str = ""  # empty: infer from content and name
    metadata_json: str = "{}"
    declared_size: int | None = None
    declared_sha256: str = ""
    # REST `has_thumbnail`: when true, a thumbnail part must be present.
    thumbnail_promised: bool = False
    # The device's own id for the capture; an event of the device with it already is the answer
    # instead of a new event (Gallery.store()). Empty: none.
    device_event_id: str = ""

    def declare_size(self, size: int) -> None:
        """Record a declared size; two declarations (header and finish) must agree."""
        if self.declared_size is not None and self.declared_size != size:
            raise InvalidArgument(
                "SIZE_MISMATCH", f"declared sizes disagree: {self.declared_size} and {size}",
                field="size",
            )
        self.declared_size = size

    def declare_sha256(self, sha256: str) -> None:
        if self.declared_sha256 and sha256 and self.declared_sha256 != sha256:
            raise InvalidArgument(
                "SHA256_MISMATCH", "declared sha256 values disagree", field="sha256"
            )
        self.declared_sha256 = self.declared_sha256 or sha256


class Upload:
    """Receives bytes into staging; discards them on close() unless Gallery.store() took them."""

    def __init__(
        self, storage: Storage, device: str, *, max_media_bytes: int, max_thumbnail_bytes: int,
        media: StagedFile | None = None, release: Callable[[], None] | None = None,
        media_is: str = "event", room: Room | None = None, stored_capture: Callable[[str], bool] | None = None,
    ) -> None:
        """`media`: bytes received already (a resumable upload's file), instead of a new file.
        `release`: called once on close(), to give back an UploadSlots slot. `media_is`: what the
        body is, as errors name it (a pre-signed thumbnail PUT's body is its thumbnail). `room`:
        the device's quota, checked against declared and received sizes as they come, unless
        `stored_capture(device_event_id)` says the upload retries a capture stored already."""
        self.device = device
        self._release = release
        self._room = room
        self._stored_capture = stored_capture
        self.fields = UploadFields()
        self._storage = storage
        self._max_thumbnail_bytes = max_thumbnail_bytes
        self.media = media or storage.stage(max_bytes=max_media_bytes, what=media_is)
        self.media_received = media is not None
        self.thumbnail: StagedFile | None = None

    def declare_size(self, size: int) -> None:
        """A declared media size (a header's, a finish's, an announcement's): one the media may
        not reach is refused now, as StartUpload does, not after the client sent that many bytes."""
        self.expect_media_size(size)
        self.fields.declare_size(size)

    def expect_media_size(self, size: int) -> None:
        limit = self.media.max_bytes
        if size > limit:
            raise upload_too_large(self.media.what, limit, field="size")
        self._check_room(size)

    def _check_room(self, size: int) -> None:
        """`size` bytes of media (and thumbnail) against the device's quota. Past it, an upload
        naming a capture the device has stored already (device_event_id, told before the bytes)
        goes on, with no room to check: Gallery.store answers that capture and stores nothing
        (or, for other content, DEVICE_EVENT_ID_CONFLICT), so a device that lost the answer of
        the upload that filled its quota learns it was stored. Its commit's own check still holds
        the quota."""
        if self._room is None:
            return
        try:
            self._room.check(size)
        except Exhausted:
            retry = self.fields.device_event_id
            if not (retry and self._stored_capture is not None and self._stored_capture(retry)):
                raise
            self._room = None

    def fill(self, announced: Event) -> None:
        """Make this the upload of the capture a device announced (and was asked to pull): what
        the client left blank comes from the announcement. The announced size and sha256 bind the
        content: a client naming others is refused (SIZE_MISMATCH, SHA256_MISMATCH) before any
        byte, not taken in their place, and so are bytes that differ. Without a sha256 the size is
        what tells this capture from new content under its name (a loop recording)."""
        self.fields.name = self.fields.name or announced.name
        self.fields.media_type = self.fields.media_type or announced.media_type
        self.declare_size(announced.size)
        self.fields.declare_sha256(announced.sha256)
        if self.fields.metadata_json == "{}":
            self.fields.metadata_json = announced.metadata_json

    def write_media(self, data: bytes | memoryview) -> None:
        self.media_received = True
        self.media.write(data)
        self._check_room(self.received)
        declared = self.fields.declared_size
        if declared is not None and self.media.size > declared:
            raise InvalidArgument(
                "SIZE_MISMATCH", f"media is larger than the declared size {declared}",
                field="size", declared=str(declared),
            )

    def write_thumbnail(self, data: bytes | memoryview) -> None:
        if not data:  # an empty chunk is no thumbnail yet (as an empty multipart part is none)
            return
        if self.thumbnail is None:
            self.thumbnail = self._storage.stage(
                max_bytes=self._max_thumbnail_bytes, what="thumbnail"
            )
        self.thumbnail.write(data)
        self._check_room(self.received)

    @property
    def received(self) -> int:
        """Bytes of media and thumbnail received so far: what they take of the device's quota."""
        return self.media.size + (self.thumbnail.size if self.thumbnail is not None else 0)

    def close(self) -> None:
        try:
            self.media.discard()
            if self.thumbnail is not None:
                self.thumbnail.discard()
        finally:
            release, self._release = self._release, None
            if release is not None:
                release()

    def __enter__(self) -> Upload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclasses.dataclass(frozen=True)
class Uploader:
    """Whose upload a stream is, for UploadSlots: a token's, or a pre-signed PUT's (`url`), of the
    token that asked for its URL (signed into the URL: signed_urls.py). Either way it takes a part
    of that token's budget, so that a token's own streams and its URLs' add up to one part."""

    key: str  # a digest of the token (Principal.token_id), never the token
    granted: int | None  # how many devices the token grants; None: every device ('*')
    # A PUT's: its URL's device and event (the PUTs of one event's URLs: at most PUTS_PER_EVENT).
    url: tuple[str, str] | None = None

    @classmethod
    def of(cls, principal: Principal) -> Uploader:
        # Digested again: the key travels in URLs, and token_id is the server's key of the token
        # for its other shares (threads.Holds). A principal made without a token: its grant.
        holder = principal.token_id or ",".join(sorted(principal.devices))
        key = hashlib.sha256(b"gallery upload budget\0" + holder.encode()).hexdigest()[:24]
        return cls(key, principal.granted)

    @property
    def counted_while_asked(self) -> bool:
        """Whether the stream counts against its token's part only while its client is asked for
        the first message (UploadSlots.asked_first), not while it queues for a receive permit, nor
        once it sends: a token for every device's own streams. That token is a gateway's or the
        operator's, whose bursts of 64 uploads queued for the permits were refused (429), and
        which may delete every event anyway. Every other stream counts from its start to its end:
        a token's silent streams, trickling uploads and URLs' PUTs, each counted apart, together
        filled the total."""
        return self.granted is None and self.url is None

    @property
    def budget(self) -> Hashable:
        # The URLs of a token for every device (a gateway's, for its devices to PUT) count by
        # their device, `per_device` each: a fleet's devices PUT at once, none takes another's
        # place, and none the gateway's own streams', which count only while asked.
        if self.granted is None and self.url is not None:
            return ("url", self.key, self.url[0])
        return self.key

    @property
    def granted_here(self) -> int | None:
        """The devices the part is counted for (threads.grant_share): one for a gateway's URLs."""
        return 1 if self.granted is None and self.url is not None else self.granted


# At most this many PUTs of one event's URLs (media and thumbnail together) at once: a retry may
# overlap the stream it replaces, which the server has not seen end yet; more would let whoever holds
# one event's URLs take their token's whole part (a device's token has 4).
PUTS_PER_EVENT = 2
# A PUT of those URLs whose client has sent nothing for this long gives its place to a new PUT of
# them that finds them at PUTS_PER_EVENT or their token's part full, and is aborted (UPLOAD_REPLACED):
# the new one is its client's retry over a new connection, the old one's connection most likely dead
# without a FIN, which nothing finds over HTTP/1.1 before the idle limit (GALLERY_UPLOAD_IDLE_SECONDS,
# 120 s by default). Two dropped connections of one event, or one of each of a device's 4, kept
# every retry at 429 until then. A REST body comes through Envoy in pieces
# as its bytes arrive, so a live PUT is rarely silent this long; waits for a receive permit or on the
# server's own work are no silence (IdleWatchdog).
REPLACE_SILENT_PUT_SECONDS = 5.0

# Pre-signed PUTs whose URL is not known before their first message (a native call: the REST
# path names it), and those of URLs of version 1, count as no token's: together they may have this
# fraction of the total awaiting their first message.
UNATTRIBUTED_SHARE = 8


K = TypeVar("K", bound=Hashable)


def _count_down(counts: dict[K, int], key: K) -> None:
    """One fewer for `key`, whose entry goes at 0 (the dicts hold only what is open)."""
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]


@dataclasses.dataclass(eq=False)
class _Place:
    """One stream counted against its part (UploadSlots.hold)."""

    budget: Hashable
    url: tuple[str, str] | None
    stream: WatchedStream | None
    given_back: bool = False


class UploadSlots:
    """Counts the uploads in flight in this replica and refuses one past either limit.

    Each upload holds a server thread and a staging file for as long as its client sends; without
    a bound, one device (or a crowd) could hold every thread and leave none for reads.

    A stream waiting for its first message holds a thread too, for up to
    GALLERY_UPLOAD_FIRST_MESSAGE_SECONDS, before its device (and so its slot) is known: such
    streams count against the total with those in flight (first_message()), so that uploads,
    started or not, hold at most `total` threads. Each token may hold only its part of the total
    (part(); threads.grant_share: `per_device` for each device it grants, half the total at most):
    its own streams and the PUTs of its URLs, from their start to their end (hold()), a token for
    every device's own only while asked (Uploader.counted_while_asked) and its URLs' by device
    (Uploader.budget); one event's URLs at most PUTS_PER_EVENT PUTs (past either, one of them silent
    for REPLACE_SILENT_PUT_SECONDS gives its place to a newer). Pre-signed PUTs whose token is not
    known (`uploader` None: a native call before its first message names the URL, a URL of version
    1) may have 1/UNATTRIBUTED_SHARE of the total awaiting: anyone can open them; once the URL is
    known, they hold its token's part too.
    """

    def __init__(
        self, *, per_device: int, total: int, replace_silent_after: float = REPLACE_SILENT_PUT_SECONDS,
    ) -> None:
        self.per_device = per_device
        self.total = total
        self.replace_silent_after = replace_silent_after
        self._lock = threading.Lock()
        self._by_device: dict[str, int] = {}
        self._in_flight = 0
        self._awaiting_first = 0
        self._by_budget: dict[Hashable, int] = {}  # Uploader.budget (None: not known yet)
        self._puts: dict[tuple[str, str], list[_Place]] = {}  # Uploader.url: its PUTs counted

    def part(self, uploader: Uploader | None) -> int:
        """How many streams of `uploader`'s budget may be counted at once."""
        if uploader is None:
            return max(1, self.total // UNATTRIBUTED_SHARE)
        return grant_share(uploader.granted_here, self.per_device, self.total)

    @contextlib.contextmanager
    def first_message(self, uploader: Uploader | None) -> Iterator[None]:
        """Around a stream's whole wait for its first message, a receive permit's included. It
        counts with the uploads in flight against the total, a stream of no known token against
        UNATTRIBUTED_SHARE too, and is refused at once past either."""
        budget = uploader.budget if uploader is not None else None
        with self._lock:
            # One that counts only once asked would be refused at its permit, having held a place
            # in the total while it queued: refused now. (The others are counted by hold().)
            counted_here = uploader is None or uploader.counted_while_asked
            if counted_here and self._by_budget.get(budget, 0) >= self.part(uploader):
                raise self._refusal(uploader)
            if self._in_flight + self._awaiting_first >= self.total:
                raise Busy(
                    "TOO_MANY_UPLOADS",
                    f"the server is receiving or awaiting {self.total} uploads already: retry later",
                    limit=str(self.total),
                )
            self._awaiting_first += 1
            if uploader is None:
                self._by_budget[None] = self._by_budget.get(None, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._awaiting_first -= 1
                if uploader is None:
                    _count_down(self._by_budget, None)

    @contextlib.contextmanager
    def asked_first(self, uploader: Uploader | None) -> Iterator[None]:
        """Around the wait on the client itself for a stream's first message, from when the stream
        holds a receive permit (receiving.py): what counts for a token for every device's own."""
        if uploader is None or not uploader.counted_while_asked:
            yield
            return
        release = self._take(uploader)
        try:
            yield
        finally:
            release()

    def hold(self, uploader: Uploader | None, stream: WatchedStream | None = None) -> Callable[[], None]:
        """Count one stream of `uploader` against its part, from its start to its end; returns
        the function that gives it back (once). Refused (Busy) past its part. A PUT's `stream` (its
        IdleWatchdog entry) lets a newer PUT of its event's URLs replace it once it has been
        silent for `replace_silent_after` (REPLACE_SILENT_PUT_SECONDS)."""
        if uploader is None or uploader.counted_while_asked:
            return lambda: None
        return self._take(uploader, stream)

    def _take(self, uploader: Uploader, stream: WatchedStream | None = None) -> Callable[[], None]:
        place = _Place(uploader.budget, uploader.url, stream)
        replaced, silence = None, 0.0
        with self._lock:
            puts = self._puts.get(place.url, []) if place.url is not None else []
            held = self._by_budget.get(place.budget, 0)
            # Full by the event's PUTs or by the token's part (a device whose connections all
            # dropped at once, one PUT of each event): a silent PUT of these URLs gives its place.
            if len(puts) >= PUTS_PER_EVENT or held >= self.part(uploader):
                replaced, silence = self._silent_longest(puts)
            if len(puts) - (replaced is not None) >= PUTS_PER_EVENT:
                raise Busy(
                    "TOO_MANY_UPLOADS",
                    f"the URLs of this event have {PUTS_PER_EVENT} PUTs in progress already: retry later",
                    limit=str(PUTS_PER_EVENT),
                )
            if replaced is not None and replaced.budget == place.budget:
                held -= 1  # the place it takes over
            if held >= self.part(uploader):
                raise self._refusal(uploader)
            if replaced is not None:
                self._give_back(replaced)
            self._by_budget[place.budget] = self._by_budget.get(place.budget, 0) + 1
            if place.url is not None:
                self._puts.setdefault(place.url, []).append(place)
        if replaced is not None:
            self._abort(replaced, silence)

        def release() -> None:
            with self._lock:
                self._give_back(place)

        return release

    def replace_silent(self, url: tuple[str, str]) -> bool:
        """Abort the PUT of `url`'s event whose client has been silent longest, if for
        `replace_silent_after` or more, its place given back; whether there was one. For a range
        PUT waiting for its session, which such a PUT holds (resumable.py): one dropped connection
        leaves a place free, so no third PUT comes to replace it, and every retry waited 5 s for
        the session's lock and got 409 UPLOAD_BUSY until the idle limit ended it."""
        with self._lock:
            replaced, silence = self._silent_longest(self._puts.get(url, []))
            if replaced is None:
                return False
            self._give_back(replaced)
        self._abort(replaced, silence)
        return True

    @staticmethod
    def _abort(replaced: _Place, silence: float) -> None:
        device, event_id = replaced.url or ("", "")
        log.warning("this PUT replaces a silent one of its URLs", extra={
            "device": device, "event_id": event_id, "idle_seconds": round(silence, 1),
        })
        try:
            if replaced.stream is not None:
                replaced.stream.replace()
        except Exception:  # noqa: BLE001 - its place is given back either way
            log.exception("could not abort a replaced upload")

    def _silent_longest(self, puts: list[_Place]) -> tuple[_Place | None, float]:
        """Of one event's PUTs, the one whose client has been silent longest, and for how long, if
        that is at least `replace_silent_after` (PUTs called natively have no stream here and are
        never replaced)."""
        now = time.monotonic()
        silences = [(p.stream.silent_for(now), i) for i, p in enumerate(puts) if p.stream is not None]
        silence, index = max(silences, default=(0.0, -1))
        if index < 0 or silence < self.replace_silent_after:
            return None, silence
        return puts[index], silence

    def _give_back(self, place: _Place) -> None:
        """Under the lock; once per place, whoever calls first: a stream's end and its RPC's end
        may come at once (twice, it undercounted), and a replaced PUT gives its place back early."""
        if place.given_back:
            return
        place.given_back = True
        _count_down(self._by_budget, place.budget)
        if place.url is not None:
            puts = self._puts[place.url]
            puts.remove(place)
            if not puts:
                del self._puts[place.url]

    def _refusal(self, uploader: Uploader | None) -> Busy:
        limit = self.part(uploader)
        if uploader is None:
            what = f"{limit} uploads by pre-signed URL not named in their path are awaiting their first message"
        elif uploader.counted_while_asked:
            what = f"this token has {limit} uploads awaiting their first message"
        elif uploader.url is not None and uploader.granted is None:
            what = f"the token that asked for this URL has {limit} uploads open for device {uploader.url[0]}"
        elif uploader.url is not None:
            what = f"the token that asked for this URL has {limit} uploads open (its URLs' included)"
        else:
            what = f"this token has {limit} uploads open (its upload URLs' included)"
        return Busy("TOO_MANY_UPLOADS", f"{what} already: retry later", limit=str(limit))

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def awaiting_first(self) -> int:
        """Streams waiting for their first message: they count against `total` too."""
        return self._awaiting_first

    @property
    def counted_by_token(self) -> int:
        """Streams counted against a part: a token's, its URLs', or that of the PUTs whose token is
        not known (a native PUT before its first message names its URL, a URL of version 1 before
        its first message). With no upload open, 0, else a place is lost until the replica stops."""
        with self._lock:
            return sum(self._by_budget.values())

    def acquire(self, device: str) -> Callable[[], None]:
        """Take a slot for `device`; returns the function that gives it back (once)."""
        with self._lock:
            if self._in_flight >= self.total:
                raise Busy(
                    "TOO_MANY_UPLOADS",
                    f"the server is receiving {self.total} uploads already: retry later",
                    limit=str(self.total),
                )
            held = self._by_device.get(device, 0)
            if held >= self.per_device:
                raise Busy(
                    "TOO_MANY_DEVICE_UPLOADS",
                    f"device {device} has {self.per_device} uploads in progress already: "
                    "finish one first",
                    device=device, limit=str(self.per_device),
                )
            self._by_device[device] = held + 1
            self._in_flight += 1

        def give_back() -> None:
            self._in_flight -= 1
            _count_down(self._by_device, device)

        return self._once(give_back)

    def _once(self, give_back: Callable[[], None]) -> Callable[[], None]:
        """`give_back` as the function that runs it once, under the lock, however many threads
        call it: a stream's end and its RPC's end may come at once (twice, it undercounted)."""
        done = False

        def release() -> None:
            nonlocal done
            with self._lock:
                if not done:
                    done = True
                    give_back()

        return release


T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class WatchedStream:
    """One stream under an IdleWatchdog."""

    cancel: Callable[[], None]
    limit: float  # seconds the current wait may last
    # Monotonic time the stream began waiting for its client (to send, or to take what was sent).
    waiting_since: float | None = None
    fired: bool = False  # aborted as idle
    replaced: bool = False  # aborted for a newer PUT of its URLs (UploadSlots)
    what: str = "upload"

    def silent_for(self, now: float) -> float:
        """How long its client has kept the stream waiting now; 0 while the server works."""
        since = self.waiting_since
        return 0.0 if since is None else now - since

    def replace(self) -> None:
        if self.fired:  # aborted as idle already: its reader fails with UPLOAD_IDLE
            return
        self.replaced = True
        self.cancel()


class IdleWatchdog:
    """Aborts upload streams whose client sends nothing for `idle_seconds`.

    A client that stops sending without closing its stream (a dead link, a stuck device) would
    otherwise hold its slot, its thread and its staging file until TCP gives up, which may be
    never. One thread per replica watches every stream; `cancel` (the transport's, e.g. a gRPC
    context's cancel) ends the stream, whose reader then fails with UPLOAD_IDLE and cleans up.

    Only the time the reader waits inside next() counts: the server's own work between messages
    (fsync, database waits) is never the client's silence. A message counts once whole, so the
    idle time must exceed the time the slowest client link takes to deliver the largest message:
    120 s with 4 MiB messages is about 35 KiB/s. The first message (before any slot is taken) has
    its own, shorter limit, `first_message_seconds`.

    What the client sees: cancel() resets the stream, so a gRPC client gets CANCELLED (grpcio
    cannot send another status to a call cancelled from outside its handler thread); the reason
    UPLOAD_IDLE is in the server log, and the REST client's connection is reset by Envoy.
    """

    def __init__(self, idle_seconds: float, *, first_message_seconds: float | None = None) -> None:
        self.idle_seconds = idle_seconds
        self.first_message_seconds = first_message_seconds or idle_seconds
        self._lock = threading.Lock()
        self._streams: set[WatchedStream] = set()
        self._thread: threading.Thread | None = None

    def stream(self, cancel: Callable[[], None], *, first_carries_data: bool = False) -> WatchedStream:
        """The entry of an upload stream to watch (watch_stream). `first_carries_data`: the first
        message may be a large chunk (WriteUpload), which a slow link needs as long for as any
        other: it gets the idle limit, not the first-message one."""
        return WatchedStream(cancel, self.idle_seconds if first_carries_data else self.first_message_seconds)

    def watch(
        self, messages: Iterator[T], cancel: Callable[[], None], *, first_carries_data: bool = False
    ) -> Iterator[T]:
        return self.watch_stream(messages, self.stream(cancel, first_carries_data=first_carries_data))

    @staticmethod
    def _raise_aborted(entry: WatchedStream) -> NoReturn:
        if entry.replaced:
            raise FailedPrecondition(
                "UPLOAD_REPLACED", "the upload sent nothing and a newer PUT of its URLs took its place",
            ) from None
        raise FailedPrecondition(
            "UPLOAD_IDLE", f"the upload sent nothing for {entry.limit:g} s and was aborted",
        ) from None

    def watch_stream(self, messages: Iterator[T], entry: WatchedStream) -> Iterator[T]:
        self._add(entry)
        try:
            while True:
                entry.waiting_since = time.monotonic()
                try:
                    message = next(messages)
                except StopIteration:
                    # grpcio may end a call cancelled from outside as a stream that ended: the
                    # reason is this one's, not a body cut short.
                    if not (entry.replaced or entry.fired):
                        return
                    self._raise_aborted(entry)
                except Exception:
                    if entry.replaced or entry.fired:
                        self._raise_aborted(entry)
                    raise
                finally:
                    entry.waiting_since = None
                entry.limit = self.idle_seconds
                yield message
                # Not held while waiting for the next one: with many slow streams, a chunk per
                # stream kept alive here is memory (BENCHMARKS.md, concurrent uploads).
                del message
        finally:
            # A finished (or abandoned) stream is never cancelled later.
            with self._lock:
                self._streams.discard(entry)
            close = getattr(messages, "close", None)
            if close is not None:
                close()

    def watch_sends(self, messages: Iterator[T], cancel: Callable[[], None], limit: float) -> Iterator[T]:
        """A download's messages, its stream cancelled once its client has taken none for `limit`
        seconds. A handler's send blocks while the client's flow-control windows are full, so a
        client that stops reading (without closing) would hold the handler's thread for ever."""
        entry = WatchedStream(cancel, limit, what="download")
        self._add(entry)
        try:
            for message in messages:
                entry.waiting_since = time.monotonic()
                yield message
                entry.waiting_since = None
                del message
        finally:
            with self._lock:
                self._streams.discard(entry)

    def _add(self, entry: WatchedStream) -> None:
        with self._lock:
            self._streams.add(entry)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="stream-idle", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        period = max(0.05, min(1.0, min(self.idle_seconds, self.first_message_seconds) / 4))
        while True:
            time.sleep(period)
            now = time.monotonic()
            with self._lock:
                stalled = [e for e in self._streams if not e.fired and e.waiting_since is not None
                           and now - e.waiting_since > e.limit]
                for entry in stalled:
                    entry.fired = True
            for entry in stalled:
                log.warning(f"{entry.what} stream idle: aborting", extra={"idle_seconds": entry.limit})
                try:
                    entry.cancel()
                except Exception:
                    log.exception("could not abort an idle upload")
