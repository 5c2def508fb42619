"""The loop every background worker of a replica runs (incoming importer, thumbnailer, session
sweeper, reconciler, retention, readiness check): a daemon thread repeating one pass, surviving
any error in it, stopped by stop()."""

from __future__ import annotations

import logging
import threading

from .errors import DatabaseUnavailable, Exhausted
from .storage import INSUFFICIENT_STORAGE

log = logging.getLogger(__name__)


class BackgroundLoop:
    """Subclasses implement run_pass(); tests call their one-pass methods directly."""

    thread_name = "background"

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def run_pass(self) -> bool:
        """One pass; True when more work may be waiting (the loop then goes on without sleeping)."""
        raise NotImplementedError

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def ask_to_stop(self) -> None:
        """End after the pass in hand; stop() waits for that."""
        self._stopping.set()

    def stop(self, timeout: float | None = None) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        log.info("background worker started", extra={"worker": self.thread_name})
        failures = 0  # passes failed in a row
        waiting = ""  # what for, said once
        while not self._stopping.is_set():
            try:
                busy = self.run_pass()
            except (DatabaseUnavailable, Exhausted) as exc:
                failures += 1
                busy = False
                if isinstance(exc, Exhausted) and exc.reason != INSUFFICIENT_STORAGE:
                    log.exception("background pass failed", extra={"worker": self.thread_name, "failures": failures})
                else:
                    # Waits on what is not this worker's fault: the database (db.py says why, once
                    # a minute) or a disk at its headroom (storage.py says so, once a minute). This
                    # worker says it waits, once for each, where a traceback came at every pass.
                    what = ("for the database" if isinstance(exc, DatabaseUnavailable)
                            else f"for room on the disk: {exc.message}")
                    if what != waiting:
                        waiting = what
                        log.warning(f"background worker waits {what}", extra={"worker": self.thread_name})
            except Exception:  # one failed pass must not end the worker
                failures += 1
                log.exception("background pass failed", extra={"worker": self.thread_name, "failures": failures})
                busy = False
            else:
                if failures:
                    log.info("background worker recovered",
                             extra={"worker": self.thread_name, "failed_passes": failures})
                failures, waiting = 0, ""
            if not busy:
                self._stopping.wait(retry_delay(self.interval, failures))


# A pass that keeps failing is retried later and later, up to this: a thumbnailer every 0.5 s
# during a database outage wrote two ERROR lines a second per replica, and retried as often.
MAX_RETRY_SECONDS = 60.0


def retry_delay(interval: float, failures: int) -> float:
    """The wait before the next pass: `interval`, doubled for each pass failed in a row, up to
    MAX_RETRY_SECONDS (never below `interval`)."""
    if not failures:
        return interval
    return max(interval, min(MAX_RETRY_SECONDS, interval * 2 ** min(failures, 16)))
