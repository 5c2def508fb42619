"""What the listing and stats calls cost when several threads of one process make them.

The server answers short reads on a few threads (GALLERY_GRPC_READ_WORKERS, 4), which share one GIL.
Each SQLite step, each contended lock and each grpcio hand-off lets the GIL go; with other threads
ready, taking it back is a futex wait and a context switch. This measures the domain calls alone
(Gallery.list_page_json and Gallery.stats on the stack's database: no gRPC, no Envoy, no token
check) on one thread and on several, in a fresh child process, so the listing section can tell the
handler's own cost from what concurrency adds to it.
"""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
from collections.abc import Callable

from gallery_server import auth
from gallery_server.db import Database
from gallery_server.service import Gallery
from gallery_server.settings import Settings
from gallery_server.storage import Storage

CALLS = 1500  # per measurement, split between the threads
WARMUP = 50  # per thread, not counted


def _measure(data_dir: str, secret: str, device: str, thread_counts: tuple[int, ...]) -> dict[str, dict[int, float]]:
    settings = Settings.from_env({"GALLERY_DATA_DIR": data_dir, "GALLERY_JWT_SECRET": secret})
    gallery = Gallery(settings, Database(settings.database_url, pool_size=max(thread_counts)),
                      Storage(settings.data_dir))
    principal = auth.Principal("bench", frozenset({device}), frozenset({auth.READ}))
    calls = {
        "list, first page (limit 50)": lambda: gallery.list_page_json(principal, device, limit=50),
        "stats": lambda: gallery.stats(principal, device),
    }
    # Measure the real work: a full page and a device with events, as the load above saw them.
    page, _ = gallery.list_page_json(principal, device, limit=50)
    if len(json.loads(page)) != 50 or not gallery.stats(principal, device).total_events:
        raise RuntimeError(f"device {device} has no full first page to measure: {page[:200]!r}")
    results: dict[str, dict[int, float]] = {}
    for name, call in calls.items():
        results[name] = {}
        for threads in thread_counts:
            spent: list[float] = []
            share = CALLS // threads
            workers = [threading.Thread(target=_run, args=(call, share, spent)) for _ in range(threads)]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
            results[name][threads] = sum(spent) / (share * threads) * 1e6
    gallery.db.dispose()
    return results


def _run(call: Callable[[], object], n: int, spent: list[float]) -> None:
    """Make `n` calls (after a warm-up) and note this thread's CPU seconds for them."""
    for _ in range(WARMUP):
        call()
    started = time.thread_time()
    for _ in range(n):
        call()
    spent.append(time.thread_time() - started)


def _child(queue: multiprocessing.Queue, *args: object) -> None:  # type: ignore[type-arg]
    try:
        queue.put(_measure(*args))  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        queue.put(exc)


def handler_cpu(data_dir: str, secret: str, device: str, thread_counts: tuple[int, ...] = (1, 4)) -> (
        dict[str, dict[int, float]]):
    """CPU µs per call of each read, by number of threads making the calls together."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_child, args=(queue, data_dir, secret, device, thread_counts))
    child.start()
    try:
        result = queue.get(timeout=300)
    finally:
        child.join(timeout=30)
    if isinstance(result, Exception):
        raise result
    return result
