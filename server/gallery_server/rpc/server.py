"""Assembles the gRPC server: servicer, interceptor, health and reflection, in one place."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import pathlib
import queue
import signal
import threading
import time
from concurrent import futures

import grpc
import sqlalchemy as sa
from envoy.service.auth.v3 import external_auth_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gallery.v1 import admin_pb2, admin_pb2_grpc, device_pb2, device_pb2_grpc, gallery_pb2, gallery_pb2_grpc

from .. import _malloc, identity, incoming, scrub
from ..addresses import ANY_HOST, split_address
from ..auth import Verifier
from ..db import Database, dropped
from ..devices import Devices
from ..incoming import IncomingImporter
from ..metrics import Metrics
from ..reconcile import ReconcileLoop, Reconciler
from ..resumable import ResumableUploads, SessionSweeper
from ..retention import Retention
from ..service import Gallery, background_gallery
from ..settings import Settings
from ..signed_urls import SignedUploads
from ..storage import Storage
from ..threads import thread_shares
from ..thumbnails import Thumbnailer
from .admin_servicer import AdminServicer
from .device_servicer import DeviceServicer
from .file_handoff import CHECK_METHOD, FileHandoff
from .interceptor import GalleryInterceptor
from .readiness import Readiness
from .servicer import GalleryServicer

log = logging.getLogger(__name__)

SERVICE_NAME = gallery_pb2.DESCRIPTOR.services_by_name["GalleryService"].full_name
DEVICE_SERVICE_NAME = device_pb2.DESCRIPTOR.services_by_name["DeviceService"].full_name
ADMIN_SERVICE_NAME = admin_pb2.DESCRIPTOR.services_by_name["GalleryAdminService"].full_name
HEALTH_CHECKED = ("", SERVICE_NAME, DEVICE_SERVICE_NAME, ADMIN_SERVICE_NAME)  # "": the server's
# Upload chunks are up to 1 MiB from Envoy and up to 4 MiB from native clients.
MAX_MESSAGE_BYTES = 8 << 20
# A request's header list (gRPC metadata; an event's metadata is Settings.max_metadata_bytes).
# grpc-core's defaults refuse some requests above 8 KiB and all above 16 KiB with
# RESOURCE_EXHAUSTED (a 429 that clients retry for ever), while Envoy passes up to 32 KiB
# (max_request_headers_kb): a token naming a fleet of devices is past 8 KiB. Above Envoy's limit,
# with room for the headers it adds, for native clients too.
MAX_HEADER_LIST_BYTES = 64 << 10
# The requests' database pool; with BACKGROUND_POOL_SIZE (service.py) for each of serve()'s
# background loops, a replica's count of PostgreSQL connections in the README.
DB_POOL_SIZE = 20
UPLOAD_WINDOW_BYTES = 384 << 10
PING_ANSWER_FACTOR = 6  # how many keepalive intervals a client has to answer a PING (below)
# Short reads that wait for nothing but the database (and, rarely, a fetch of the identity
# provider's keys, which auth.py lets one request wait for, not all): they run on a few threads of
# their own (GALLERY_GRPC_READ_WORKERS). Spread over the server's many threads, 16 clients' reads made
# as many threads take turns at the GIL, and each request cost ~2x the CPU (BENCHMARKS.md);
# uploads, downloads and waits keep the large pool, where a slow client may hold a thread.
QUICK_READS = tuple(
    f"/{SERVICE_NAME}/{method}"
    for method in (
        "GetDevicePaths", "GetEvent", "ListEventsJson", "GetStats", "GetSignedUploadStatus",
        "FindExistingChecksums",
    )
) + (CHECK_METHOD,)


class CannotListen(Exception):
    """An address this server must listen on is taken or not this host's."""


# A replica that starts while PostgreSQL ends its connections (a restart or failover during a
# rolling restart, an operator's pg_terminate_backend) tries its database steps again, for this
# long: the schema step is one transaction under an advisory lock, done whole or not at all, and the
# gallery id's may run twice. It exited at the first dropped connection, and no replica came back
# (black-box review, 2026-12-02).
START_RETRY_SECONDS = 60.0


def _prepare_database(db: Database, data_dir: pathlib.Path, retry_seconds: float = START_RETRY_SECONDS) -> None:
    """The schema, and the gallery id its data folder must share (identity.NotThisGallery if not)."""
    deadline = time.monotonic() + retry_seconds
    while True:
        try:
            db.create_tables()
            identity.settle(db.engine, data_dir)
            return
        except sa.exc.OperationalError as exc:
            if not dropped(exc) or time.monotonic() > deadline:
                raise
            log.warning("the database ended the connection while this server started: trying again",
                        extra={"error": " ".join(str(exc.orig).split())[:300]})
            time.sleep(1)


def create_server(
    settings: Settings, address: str, metrics: Metrics | None = None,
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """Build a ready-to-start server bound to `address` (use port 0 in tests); returns it, its
    port and its health servicer. With `metrics`, its calls and gauges are reported there."""
    storage = Storage.from_settings(settings)  # creates the data root, where SQLite lives by default
    # RPCs hold a connection only for their queries, not while streaming bytes: a pool much smaller
    # than the worker count keeps several replicas within PostgreSQL's connection limit.
    db = Database(settings.database_url, pool_size=DB_POOL_SIZE)
    _prepare_database(db, settings.data_dir)
    gallery = Gallery(settings, db, storage)
    verifier = Verifier.from_settings(settings)
    keepalive_ms = round(settings.keepalive_seconds * 1000)
    server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=settings.grpc_workers, thread_name_prefix="rpc"
        ),
        interceptors=[GalleryInterceptor(verifier, metrics=metrics, pools=dict.fromkeys(
            QUICK_READS,
            futures.ThreadPoolExecutor(settings.grpc_read_workers, thread_name_prefix="read"),
        ))],
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_metadata_size", MAX_HEADER_LIST_BYTES),
            ("grpc.absolute_max_metadata_size", MAX_HEADER_LIST_BYTES),
            # Fixed HTTP/2 receive windows of part of an upload chunk per stream. grpc-core's BDP
            # probing grows each stream's window to tens of MiB, so every upload whose handler
            # falls behind queues that much here: 16 concurrent 64 MiB uploads peaked at 755 MiB
            # RSS with it, ~200 MiB without. Whatever the window, grpc-core completes a message
            # once it has its header, so a stream waiting for its handler (receiving.py) holds
            # its next message plus this window: with 1 MiB chunks, 512 KiB took 64 concurrent
            # uploads from ~270 to ~242 MiB at the same rate as 1 MiB, while 256 KiB (~214 MiB)
            # cost ~9% of their rate and 64 KiB more (by hand, 2026-11-29, 5 interleaved rounds;
            # one upload at a time was as fast with any of 256 KiB, 512 KiB and 1 MiB). 384 KiB
            # since 2026-12-01, when twice the receive permits (settings.py) sped 64 uploads up by
            # a quarter at +5 - 10 MiB: with both, their peak was 224 - 244 MiB against 242 - 253
            # with 512 KiB, at the same rate (by hand, 2 interleaved rounds; 256 KiB: 221 - 241,
            # 4 uploads ~10% slower).
            ("grpc.http2.bdp_probe", 0),
            ("grpc.http2.lookahead_bytes", UPLOAD_WINDOW_BYTES),
            # PINGs on connections with calls open; one left unanswered closes the connection and
            # ends its calls: a device gone silent frees its commands (Settings.keepalive_seconds).
            # grpcio 1.85 waits for the answer for ping_timeout_ms, whatever keepalive_timeout_ms
            # says (tests/test_device_liveness.py), and, unlike Envoy, counts no other frame as
            # one: a client's answer queues behind the upload bytes it has already handed to its
            # kernel, up to the rest of a message and a window per stream (at most 1.4 MiB with
            # 1 MiB chunks), which a 35 KiB/s link takes up to ~45 s to send per stream. So 6x
            # (120 s by default): two or three such uploads on one connection.
            ("grpc.keepalive_time_ms", keepalive_ms),
            ("grpc.keepalive_timeout_ms", PING_ANSWER_FACTOR * keepalive_ms),
            ("grpc.http2.ping_timeout_ms", PING_ANSWER_FACTOR * keepalive_ms),
            # grpc-core stops pinging after 2 PINGs without data sent by default; a device's
            # channel between heartbeats, or an upload waiting for its client, must stay watched.
            ("grpc.http2.max_pings_without_data", 0),
            # A client's own PINGs: by default grpc-core counts one that comes less than 5 min
            # after the last, on a connection it has sent no data on, as a strike, and closes the
            # connection at the second (GOAWAY too_many_pings), which the client sees as
            # RESOURCE_EXHAUSTED without a reason: a grpc-js client with a common keepalive of
            # 10 s lost an upload waiting for its next chunk, or a pull wait, after ~50 s (Envoy
            # takes PINGs at any rate). Taken every quarter of the server's own interval or more (5 s by default).
            ("grpc.http2.min_ping_interval_without_data_ms", keepalive_ms // 4),
            ("grpc.keepalive_permit_without_calls", 1),
        ],
        maximum_concurrent_rpcs=settings.grpc_workers * 4,
    )
    devices = Devices(gallery)
    reconciler = Reconciler(gallery)
    if metrics is not None:
        _add_gauges(metrics, gallery, devices, reconciler)
    gallery_pb2_grpc.add_GalleryServiceServicer_to_server(
        GalleryServicer(gallery, SignedUploads(gallery), devices), server
    )
    device_pb2_grpc.add_DeviceServiceServicer_to_server(DeviceServicer(devices), server)
    admin_pb2_grpc.add_GalleryAdminServiceServicer_to_server(
        AdminServicer(reconciler), server
    )
    # Envoy's ext_authz asks it before a REST download (file_handoff.py); not a public API, so
    # neither health-checked nor listed by reflection.
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(FileHandoff(gallery, verifier), server)
    health_servicer = health.HealthServicer()
    for name in HEALTH_CHECKED:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, DEVICE_SERVICE_NAME, ADMIN_SERVICE_NAME, health.SERVICE_NAME,
         reflection.SERVICE_NAME),
        server,
    )
    try:
        port = server.add_insecure_port(address)
    except RuntimeError:  # grpcio's "Failed to bind", which names no cause
        port = 0
    if port == 0:
        raise CannotListen(f"GALLERY_GRPC_ADDRESS={address}: cannot listen there (another process holds the port?)")
    return server, port, health_servicer


def _add_gauges(metrics: Metrics, gallery: Gallery, devices: Devices, reconciler: Reconciler) -> None:
    """What this replica bounds, each beside its limit (an alert compares the two), and what an
    operator is paged for: the database, and what the last reconciliation found."""
    metrics.gauge("gallery_uploads_in_flight", "Uploads being received by this server.",
                  lambda: gallery.slots.in_flight)
    metrics.gauge("gallery_uploads_awaiting_first_message",
                  "Upload streams waiting for their first message; the limit counts them with those in flight.",
                  lambda: gallery.slots.awaiting_first)
    metrics.gauge("gallery_uploads_counted_by_token",
                  "Upload streams counted against their token's part of the limit (its own and its URLs' PUTs).",
                  lambda: gallery.slots.counted_by_token)
    metrics.gauge("gallery_upload_receive_permits_free",
                  "Receive permits free: upload messages this server may ask for now (receiving.py).",
                  lambda: gallery.receiving.free)
    metrics.gauge("gallery_upload_receive_permits",
                  "Upload messages this server asks for or holds at once (GALLERY_UPLOAD_MESSAGES_IN_FLIGHT).",
                  lambda: gallery.receiving.permits)
    metrics.gauge("gallery_upload_streams_waiting_for_a_permit",
                  "Upload streams waiting for a receive permit (a queue that stays long: the CPU is the bottleneck).",
                  lambda: gallery.receiving.waiting)
    metrics.gauge("gallery_uploads_limit", "Uploads this server receives at once (GALLERY_MAX_UPLOADS_TOTAL).",
                  lambda: gallery.slots.total)
    metrics.gauge("gallery_device_channels_open", "Devices' command channels open on this server.",
                  lambda: devices.channels_open)
    metrics.gauge("gallery_device_channels_limit", "Device channels this server keeps open at once.",
                  lambda: devices.max_channels)
    pages = gallery.listing.kept
    metrics.counter("gallery_listing_pages_served_kept_total",
                    "Listing pages answered as this server kept them, after a lookup of the device's version.",
                    lambda: pages.served_kept)
    metrics.counter("gallery_listing_pages_read_total", "Listing pages answered as read from the database.",
                    lambda: pages.served_read)
    metrics.counter("gallery_listing_pages_not_modified_total",
                    "Listing requests answered 304: If-None-Match named the page's current ETag.",
                    lambda: gallery.listing.not_modified)
    metrics.gauge("gallery_listing_kept_bytes", "Bytes of listing pages this server keeps (listing.py).",
                  lambda: pages.kept_bytes)
    metrics.gauge("gallery_listing_kept_bytes_limit", "Bytes of listing pages kept at most (GALLERY_LIST_CACHE_BYTES).",
                  lambda: pages.max_bytes)
    metrics.watch_free_space(gallery.settings.data_dir)
    metrics.gauge("gallery_data_min_free_bytes",
                  "The headroom (GALLERY_MIN_FREE_BYTES): below it, uploads are refused.",
                  lambda: gallery.storage.min_free_bytes)
    metrics.gauge("gallery_device_quota_bytes",
                  "Bytes of media one device may keep stored (GALLERY_MAX_DEVICE_BYTES); 0: no quota.",
                  lambda: gallery.quota.limit)
    metrics.watch_backlogs(gallery.db)
    metrics.watch_reconciliation(reconciler.last)
    metrics.watch_verification(functools.partial(scrub.last, gallery.settings.data_dir))
    metrics.watch_drop_folders(functools.partial(incoming.last_backlog, gallery.storage))


def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then stop with a grace period for RPCs in flight."""
    # Fewer malloc arenas: 64 concurrent uploads peaked near 400 MiB RSS with glibc's default and
    # 275 MiB with two (BENCHMARKS.md); see _malloc.py.
    _malloc.limit_arenas()
    metrics, stop_metrics = None, None
    if settings.metrics_address:
        # Bound first: a replica that cannot serve its metrics stops before it reports healthy.
        metrics = Metrics()
        try:
            metrics_port, stop_metrics = metrics.serve(*split_address(settings.metrics_address, ANY_HOST))
        except OSError as exc:
            raise CannotListen(f"GALLERY_METRICS_ADDRESS={settings.metrics_address}: {exc.strerror or exc}") from None
        log.info("metrics listening", extra={"address": settings.metrics_address, "port": metrics_port})
    server, port, health_servicer = create_server(settings, settings.grpc_address, metrics)
    reconciling = background_gallery(settings)
    # Health follows the database and the data folder (readiness.py): one statement a second,
    # on the reconciler's pool (one of its two connections is idle between its passes). Its first
    # pass before the first call: a replica on the wrong folder is never SERVING.
    readiness = Readiness(reconciling, health_servicer, HEALTH_CHECKED)
    readiness.run_pass()
    if metrics:
        # The probe's, not db.availability's: a statement can fail on a cut link in a way that
        # reads as the database's answer, and none fails while the database is silent.
        metrics.gauge("gallery_database_up",
                      "1 while this server's probe of the database (every second, 3 s to answer) "
                      "gets its answer, else 0.", lambda: readiness.database_up)
    server.start()
    log.info("gRPC server listening", extra={"address": settings.grpc_address, "port": port})
    # What this replica admits at once: an operator sees it without working out threads.py.
    log.info("thread shares", extra={"uploads": settings.max_uploads_total, **thread_shares(settings)._asdict()})
    Storage.from_settings(settings).warn_if_short_of_room()
    # Every replica may scan the shared drop folders: imports are idempotent (incoming.py).
    importer = IncomingImporter(background_gallery(settings))
    importer.start()
    # Every replica may sweep expired upload sessions: removal is idempotent (resumable.py).
    sweeper = SessionSweeper(ResumableUploads(background_gallery(settings)))
    sweeper.start()
    # Every replica reconciles files and rows, at start-up and then periodically: each step is
    # idempotent and spares anything younger than the grace period (reconcile.py).
    reconciler = ReconcileLoop(Reconciler(reconciling), settings.reconcile_interval_seconds)
    reconciler.start()
    # Every replica may delete events past the retention: each is deleted once (retention.py).
    retention = None
    if settings.retention_days:
        retention = Retention(background_gallery(settings), settings.retention_days)
        retention.start()
    # Every replica may also make missing thumbnails: events are claimed one at a time (thumbnails.py).
    thumbnailer = None
    if settings.make_thumbnails:
        thumbnailer = Thumbnailer(background_gallery(settings))
        thumbnailer.start()
    readiness.start()
    signals: queue.SimpleQueue[int] = queue.SimpleQueue()

    def stop(signum: int, _frame: object) -> None:
        log.info("stopping", extra={"signal": signal.Signals(signum).name})
        signals.put(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signals.get()
    if settings.drain_seconds:
        # Other replicas take the new calls once Envoy's health check has seen NOT_SERVING;
        # until then this one answers them all (a stop at once refused them: 503). A second
        # signal ends the drain.
        health_servicer.enter_graceful_shutdown()
        log.info("draining", extra={"seconds": settings.drain_seconds})
        with contextlib.suppress(queue.Empty):
            signals.get(timeout=settings.drain_seconds)
    # All told at once, then waited for LOOPS_STOP_SECONDS in all, not for ever: a database that
    # stopped answering holds a statement as long as TCP does (minutes), and the loops' threads
    # are daemons. Each step of theirs is safe to cut (a thumbnail's claim is taken again after
    # its lease, an import or a reconciliation is done again); the readiness probe is never
    # waited for.
    loops = [loop for loop in (readiness, importer, sweeper, reconciler, retention, thumbnailer) if loop]
    for loop in loops:
        loop.ask_to_stop()
    deadline = time.monotonic() + LOOPS_STOP_SECONDS
    for loop in loops:
        loop.stop(timeout=max(0.0, deadline - time.monotonic()))
    # The metrics port is let go as the gRPC one is (stop() lets go of it at once), not once the
    # last call has ended: a replacement started as soon as the gRPC port was free failed on the
    # metrics address.
    if stop_metrics is not None:
        stop_metrics()
    server.stop(grace=10).wait()
    _exit_even_if_calls_hang()


STUCK_CALLS_SECONDS = 5.0
LOOPS_STOP_SECONDS = 5.0


def _exit_even_if_calls_hang() -> None:
    """Exit even if handlers are still in a call once the grace is over: a statement to a
    database that stopped answering waits as long as TCP does, and the interpreter joins the gRPC
    pools' threads at exit, so a replica told to stop stayed up for minutes (for ever behind a
    relay that kept the connection). Their calls were cancelled already; the process exits
    STUCK_CALLS_SECONDS after this, unless it has exited by itself."""

    def leave() -> None:
        log.warning("stopped with calls still waiting (for the database?): exiting without them")
        logging.shutdown()
        os._exit(0)

    watchdog = threading.Timer(STUCK_CALLS_SECONDS, leave)
    watchdog.daemon = True  # gone with the process when nothing hangs
    watchdog.start()
