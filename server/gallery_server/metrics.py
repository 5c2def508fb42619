"""Prometheus metrics of one server process, served on GALLERY_METRICS_ADDRESS (off by default).

Calls are counted under the names and labels of the gRPC ecosystem's server metrics
(`grpc_server_started_total`, `grpc_server_handled_total`, `grpc_server_handling_seconds`, as
go-grpc-prometheus and its dashboards have them), REST calls included, since Envoy turns each into
a gRPC call (README "Metrics" names what is not counted: calls grpcio refuses before a handler
runs, Envoy's own answers), and error answers by their ErrorInfo reason (`gallery_refused_total`).
Beside them, what this server bounds and an operator watches: uploads in flight and
device channels open, each with its limit, and the data root's free space. Envoy's own figures (per
route, per upstream, the transcoder's) are on its admin port, at /stats/prometheus.

Each replica serves its own; nothing here is shared between processes.
"""

from __future__ import annotations

import datetime
import functools
import logging
import math
import os
import pathlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, TypeVar

import prometheus_client
import sqlalchemy
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from . import devices, thumbnails, version
from .errors import DatabaseUnavailable

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from .db import Database
    from .incoming import DropBacklog
    from .reconcile import Findings
    from .scrub import Totals

Run = TypeVar("Run")  # a status file's result: a reconciliation's findings, a verification's totals, a backlog

# A counter's `_created` twin doubles every scrape and says nothing its reset to 0 does not.
prometheus_client.disable_created_metrics()

# From a remembered token's read (~1 ms) to a long upload or a device's channel (hours).
HANDLING_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 7200,
)
# grpc_type, by whether the request and the answer are streams.
CALL_TYPES = {
    (False, False): "unary", (True, False): "client_stream",
    (False, True): "server_stream", (True, True): "bidi_stream",
}


def code_label(code_name: str) -> str:
    """A gRPC status code as the ecosystem's metrics write it (Go's codes.Code.String():
    `InvalidArgument`, `Canceled`), from grpcio's name of it (`INVALID_ARGUMENT`, `CANCELLED`)."""
    if code_name == "OK":
        return "OK"
    if code_name == "CANCELLED":
        return "Canceled"
    return "".join(word.capitalize() for word in code_name.split("_"))


class Metrics:
    """One process's registry: the interceptor reports each call, the server adds its gauges."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # The process's memory (README's budget), CPU, descriptors and start time, and which
        # version runs: what every Prometheus client process exports by default.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        Info("gallery_build", "The gallery server's version.", registry=self.registry).info({"version": version()})
        labels = ("grpc_type", "grpc_service", "grpc_method")
        self._started = Counter(
            "grpc_server_started", "Calls started on the server.", labels, registry=self.registry,
        )
        self._handled = Counter(
            "grpc_server_handled", "Calls finished on the server, by gRPC status code.",
            (*labels, "grpc_code"), registry=self.registry,
        )
        self._handling = Histogram(
            "grpc_server_handling_seconds", "Time from a call's start to its end, streams included.",
            labels, buckets=HANDLING_BUCKETS, registry=self.registry,
        )
        # What a status code lumps together (RESOURCE_EXHAUSTED: too many uploads, a full disk, a
        # device at its quota) told apart by the answer's ErrorInfo reason: one of the server's
        # own constants, never a client's text, so the labels stay few.
        self._refused = Counter(
            "gallery_refused", "Calls answered with an error, by the reason of its ErrorInfo.",
            ("grpc_service", "grpc_method", "reason"), registry=self.registry,
        )

    def call_started(self, call_type: str, method: str) -> None:
        self._started.labels(call_type, *_service_and_method(method)).inc()

    def call_finished(self, call_type: str, method: str, code_name: str, seconds: float, reason: str = "") -> None:
        service, name = _service_and_method(method)
        self._handled.labels(call_type, service, name, code_label(code_name)).inc()
        self._handling.labels(call_type, service, name).observe(seconds)
        if reason:
            self._refused.labels(service, name, reason).inc()

    def gauge(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """A figure read when scraped, from what already counts it."""
        Gauge(name, documentation, registry=self.registry).set_function(read)

    def counter(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """A count that only grows (`name` ends in _total), read when scraped from what counts it."""
        self.registry.register(_ReadCounter(name.removesuffix("_total"), documentation, read))

    def watch_backlogs(self, db: Database) -> None:
        """The queues every replica shares, counted in the database (a range of an index each) when
        scraped, within a bounded wait: NaN while it does not answer, and the other figures are
        served all the same."""
        counts = _DatabaseCounts(db, {"gallery_thumbnails_pending": thumbnails.backlog,
                                      "gallery_pulls_open": devices.open_pulls})
        self.gauge("gallery_thumbnails_pending", "Stored events waiting for the thumbnail the server makes.",
                   functools.partial(counts.value, "gallery_thumbnails_pending"))
        self.gauge("gallery_pulls_open", "Pulls asked of devices, not yet uploaded, failed or expired.",
                   functools.partial(counts.value, "gallery_pulls_open"))

    def watch_free_space(self, data_dir: pathlib.Path) -> None:
        def free() -> float:
            try:
                st = os.statvfs(data_dir)
            except OSError:  # NaN, rather than a failed scrape of every other figure
                return math.nan
            return st.f_bavail * st.f_frsize

        self.gauge("gallery_data_free_bytes", "Bytes free for the server on the data root's filesystem.", free)

    def watch_reconciliation(self, last: Callable[[], Findings | None]) -> None:
        """What the last reconciliation of any replica found (its status file, read at each
        scrape): an alert on missing or damaged media needs no log rule. NaN before any pass."""
        self._watch_last(last, {
            "gallery_reconcile_last_finished_timestamp_seconds": (
                "When the last reconciliation finished (Unix time): an old one means none runs.",
                lambda run: _unix_time(run.finished)),
            "gallery_reconcile_missing_media": (
                "Stored events whose media file the last reconciliation found missing.",
                lambda run: run.missing_media),
            "gallery_reconcile_size_mismatch": (
                "Stored events whose media file the last reconciliation found of another size.",
                lambda run: run.size_mismatch),
        })

    def watch_verification(self, last: Callable[[], Totals | None]) -> None:
        """What the last whole `gallery verify` found (its status file, read at each scrape), as
        for the reconciliation. NaN before the first."""
        self._watch_last(last, {
            "gallery_verify_last_finished_timestamp_seconds": (
                "When the last whole `gallery verify` finished (Unix time).",
                lambda run: _unix_time(run.finished)),
            "gallery_verify_damaged": (
                "Stored media files the last whole `gallery verify` found of other bytes or size, or unreadable.",
                lambda run: run.damaged),
            "gallery_verify_missing": (
                "Stored events whose media file the last whole `gallery verify` found missing.",
                lambda run: run.missing),
        })

    def watch_drop_folders(self, last: Callable[[], DropBacklog | None]) -> None:
        """What the last scan of the drop folders left in them (its status file, read at each
        scrape). NaN before the first scan; the oldest file's time is NaN when none waits."""
        self._watch_last(last, {
            "gallery_incoming_files_waiting": (
                "Files the last scan left in the drop folders (being written, waiting for room or media, failing).",
                lambda backlog: backlog.files),
            "gallery_incoming_bytes_waiting": (
                "Bytes of the files the last scan left in the drop folders.",
                lambda backlog: backlog.bytes),
            "gallery_incoming_oldest_waiting_timestamp_seconds": (
                "When the oldest file left in the drop folders arrived (Unix time, ctime): an old one is stuck.",
                lambda backlog: _unix_time(backlog.oldest)),
            "gallery_incoming_last_scan_timestamp_seconds": (
                "When that scan ended (Unix time; rewritten at least once a minute while scans run).",
                lambda backlog: _unix_time(backlog.scanned)),
        })

    def _watch_last(
        self, last: Callable[[], Run | None], figures: dict[str, tuple[str, Callable[[Run], float]]],
    ) -> None:
        for name, (documentation, figure) in figures.items():
            self.gauge(name, documentation, functools.partial(_of_last, last, figure))

    def serve(self, host: str, port: int) -> tuple[int, Callable[[], None]]:
        """Serve the metrics on host:port (0: any free port), at /metrics and every other path;
        returns the port and what stops it."""
        server, thread = prometheus_client.start_http_server(port, host, registry=self.registry)

        def stop() -> None:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)

        return server.server_port, stop


class _DatabaseCounts:
    """Counts read from the database on a thread of their own, for the scrape. A scrape must
    answer within its timeout (Prometheus's default: 10 s) even when the database does not (a new
    connection to a silent one waits 10 s, db.py): each waits at most READ_WAIT_SECONDS for a read
    it started, then serves the last counts (NaN before the first, and for a read that failed); a
    scrape waits once for a read that hangs. The gauges of one scrape share one read."""

    READ_WAIT_SECONDS = 1.0
    FRESH_SECONDS = 0.25  # long enough for one scrape's gauges to share a read

    def __init__(self, db: Database, counts: dict[str, Callable[[Database], int]]) -> None:
        self.db = db
        self.counts = counts
        self._lock = threading.Lock()
        self._values: dict[str, float] = {}
        self._read = threading.Event()
        self._read.set()
        self._read_at = -math.inf
        self._waited_for: threading.Event | None = None

    def value(self, name: str) -> float:
        with self._lock:
            read = self._read
            if read.is_set() and time.monotonic() - self._read_at >= self.FRESH_SECONDS:
                read = self._read = threading.Event()
                threading.Thread(target=self._count, args=(read,), name="metrics-counts", daemon=True).start()
            waited_for = self._waited_for
        if read is not waited_for and not read.wait(self.READ_WAIT_SECONDS):
            with self._lock:
                self._waited_for = read  # a read that hangs holds up one gauge, not every one
        with self._lock:
            return self._values.get(name, math.nan)

    def _count(self, done: threading.Event) -> None:
        values = {}
        try:
            for name, count in self.counts.items():
                try:
                    values[name] = float(count(self.db))
                except (DatabaseUnavailable, sqlalchemy.exc.SQLAlchemyError):
                    values[name] = math.nan
                except Exception:  # a count's own fault: its gauge is unknown, the others are read
                    log.exception("metrics count failed", extra={"gauge": name})
                    values[name] = math.nan
            with self._lock:
                self._values, self._read_at = values, time.monotonic()
        finally:
            done.set()  # else no read would ever start again (value() waits for this one)


class _ReadCounter(Collector):
    """A counter whose value something else keeps (prometheus_client's Counter keeps its own)."""

    def __init__(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        self.name, self.documentation, self.read = name, documentation, read

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.name, self.documentation, value=self.read())

    def describe(self) -> Iterator[CounterMetricFamily]:  # registered by name, without a scrape
        yield CounterMetricFamily(self.name, self.documentation)


def _unix_time(rfc3339: str) -> float:
    return datetime.datetime.fromisoformat(rfc3339).timestamp() if rfc3339 else math.nan


def _of_last(last: Callable[[], Run | None], figure: Callable[[Run], float]) -> float:
    run = last()
    try:
        return math.nan if run is None else float(figure(run))
    except (TypeError, ValueError):  # a status file someone else wrote: NaN, not a failed scrape
        return math.nan


def _service_and_method(method: str) -> tuple[str, str]:
    """("gallery.v1.GalleryService", "ListEvents") of "/gallery.v1.GalleryService/ListEvents"."""
    service, _, name = method.lstrip("/").rpartition("/")
    return service, name
