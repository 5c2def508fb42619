"""How a server's threads (GALLERY_GRPC_WORKERS) are shared between the calls that hold one for
long: each upload, device channel, waiting pull and native download holds a thread for as long as
its client takes, so each kind gets a share, past which it is refused (429) rather than left to
take the threads every other call needs.

Uploads take GALLERY_MAX_UPLOADS_TOTAL (uploads.UploadSlots). Of the threads they leave:

* device channels at most half (CHANNELS_SHARE): a fleet's devices each keep one open;
* waiting pulls an eighth (PULL_WAITS_SHARE);
* native downloads an eighth (DOWNLOADS_SHARE): a client that stops reading leaves its handler
  blocked in a send (IdleWatchdog.watch_sends ends it after GALLERY_DOWNLOAD_IDLE_SECONDS);
* channels awaiting their hello an eighth (HELLOS_SHARE);

and the last eighth serves every other call, all of them short (the short reads have a pool of
their own). Most REST downloads hold no thread: Envoy sends the file (file_handoff.py).

Within a share, each token may hold only its part (grant_share, counted by token: Holds.held_for),
where its calls are counted before they name a device (an upload awaiting its first message, a
channel its hello) or whatever device they name (a download): else any valid token, a read-only
one of a single device included, could hold a whole share and refuse every other device.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Hashable, Iterator
from typing import TYPE_CHECKING, NamedTuple

from .settings import Settings

if TYPE_CHECKING:
    from .auth import Principal

CHANNELS_SHARE = 2
PULL_WAITS_SHARE = 8
DOWNLOADS_SHARE = 8
HELLOS_SHARE = 8


class ThreadShares(NamedTuple):
    channels: int
    pull_waits: int
    downloads: int
    hellos: int


def thread_shares(settings: Settings) -> ThreadShares:
    left = max(0, settings.grpc_workers - settings.max_uploads_total)

    def share(part: int) -> int:
        return max(1, left // part)

    return ThreadShares(share(CHANNELS_SHARE), share(PULL_WAITS_SHARE), share(DOWNLOADS_SHARE),
                        share(HELLOS_SHARE))


def grant_share(granted: int | None, per_device: int, total: int) -> int:
    """How much of a `total` one token may hold at once, by its grant (Principal.granted):
    `per_device` for each device it grants, and never more than half the total (a token for
    every device, `granted` None, half)."""
    half = max(1, total // 2)
    return half if granted is None else max(1, min(per_device * granted, half))


class Holds:
    """Per-key counts of something each holding a server thread, with per-key and total limits
    (one process's: the threads are the process's own)."""

    def __init__(self, per_key: int, total: int) -> None:
        self.per_key, self.total = per_key, total
        self._lock = threading.Lock()
        self._held: dict[Hashable, int] = {}

    def take(self, key: Hashable, limit: int | None = None) -> bool:
        """One more for `key`, unless it holds `limit` (per_key if None) or all hold `total`."""
        with self._lock:
            held = self._held.get(key, 0)
            if held >= (self.per_key if limit is None else limit) or sum(self._held.values()) >= self.total:
                return False
            self._held[key] = held + 1
            return True

    @contextlib.contextmanager
    def held_for(self, principal: Principal, refusal: Callable[[int, int], Exception]) -> Iterator[None]:
        """Around one hold of `principal`'s token, up to its part (grant_share, `per_key` for each
        device it grants); past that or the total, `refusal(its part, the limit reached)` is
        raised."""
        limit = grant_share(principal.granted, self.per_key, self.total)
        if not self.take(principal.holder, limit):
            raise refusal(limit, limit if self._held.get(principal.holder, 0) >= limit else self.total)
        try:
            yield
        finally:
            self.give_back(principal.holder)

    def give_back(self, key: Hashable) -> None:
        with self._lock:
            left = self._held[key] - 1
            if left:
                self._held[key] = left
            else:
                del self._held[key]
