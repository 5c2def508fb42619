"""Whether this replica should be sent calls: its gRPC health, which Envoy checks every second,
follows what the replica can reach. It reports NOT_SERVING while

* it cannot reach the database, probed every PROBE_SECONDS, or the probe has
  had no answer for PROBE_TIMEOUT_SECONDS (a link that drops packets rather than connections: a
  probe waited for ever, SERVING, and held up the replica's stop): a replica cut off from a
  database the others still reach failed a third of all calls for as long as it lasted;
* its data folder holds none of the stored media the database names, of up to 1,000 looked at
  (Gallery.stored_media_found, every STORAGE_CHECK_SECONDS): a replica whose shared volume did not
  mount acknowledged uploads that no other replica could read, and answered the others'
  downloads with MEDIA_MISSING.

Envoy then sends the calls to the other replicas. When none is SERVING (the database down for
all), its panic mode sends them to all, and each answers as it can (503 DATABASE_UNAVAILABLE).
"""

from __future__ import annotations

import logging
import threading
import time

from grpc_health.v1 import health, health_pb2

from ..background import BackgroundLoop
from ..errors import DatabaseUnavailable
from ..service import Gallery

log = logging.getLogger(__name__)

PROBE_SECONDS = 1.0  # as often as Envoy checks
PROBE_TIMEOUT_SECONDS = 3.0
STORAGE_CHECK_SECONDS = 30.0

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Readiness(BackgroundLoop):
    """Sets `services`' health on `health_servicer` from the database and the data folder; a
    graceful shutdown's NOT_SERVING (HealthServicer.enter_graceful_shutdown) is never undone."""

    thread_name = "readiness"

    def __init__(self, gallery: Gallery, health_servicer: health.HealthServicer,
                 services: tuple[str, ...]) -> None:
        super().__init__(PROBE_SECONDS)
        self.gallery = gallery
        self.health_servicer = health_servicer
        self.services = services
        self.storage_ok = True
        # The probe's own outcome, not db.availability's: another thread's statement that fails
        # in a way the database seems to have answered marks that "up" (a cut link flipped the
        # replica back to SERVING for a second, and an upload sent there failed).
        self.database_ok = True
        # The last pass's view (gallery_database_up): the ping answered, and the database with
        # it. A silent database fails no statement, so no request's failure would say it; a slow
        # look at the data folder (after the ping, on the same thread) is not the database's.
        self.database_up = True
        self._storage_checked = -float("inf")  # time.monotonic()
        self.serving = True
        self.probe: threading.Thread | None = None
        self.pinged = threading.Event()  # the current probe's ping has its answer

    def run_pass(self) -> bool:
        # On a thread of its own, waited for PROBE_TIMEOUT_SECONDS at most: a statement to a
        # database that does not answer waits as long as TCP does (minutes), and so may a look at
        # a data folder whose mount hangs.
        if self.probe is None or not self.probe.is_alive():
            self.pinged = threading.Event()
            self.probe = threading.Thread(target=self._probe, args=(self.pinged,), name="readiness-probe",
                                          daemon=True)
            self.probe.start()
        self.probe.join(PROBE_TIMEOUT_SECONDS)
        answering = self.pinged.is_set()
        self.database_up = answering and self.database_ok
        self._report(self.database_up and self.storage_ok and not self.probe.is_alive(), answering)
        return False

    def _probe(self, pinged: threading.Event) -> None:
        try:
            self.gallery.db.ping()
        except DatabaseUnavailable:
            self.database_ok = False  # db.availability has it, and says so in the log
            return
        except Exception:  # the next probe tries again
            self.database_ok = False
            log.exception("readiness probe failed")
            return
        finally:
            pinged.set()
        self.database_ok = True
        try:
            if time.monotonic() - self._storage_checked >= STORAGE_CHECK_SECONDS:
                self._check_storage()
        except DatabaseUnavailable:
            self.database_ok = False
        except Exception:
            log.exception("readiness probe failed")

    def _check_storage(self) -> None:
        found = self.gallery.stored_media_found()
        self._storage_checked = time.monotonic()
        if found != self.storage_ok:
            if found:
                log.warning("data folder holds the stored media again",
                            extra={"data_dir": str(self.gallery.settings.data_dir)})
            else:
                log.error(
                    "data folder holds none of the stored media the database names: reporting "
                    "NOT_SERVING until it does (is GALLERY_DATA_DIR the shared volume, mounted?)",
                    extra={"data_dir": str(self.gallery.settings.data_dir)},
                )
        self.storage_ok = found

    def _report(self, serving: bool, answering: bool) -> None:
        if serving == self.serving:
            return
        self.serving = serving
        log.log(logging.INFO if serving else logging.WARNING,
                "health: SERVING" if serving else "health: NOT_SERVING",
                extra={"database_ok": self.database_ok, "database_answering": answering,
                       "data_folder_ok": self.storage_ok,
                       "probe_finished": self.probe is not None and not self.probe.is_alive()})
        for name in self.services:
            self.health_servicer.set(name, SERVING if serving else NOT_SERVING)
