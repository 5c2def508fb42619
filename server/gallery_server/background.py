"""The loop every background worker of a replica runs (incoming importer, thumbnailer, session
sweeper): a daemon thread repeating one pass, surviving any error in it, stopped by stop()."""

from __future__ import annotations

import logging
import threading

from .errors import DatabaseUnavailable

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

    def stop(self, timeout: float | None = None) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        log.info("background worker started", extra={"worker": self.thread_name})
        while not self._stopping.is_set():
            try:
                busy = self.run_pass()
            except DatabaseUnavailable:  # db.py logged why; no traceback per pass during an outage
                log.error("background pass failed: the database is unavailable",
                          extra={"worker": self.thread_name})
                busy = False
            except Exception:  # one failed pass must not end the worker
                log.exception("background pass failed", extra={"worker": self.thread_name})
                busy = False
            if not busy:
                self._stopping.wait(self.interval)
