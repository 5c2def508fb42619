"""What the listing and stats calls cost when several threads of one process make them.

The server answers short reads on a few threads (GALLERY_GRPC_READ_WORKERS), which share one GIL.
Each SQLite step and each contended lock lets the GIL go; with other threads ready, taking it back
means waiting for it (strace, by hand: ~2 futex calls per stats call on 2 threads, none on one).
This measures the domain calls alone (Gallery.list_page_json, with its page read each time and
kept, and Gallery.stats on the stack's database: no gRPC, no Envoy, no token check) on one thread
and on several, in a fresh child process, so the listing section can tell the handler's own cost
from what concurrency adds to it.
"""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
from collections.abc import Callable
from concurrent import futures

from gallery_server import auth
from gallery_server.db import Database
from gallery_server.service import Gallery
from gallery_server.settings import Settings
from gallery_server.storage import Storage

CALLS = 1500  # per measurement, split between the threads
WARMUP = 50  # per thread, not counted
LIST_READ = "list, first page (limit 50), read from the database"
LIST_KEPT = "list, first page (limit 50), kept"
STATS = "stats"


def _measure(data_dir: str, secret: str, device: str, thread_counts: tuple[int, ...]) -> dict[str, dict[str, float]]:
    environment = {"GALLERY_DATA_DIR": data_dir, "GALLERY_JWT_SECRET": secret}
    settings = Settings.from_env(environment)
    db = Database(settings.database_url, pool_size=max(thread_counts))
    gallery = Gallery(settings, db, Storage.from_settings(settings))
    # The same calls with no page kept: each reads its page from the database.
    reading = Gallery(Settings.from_env({**environment, "GALLERY_LIST_CACHE_BYTES": "0"}), db,
                      Storage.from_settings(settings))
    principal = auth.Principal("bench", frozenset({device}), frozenset({auth.READ}))
    calls = {
        LIST_READ: lambda: reading.list_page_json(principal, device, limit=50),
        LIST_KEPT: lambda: gallery.list_page_json(principal, device, limit=50),
        STATS: lambda: gallery.stats(principal, device),
    }
    # Measure the real work: a full page and a device with events, as the load above saw them.
    page, _ = gallery.list_page_json(principal, device, limit=50)
    if len(json.loads(page)) != 50 or not gallery.stats(principal, device).total_events:
        raise RuntimeError(f"device {device} has no full first page to measure: {page[:200]!r}")
    results: dict[str, dict[str, float]] = {}
    for name, call in calls.items():
        results[name] = {str(threads): _cpu_per_call(call, threads) for threads in thread_counts}
    db.dispose()
    return results


def _cpu_per_call(call: Callable[[], object], threads: int) -> float:
    """CPU µs per call when `threads` threads make CALLS calls together, each after a warm-up."""
    share = CALLS // threads
    spent: list[float] = []
    errors: list[BaseException] = []
    start_together = threading.Barrier(threads)

    def run() -> None:
        try:
            for _ in range(WARMUP):
                call()
            start_together.wait()
            started = time.thread_time()
            for _ in range(share):
                call()
            spent.append(time.thread_time() - started)
        except BaseException as exc:  # noqa: BLE001 - raised below: a failed thread must not pass for a cheap one
            errors.append(exc)
            start_together.abort()

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if errors:
        raise errors[0]
    return sum(spent) / (share * threads) * 1e6


def handler_cpu(data_dir: str, secret: str, device: str, thread_counts: tuple[int, ...]) -> (
        dict[str, dict[str, float]]):
    """CPU µs per call of each read, by number of threads making the calls together (keys: str(count))."""
    # A fresh interpreter, like the server's; its exceptions come back with their traceback, and a
    # child that dies raises BrokenProcessPool (a RuntimeError) rather than leaving the parent waiting.
    with futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_measure, data_dir, secret, device, thread_counts).result()
