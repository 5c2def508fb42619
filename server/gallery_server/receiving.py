"""A bound, per replica, on the upload messages held in Python at once (ReceivePermits).

Why: every upload stream's handler asks gRPC for its next message as soon as it has written the
last one. With many streams at once, each holds a received message (1 MiB from Envoy, up to 4 MiB
from native clients, and its copies: the serialized bytes, the chunk field) in Python while gRPC
refills that stream's HTTP/2 window behind it, and dozens of handler threads take turns at the GIL
to do the same small amount of work each: 64 concurrent uploads of 64 MiB peaked near 380 MiB of
server RSS. With a permit needed before asking for a message, a stream without one keeps only what
grpc-core buffers for it (the next message, which grpc-core completes once it has its header, and
its HTTP/2 window behind it, UPLOAD_WINDOW_BYTES in rpc/server.py: ~1.4 MiB per parked stream with
1 MiB messages), and only `permits` handler threads work on messages at once: memory is
streams x (message + window) + permits x (message and its copies), whatever the number of threads.

Which wait the permit covers, and why: a gRPC request iterator's next() both waits for the client
and receives, and the message it returns is the memory to bound, so the permit is taken before
next() and given back once the message is consumed (the handler asks for the next one). A permit
held by a stream waiting on its client, or by a handler blocked between messages (a resumable
write waiting for its session's lock, a slow commit), would make every other upload wait for it:
so a stream that has held a permit for LEND_AFTER_SECONDS while others wait loses it to them (it
is "lent"). A message that arrives after its stream's permit was lent waits for a permit in
Python, ahead of the streams that have none (only a permit frees that memory), in arrival order;
slow streams may so hold one message each beyond the bound, and a silent or blocked one delays the
others by LEND_AFTER_SECONDS once, not for as long as it stays so. Otherwise permits go first
come, first served (a stream that gives one back goes behind the streams already waiting), so no
stream is starved.

The wait for a permit is no client idleness: IdleWatchdog counts only the time inside next(). A
stream whose RPC ends (cancelled by its client or by the idle watchdog) stops waiting at once and
gives back its permit, through `on_end` (a gRPC context's add_callback), even if its handler has
not unwound yet.

Malloc: while streams queue for permits, messages are freed by many threads in an order no
allocator predicts, and glibc keeps the holes resident; the thread that lends permits also returns
them to the OS (_malloc.trim) every TRIM_EVERY_SECONDS. Measured with 64 uploads of 64 MiB at once:
~15-20 MiB off the server's peak RSS, for ~0.3 s more server CPU per GB (pages faulted in again).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from . import _malloc

log = logging.getLogger(__name__)
T = TypeVar("T")

# How long a stream may keep a permit others are waiting for (waiting on its client, or blocked
# between messages) before it is lent to them. Longer than a message already buffered in
# grpc-core takes to come out of next() on a busy server (a permit lent then costs one message
# held in Python), short next to an upload's duration.
LEND_AFTER_SECONDS = 0.1
# A trim itself costs a few ms with a heap of a few hundred MiB; the memory it returns is faulted in
# again by the next messages, which is most of its cost (see the module docstring).
TRIM_EVERY_SECONDS = 0.5


@dataclasses.dataclass(eq=False)
class _Stream:
    """One upload stream's standing with its ReceivePermits (changed under the permits' lock)."""

    wake: threading.Event = dataclasses.field(default_factory=threading.Event)  # set: holds or ended
    holds: bool = False
    # Monotonic time its thread took up its permit; infinite from the moment it is handed one while
    # asleep until its thread runs: a permit not yet taken up is never lent away (its thread
    # would wake holding nothing, in no queue, and wait forever).
    held_since: float = 0.0
    ended: bool = False  # its RPC is over: it waits for nothing any more


class ReceivePermits:
    """At most `permits` upload messages asked for or held in Python at once, in this replica."""

    def __init__(self, permits: int, *, lend_after: float = LEND_AFTER_SECONDS) -> None:
        if permits < 1:
            raise ValueError("permits must be at least 1")
        self.permits = permits
        self.lend_after = lend_after
        self._lock = threading.Lock()
        self._free = permits
        self._waiting: collections.deque[_Stream] = collections.deque()
        # Streams holding a message that arrived after their permit was lent: served first.
        self._returning: collections.deque[_Stream] = collections.deque()
        self._holders: set[_Stream] = set()
        self.lent = 0  # permits taken from streams that kept them too long, since start
        self._contended = threading.Event()  # set while streams wait for a permit
        self._lender: threading.Thread | None = None

    @property
    def free(self) -> int:
        return self._free

    @property
    def waiting(self) -> int:
        return len(self._waiting) + len(self._returning)

    def bounded(
        self, messages: Iterator[T], *, on_end: Callable[[Callable[[], None]], object] | None = None,
    ) -> Iterator[T]:
        """`messages`, each asked for under a permit that is given back when the consumer asks
        for the next one (or stops). `on_end(callback)`: registers `callback` to run when the
        stream's RPC ends; a false answer means it has ended already."""
        stream = _Stream()
        if on_end is not None and not on_end(lambda: self._end(stream)):
            stream.ended = True
        try:
            while True:
                self._acquire(stream)
                try:
                    message = next(messages)
                except StopIteration:
                    return
                # At once, unless the permit was lent while the client was slow.
                self._acquire(stream, holding_message=True)
                yield message
                del message  # not held without a permit
                # Back after every message, not after a few: the stream's next message is still
                # on its way (its window was just refilled), while the stream at the head of the
                # queue has one buffered. Keeping the permit for 8 messages at a time halved the
                # 64-stream throughput (the holders waited on Envoy instead of working).
                self._release(stream)
        finally:
            self._end(stream)

    def _acquire(self, stream: _Stream, *, holding_message: bool = False) -> None:
        """Wait for a permit; return without one if the RPC ended, so that the transport reports
        the end. First come, first served, except that streams holding a message already (their
        permit was lent while they waited on their client) go first, in arrival order: only a
        permit frees that memory."""
        with self._lock:
            if stream.holds or stream.ended:
                return
            if self._free and not self.waiting:
                self._free -= 1
                self._grant(stream, time.monotonic())
                return
            (self._returning if holding_message else self._waiting).append(stream)
            self._contended.set()
            if self._lender is None:
                self._lender = threading.Thread(target=self._lend, name="upload-permits", daemon=True)
                self._lender.start()
        while True:
            with self._lock:
                if stream.holds:
                    stream.held_since = time.monotonic()  # from now on, lent if it stalls
                    return
                if stream.ended:
                    return
                stream.wake.clear()
            stream.wake.wait()

    def _lend(self) -> None:
        """One thread per replica lends the permits of stalled holders, and trims malloc's free
        memory, only while streams wait: no waiter wakes up on a timer (dozens of timers would
        keep taking the GIL)."""
        trimmed = time.monotonic()
        while True:
            self._contended.wait()
            time.sleep(self.lend_after / 2)
            try:
                self._lend_stalled()
                if time.monotonic() - trimmed >= TRIM_EVERY_SECONDS:
                    _malloc.trim()
                    trimmed = time.monotonic()
            except Exception:  # noqa: BLE001 - this thread must outlive any one failure
                log.exception("upload permits: lending failed")

    def _lend_stalled(self) -> None:
        """Hand the permits held for lend_after or longer to waiting streams."""
        now = time.monotonic()
        with self._lock:
            for holder in list(self._holders):
                if not self.waiting:
                    break
                if now - holder.held_since >= self.lend_after:
                    self._take(holder)
                    self.lent += 1
                    self._hand_on()
            if not self.waiting:
                self._contended.clear()

    def _release(self, stream: _Stream) -> None:
        with self._lock:
            if stream.holds:
                self._take(stream)
                self._hand_on()

    def _end(self, stream: _Stream) -> None:
        """The stream is over (its RPC ended, or its consumer stopped): never waits again, and its
        permit, if any, goes on. Safe to call more than once, from any thread."""
        with self._lock:
            stream.ended = True
            for queue in (self._waiting, self._returning):
                if stream in queue:
                    queue.remove(stream)
            if stream.holds:
                self._take(stream)
                self._hand_on()
        stream.wake.set()

    def _grant(self, stream: _Stream, taken_up: float = math.inf) -> None:
        """(The lock is held.) `taken_up`: now, if the stream's own thread is the caller."""
        stream.holds = True
        stream.held_since = taken_up
        self._holders.add(stream)

    def _take(self, stream: _Stream) -> None:
        """(The lock is held.)"""
        stream.holds = False
        self._holders.discard(stream)

    def _hand_on(self) -> None:
        """A permit was given back (the lock is held): to a stream holding a message already, else
        to the longest-waiting stream, if any."""
        queue = self._returning or self._waiting
        if queue:
            successor = queue.popleft()
            self._grant(successor)
            successor.wake.set()
        else:
            self._free += 1
