"""Scenarios: listing and stats on a device with 1,000,000 events, and the small-request rate.

The events are seeded straight into the stack's SQLite file with executemany (uploads would take
hours); the triggers that keep the stats counters (server/gallery_server/models.py) run for every
seeded row as they do for uploads. Where GALLERY_BENCH_POSTGRES_URL names a PostgreSQL server, the
same events are also copied into a second stack on it (bench/_postgres.py), and the target requests
alternate between the two stacks. Load comes from bench/_loadgen.py: 16 keep-alive HTTP/1.1
connections to Envoy, each sending its next request when the previous answer is complete.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

import _contention
import _loadgen
import _postgres
import psycopg
from _common import JWT_SECRET, SEEDED_STACK_ENV, Bench, BenchError, Section, cpu_now, md_table, median, text_table
from _floor import FloorStack

from gallery_server import paging, storage
from gallery_server.settings import Settings

BIG_DEVICE = "bench-1m"
SMALL_DEVICE = "bench-1k"
EVENT_DEVICE = "bench-event"  # one uploaded event with a thumbnail: the small-request reads of one event
CONNECTIONS = 16
FLOOR_PATHS = "floor: GET .../paths via the same Envoy, constant grpcio handler"
FLOOR_STATS = "floor: GET .../stats via the same Envoy, constant grpcio handler"
FLOOR_STATS_AIO = "floor: GET .../stats via an identical Envoy, constant grpc.aio handler"
P50_MS, P99_MS = 5.0, 20.0
# The first page asked for again and again, as a page left open or polled is: served as kept
# (server/gallery_server/listing.py, PageCache) after one lookup of the device's listing version.
LIST_KEPT = "list, first page (limit 50), asked for again: kept"
# The same page polled by a client that holds it (a browser's cache, a dashboard): If-None-Match
# with its ETag, answered 304 with no body after the same lookup.
LIST_UNCHANGED = "list, first page polled with its ETag: 304"
WALK_PAGES = 8000  # per walk: 500 for each of the 16 connections (bench/_loadgen.py)
_TYPES = (("image", "image/jpeg"), ("video", "video/mp4"), ("other", "application/octet-stream"))
_T0 = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)


def _event_id(device: str, i: int) -> str:
    return "evt_" + f"{device[-2:]}{i:020d}"


def _created(i: int) -> datetime.datetime:
    return _T0 + datetime.timedelta(milliseconds=i)


# The events table's columns that the seeded rows fill, in event_rows()' order.
EVENT_COLUMNS = ("id", "device", "name", "media_type", "mime_type", "size", "sha256", "has_thumbnail",
                 "metadata_json", "created", "state", "thumbnail_state", "thumbnail_attempts", "media_info_json")


def event_rows(device: str, count: int) -> Iterator[tuple[object, ...]]:
    """`count` stored events of `device`, one a millisecond apart (`created` in UTC)."""
    for i in range(count):
        media_type, mime = _TYPES[i % 3]
        yield (_event_id(device, i), device, f"capture-{i}.bin", media_type, mime, 1000 + i % 1000, f"{i:064x}",
               False, "{}", _created(i), "stored", "", 0, "")


def seed(bench: Bench, device: str, count: int) -> float:
    """Insert `count` events of `device` into the stack's SQLite in one transaction; returns the
    seconds it took."""
    started = time.monotonic()
    created = EVENT_COLUMNS.index("created")
    db = sqlite3.connect(bench.stack.data_dir / "gallery.db", timeout=60)
    try:
        db.execute("PRAGMA busy_timeout=60000")
        with db:
            db.executemany(
                f"INSERT INTO events ({', '.join(EVENT_COLUMNS)}) VALUES ({', '.join('?' * len(EVENT_COLUMNS))})",
                # SQLite keeps datetimes as text, in the form SQLAlchemy writes (UTC, no offset).
                (row[:created] + (row[created].strftime("%Y-%m-%d %H:%M:%S.%f"),) + row[created + 1:]  # type: ignore[attr-defined]
                 for row in event_rows(device, count)),
            )
    finally:
        db.close()
    return time.monotonic() - started


def _expected_size(count: int) -> int:
    return sum(1000 + i % 1000 for i in range(count))


def _check_list(body: bytes, first_index: int, device: str) -> None:
    """A page of 50 events of `device`, newest first, starting at `first_index`."""
    events = json.loads(body)
    if not isinstance(events, list) or len(events) != 50:
        raise BenchError(f"list: expected 50 events, got {body[:200]!r}")
    if [e["id"] for e in events] != [_event_id(device, first_index - k) for k in range(50)]:
        raise BenchError(f"list: page starts at {events[0]['id']}, expected 50 events from "
                         f"{_event_id(device, first_index)} down")


def _walk(base: str, count: int, depth: int, pages: int, *, by_offset: bool = False) -> list[str]:
    """The paths of `pages` consecutive pages of 50 of BIG_DEVICE's `count` events, newest first,
    from `depth`: each with the page token a client walking the listing holds there (built by the
    server's own code; page tokens are keyset positions), or with `offset`."""
    paths = []
    for page in range(pages):
        skipped = depth + 50 * page
        if by_offset:
            paths.append(f"{base}/events?limit=50&offset={skipped}")
        elif skipped == 0:
            paths.append(f"{base}/events?limit=50")
        else:
            before = count - skipped  # the index of the last event of the page before
            token = paging.next_page_token(paging.build(device=BIG_DEVICE, limit=50),
                                           (_created(before), _event_id(BIG_DEVICE, before)), full=True)
            paths.append(f"{base}/events?limit=50&page_token={token}")
    return paths


def _check_stats(body: bytes, count: int) -> None:
    stats = json.loads(body)
    if stats.get("total_events") != count or stats.get("total_size") != _expected_size(count):
        raise BenchError(f"stats: {body[:300]!r}, expected {count} events of {_expected_size(count)} bytes")
    if sum(t["count"] for t in stats["by_type"].values()) != count:
        raise BenchError(f"stats: by_type does not add up: {body[:300]!r}")


def _load(host: str, port: int, paths: list[str], headers: dict[str, str], seconds: float,
          pids: dict[str, int], *, status: int = 200) -> tuple[_loadgen.LoadResult, dict[str, float]]:
    requests = [_loadgen.get_request(host, port, path, headers) for path in paths]
    before = cpu_now(pids)
    result = _loadgen.run(host, port, requests, connections=CONNECTIONS, seconds=seconds)
    after = cpu_now(pids)
    if result.errors or set(result.statuses) != {status}:
        raise BenchError(f"GET {paths[0]}: statuses {result.statuses}, errors {result.errors[:3]}")
    cpu_us = {name: (after[name] - before[name]) / max(1, result.requests) * 1e6 for name in pids}
    return result, cpu_us


def _seeded(bench: Bench) -> int:
    """How many events scenario_listing gives the big device."""
    return 20_000 if bench.options.quick else 1_000_000


class _Case(NamedTuple):
    """A request of the listing's load: its paths (cycled), the check of each sampled answer (its
    body, and the index of the path it answers), whether it is a target, and what it sends and
    must be answered beyond a 200 to an authorized GET."""

    name: str
    paths: list[str]
    check: Callable[[bytes, int], None]
    is_target: bool
    headers: dict[str, str] = {}  # never changed
    status: int = 200


def scenario_listing(bench: Bench) -> Section:
    count = _seeded(bench)
    seed_s = seed(bench, BIG_DEVICE, count)
    seed(bench, SMALL_DEVICE, 1000)
    print(f"  seeded {count:,} events in {seed_s:.1f} s", flush=True)
    postgres_url = _postgres.configured_url()
    if postgres_url is None:
        return _listing(bench, count, seed_s, None, f"{_postgres.URL_VARIABLE} was not set")
    try:
        postgres = _postgres.PostgresStack(postgres_url, bench.stack.data_dir.parent / "postgres",
                                           jwt_secret=JWT_SECRET, extra_env=dict(SEEDED_STACK_ENV))
    except psycopg.OperationalError as exc:  # no server there: the rest of the bench still runs
        reason = f"connecting to its server failed: {' '.join(str(exc).split())[:200]}"
        print(f"  PostgreSQL not measured: {reason}", flush=True)
        return _listing(bench, count, seed_s, None, reason)
    try:
        postgres_seed_s = postgres.seed(EVENT_COLUMNS, event_rows(BIG_DEVICE, count))
        print(f"  seeded {count:,} events in PostgreSQL in {postgres_seed_s:.1f} s", flush=True)
        return _listing(bench, count, seed_s, (postgres, postgres_seed_s), "")
    finally:
        postgres.stop()


def _listing(bench: Bench, count: int, seed_s: float,
             postgres: tuple[_postgres.PostgresStack, float] | None, why_not_postgres: str) -> Section:
    opts = bench.options
    seconds = 1.0 if opts.quick else 4.0
    host, port = "127.0.0.1", bench.stack.http_port
    auth = {"Authorization": f"Bearer {bench.token}"}
    depth = count // 2
    # Distinct pages enough that no connection asks for one twice in a run (16 x 500), as far as
    # the device goes: each page is read from the database, none is served as kept.
    pages = min(WALK_PAGES, (count - depth) // 50)
    base = f"/api/gallery/{BIG_DEVICE}"

    def walked(skipped: int) -> Callable[[bytes, int], None]:
        """The check of a walk's answer to its `page`-th path: the 50 events after `skipped`."""
        return lambda body, page: _check_list(body, count - 1 - skipped - 50 * page, BIG_DEVICE)

    def unchanged(body: bytes, _: int) -> None:
        if body:
            raise BenchError(f"a 304 with a body: {body[:100]!r}")

    first_page = f"{base}/events?limit=50"
    tag = bench.http.get(first_page, headers=auth).headers["etag"]
    read_first, read_deep = (f"list, {pages:,} pages from the first, each read once",
                             f"list, {pages:,} pages from depth {depth:,} by page_token, each read once")
    stats = f"stats, {count:,} events"
    cases = [
        _Case(LIST_KEPT, [first_page], walked(0), True),
        _Case(LIST_UNCHANGED, [first_page], unchanged, False, {"If-None-Match": tag}, 304),
        _Case(read_first, _walk(base, count, 0, pages), walked(0), True),
        _Case(read_deep, _walk(base, count, depth, pages), walked(depth), True),
        _Case(f"list, {pages:,} pages from offset {depth:,} (the reference's offset paging), each read once",
              _walk(base, count, depth, pages, by_offset=True), walked(depth), False),
        _Case(stats, [f"{base}/stats"], lambda body, _: _check_stats(body, count), True),
        _Case("stats, 1,000 events (control)", [f"/api/gallery/{SMALL_DEVICE}/stats"],
              lambda body, _: _check_stats(body, 1000), False),
    ]
    pids = {"server": bench.stack.server_pid, "envoy": bench.stack.envoy_pid}
    header = ["request (through Envoy, 16 connections)", "req/s", "p50 ms", "p90 ms", "p99 ms", "max ms",
              "server CPU µs/req", "Envoy CPU µs/req", "target"]
    measured: dict[str, list[dict[str, float]]] = {case.name: [] for case in cases}
    on_postgres: dict[str, list[dict[str, float]]] = {case.name: [] for case in cases if case.is_target}

    def measure(run: int, case: _Case, where: str, at_port: int, processes: dict[str, int],
                database: _postgres.PostgresStack | None = None) -> dict[str, float]:
        backends_before = database.backends_cpu() if database else None
        result, cpu_us = _load(host, at_port, case.paths, {**auth, **case.headers}, seconds, processes,
                               status=case.status)
        backends_after = database.backends_cpu() if database else None
        for body, request in zip(result.sample_bodies, result.sample_requests, strict=True):
            case.check(body, request)  # each answer against the path it answers: a page is the one asked for
        print(f"  run {run + 1}/{opts.runs}  {where:<10} {case.name:<55} {result.rate:7.0f} req/s  "
              f"p50 {result.percentile(50):6.2f} ms  p99 {result.percentile(99):6.2f} ms", flush=True)
        sample = {
            "rate": result.rate, "p50": result.percentile(50), "p90": result.percentile(90),
            "p99": result.percentile(99), "max": max(result.latencies_ms), "server_us": cpu_us["server"],
            "envoy_us": cpu_us["envoy"],
        }
        if backends_before is not None and backends_after is not None:
            spent = _postgres.cpu_spent(backends_before, backends_after)
            sample["database_us"] = spent / max(1, result.requests) * 1e6
        return sample

    for run in range(opts.runs):
        for case in cases:
            measured[case.name].append(measure(run, case, "SQLite", port, pids))
            if postgres is not None and case.name in on_postgres:
                stack = postgres[0].stack
                on_postgres[case.name].append(measure(
                    run, case, "PostgreSQL", stack.http_port,
                    {"server": stack.server_pid, "envoy": stack.envoy_pid}, postgres[0],
                ))
    rows, raw = [], {}
    for case in cases:
        name, is_target = case.name, case.is_target
        m = {key: median([s[key] for s in measured[name]]) for key in measured[name][0]}
        met = m["p50"] < P50_MS and m["p99"] < P99_MS
        rows.append([name, f"{m['rate']:.0f}", f"{m['p50']:.2f}", f"{m['p90']:.2f}", f"{m['p99']:.2f}",
                     f"{m['max']:.1f}", f"{m['server_us']:.0f}", f"{m['envoy_us']:.0f}",
                     (("met" if met else "NOT met") if is_target else "–")])
        raw[name] = measured[name]
        if is_target:
            bench.targets.append((name, f"p50 < {P50_MS:.0f} ms and p99 < {P99_MS:.0f} ms",
                                  f"p50 {m['p50']:.2f} ms, p99 {m['p99']:.2f} ms", met))
    contention = _contention_table(bench, measured, kept_case=LIST_KEPT, read_case=read_first, stats_case=stats)
    first_p50 = median([s["p50"] for s in measured[read_first]])
    deep = median([s["p50"] for s in measured[read_deep]])
    bench.targets.append(("list, deep pages vs pages from the first, each read once", "same cost (p50 ratio <= 1.2)",
                          f"{deep / first_p50:.2f}x", deep / first_p50 <= 1.2))
    markdown = (
        f"A device with {count:,} events (and one with 1,000), seeded straight into SQLite in {seed_s:.0f} s "
        f"(executemany; the stats triggers ran for every row). Each request was sent for {seconds:.0f} s over "
        f"{CONNECTIONS} keep-alive HTTP/1.1 connections to Envoy (closed loop: each connection sends its next "
        "request when the previous answer is complete), by bench/_loadgen.py in its own process; answers were "
        "checked (page contents and order, stats totals). The server keeps pages it has read (PageCache, "
        "server/gallery_server/listing.py) while their device's events stay as they were, and serves one asked "
        "for again after a lookup of one row (the device's listing version): the first row asks for the same "
        "page every time, as a page left open, polled or shared does; the second polls it with its ETag "
        "(If-None-Match), as a browser's cache or a dashboard that keeps what it has does, and is answered 304 "
        "with no body after the same lookup (not a target: no page is sent). The walks ask for distinct pages, each "
        "connection its own stretch of consecutive ones, so every page is read from the database: what a "
        "client paging through a listing meets. Deep pages use `page_token` (keyset, the API's deep "
        "pagination); the reference's `offset` paging is shown for comparison: SQLite must step over every "
        "skipped row, so its cost grows with the offset and it is not a target. Targets: p50 < 5 ms and "
        "p99 < 20 ms.\n\n" + md_table(header, rows)
    )
    console = text_table(header, rows)
    if postgres is not None:
        table = _postgres_table(measured, on_postgres, count, postgres[1], seconds)
        markdown += "\n\n" + table.markdown
        console += "\n\n" + table.console
        raw["on PostgreSQL"] = on_postgres
    else:
        markdown += (f"\n\nPostgreSQL was not measured in this run ({why_not_postgres}; `make bench` sets "
                     f"{_postgres.URL_VARIABLE} to the machine's local server).")
        console += f"\n\nPostgreSQL was not measured: {why_not_postgres}"
    markdown += "\n\n" + contention.markdown
    console += "\n\n" + contention.console
    raw["handler CPU by threads"] = contention.raw
    return Section(f"Listing and stats on {count:,} events", console, markdown, raw)


def _postgres_table(on_sqlite: dict[str, list[dict[str, float]]], on_postgres: dict[str, list[dict[str, float]]],
                    count: int, seed_s: float, seconds: float) -> Section:
    """The target requests on the PostgreSQL stack, next to the SQLite runs they alternated with."""
    header = ["request on PostgreSQL (through Envoy, 16 connections)", "req/s", "p50 ms", "p99 ms",
              "server CPU µs/req", "Envoy CPU µs/req", "PostgreSQL CPU µs/req", "p50 ÷ SQLite (same run)",
              "target"]
    rows = []
    for name, samples in on_postgres.items():
        m = {key: median([s[key] for s in samples]) for key in samples[0]}
        ratio = median([p["p50"] / s["p50"] for p, s in zip(samples, on_sqlite[name], strict=True)])
        met = m["p50"] < P50_MS and m["p99"] < P99_MS
        rows.append([name, f"{m['rate']:.0f}", f"{m['p50']:.2f}", f"{m['p99']:.2f}", f"{m['server_us']:.0f}",
                     f"{m['envoy_us']:.0f}", f"{m['database_us']:.0f}" if "database_us" in m else "–",
                     f"{ratio:.2f}", "met" if met else "NOT met"])
    markdown = (
        "**On PostgreSQL**, the database that replicas share: a second stack (server and Envoy, as `gallery run` "
        f"starts them, one replica) on a throw-away database of {_postgres.URL_VARIABLE}'s server, with the same "
        f"{count:,} events copied in ({seed_s:.0f} s: one COPY, counted by the stats triggers, then "
        "VACUUM (ANALYZE); bench/_postgres.py). The same requests, each run on "
        f"SQLite and then here, {seconds:.0f} s each, answers checked; the ratio is of p50s measured one after "
        "the other. PostgreSQL's CPU is that of the backends connected to the database (a process per "
        "connection, on this machine's 2 vCPUs like everything else). Not in the targets table: the targets "
        "are for the default stack.\n\n" + md_table(header, rows)
    )
    return Section("On PostgreSQL", text_table(header, rows), markdown, {})


def _contention_table(bench: Bench, measured: dict[str, list[dict[str, float]]], *, kept_case: str,
                      read_case: str, stats_case: str) -> Section:
    """The list and stats calls alone, in one process, on 1 thread and on as many as the server's read
    workers (bench/_contention.py), next to the server's CPU per request through Envoy under the 16
    connections above."""
    many = Settings.grpc_read_workers
    runs = [_contention.handler_cpu(str(bench.stack.data_dir), JWT_SECRET, BIG_DEVICE, (1, many))
            for _ in range(bench.options.runs)]
    header = ["call, in one process (no gRPC, Envoy or token check)", "CPU µs/call, 1 thread",
              f"CPU µs/call, {many} threads", f"{many} threads ÷ 1 (same run)",
              "server CPU µs/req through Envoy (above)"]
    rows = []
    calls = ((_contention.LIST_READ, read_case), (_contention.LIST_KEPT, kept_case), (_contention.STATS, stats_case))
    for call, case in calls:
        one = median([r[call]["1"] for r in runs])
        on_many = median([r[call][str(many)] for r in runs])
        ratio = median([r[call][str(many)] / r[call]["1"] for r in runs])
        server = median([s["server_us"] for s in measured[case]])
        rows.append([call, f"{one:.0f}", f"{on_many:.0f}", f"{ratio:.2f}", f"{server:.0f}"])
    markdown = (
        "What the calls cost by themselves (`Gallery.list_page_json`, with no page kept and with the page kept, "
        "and `Gallery.stats`, on the same database; each next to the request through Envoy that does the same: "
        "a walk's page, the first page asked for again, stats; "
        f"{_contention.CALLS} calls per measurement in a fresh process, medians of {bench.options.runs} runs), on "
        f"one thread and on {many} threads at once, as the server's {many} read workers "
        "(GALLERY_GRPC_READ_WORKERS' default) run them. The threads share one GIL, "
        "which every SQLite step and every contended lock lets go: the ratio column shows what taking turns at it "
        "adds to each call's CPU. The rest of the server's CPU per request through Envoy is the token check, the "
        "interceptor, protobuf and grpcio's request path (compare the *floor* rows of the small-request "
        "section).\n\n" + md_table(header, rows)
    )
    return Section("handler CPU by threads", text_table(header, rows), markdown, runs)


def profile_load(bench: Bench, what: str) -> None:
    """Load for the profiler on the big device, seeded by scenario_listing (or empty, if it did not
    run): "stats", or "walk", the listing's pages from the first, each asked for once."""
    base = f"/api/gallery/{BIG_DEVICE}"
    count = _seeded(bench)
    paths = _walk(base, count, 0, min(WALK_PAGES, count // 50)) if what == "walk" else [f"{base}/{what}"]
    requests = [_loadgen.get_request("127.0.0.1", bench.stack.http_port, path,
                                     {"Authorization": f"Bearer {bench.token}"}) for path in paths]
    _loadgen.run("127.0.0.1", bench.stack.http_port, requests, connections=CONNECTIONS,
                 seconds=1.0 if bench.options.quick else 3.0)


def scenario_small_requests(bench: Bench) -> Section:
    seconds = 1.0 if bench.options.quick else 4.0
    run_dir = str(storage.run_dir(bench.stack.data_dir))
    with contextlib.ExitStack() as running:
        floor = FloorStack(run_dir)
        running.callback(floor.stop)
        aio_floor = FloorStack(run_dir, "aio")
        running.callback(aio_floor.stop)
        return _small_requests(bench, floor, aio_floor, seconds)


def _event_with_thumbnail(bench: Bench) -> tuple[str, bytes]:
    """An event of EVENT_DEVICE uploaded with a thumbnail (seeded rows have no files): its id and
    the thumbnail's bytes."""
    thumbnail = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 12  # a JPEG's magic, 3 KiB
    r = bench.http.post(
        f"/api/gallery/{EVENT_DEVICE}/upload", headers=bench.auth_header, data={"name": "clip.jpg"},
        files={"event": ("clip.jpg", b"\xff\xd8\xff\xe0" + b"\x00" * 4096), "thumbnail": ("t.jpg", thumbnail)},
    )
    if r.status_code != 200:
        raise BenchError(f"upload with a thumbnail: {r.status_code} {r.text[:200]}")
    return str(r.json()["eventId"]), thumbnail


def _small_requests(bench: Bench, floor: FloorStack, aio_floor: FloorStack, seconds: float) -> Section:
    opts = bench.options
    assert bench.peer is not None
    host = "127.0.0.1"
    auth = {"Authorization": f"Bearer {bench.token}"}
    gallery = {"server": bench.stack.server_pid, "envoy": bench.stack.envoy_pid}
    event_id, thumbnail = _event_with_thumbnail(bench)
    event = f"/api/gallery/{EVENT_DEVICE}/events/{event_id}"

    def success(body: bytes) -> bool:
        return json.loads(body).get("success") is True

    def stats(body: bytes) -> bool:
        return "total_events" in json.loads(body)

    cases = [
        ("GET .../paths via Envoy (JWT checked, GetDevicePaths)", bench.stack.http_port,
         f"/api/gallery/{SMALL_DEVICE}/paths", auth, gallery, success),
        (FLOOR_PATHS, floor.http_port, f"/api/gallery/{SMALL_DEVICE}/paths", auth, floor.pids, success),
        ("GET .../stats via Envoy (1,000 events)", bench.stack.http_port, f"/api/gallery/{SMALL_DEVICE}/stats", auth,
         gallery, stats),
        (FLOOR_STATS, floor.http_port, f"/api/gallery/{SMALL_DEVICE}/stats", auth, floor.pids, stats),
        (FLOOR_STATS_AIO, aio_floor.http_port, f"/api/gallery/{SMALL_DEVICE}/stats", auth, aio_floor.pids, stats),
        ("GET .../events/{id} via Envoy (GetEvent: metadata and pull state)", bench.stack.http_port, event, auth,
         gallery, lambda body: json.loads(body)["id"] == event_id),
        ("GET .../events/{id}/thumbnail via Envoy (3 KiB, sent by Envoy after Check)", bench.stack.http_port,
         f"{event}/thumbnail", auth, gallery, lambda body: body == thumbnail),
        ("peer: GET /ping on uvicorn/Starlette (no auth, no proxy)", bench.peer.port, "/ping", {},
         {"server": bench.peer.pid}, success),
    ]
    header = ["request (16 connections)", "req/s", "p50 ms", "p99 ms", "server CPU µs/req", "Envoy CPU µs/req",
              "÷ floor (req/s, same run)"]
    measured: dict[str, list[dict[str, float]]] = {name: [] for name, *_ in cases}
    for run in range(opts.runs):
        for name, port, path, headers, pids, check in cases:
            result, cpu_us = _load(host, port, [path], headers, seconds, pids)
            if not check(result.sample_bodies[0]):
                raise BenchError(f"{name}: {result.sample_bodies[0][:200]!r}")
            measured[name].append({"rate": result.rate, "p50": result.percentile(50), "p99": result.percentile(99),
                                   **{f"{k}_us": v for k, v in cpu_us.items()}})
            print(f"  run {run + 1}/{opts.runs}  {name:<60} {result.rate:7.0f} req/s", flush=True)

    def ratio(name: str, other: str) -> float:
        return median([a["rate"] / b["rate"] for a, b in zip(measured[name], measured[other], strict=True)])

    floors = {cases[0][0]: FLOOR_PATHS, cases[2][0]: FLOOR_STATS, FLOOR_STATS_AIO: FLOOR_STATS}
    rows, raw = [], measured
    for name, *_ in cases:
        m = {key: median([s[key] for s in measured[name]]) for key in measured[name][0]}
        rows.append([name, f"{m['rate']:.0f}", f"{m['p50']:.2f}", f"{m['p99']:.2f}", f"{m['server_us']:.0f}",
                     f"{m['envoy_us']:.0f}" if "envoy_us" in m else "–",
                     f"{ratio(name, floors[name]):.2f}" if name in floors else "–"])
    floor_p50 = median([s["p50"] for s in measured[FLOOR_STATS]])
    markdown = (
        f"The smallest authenticated calls, through Envoy, for {seconds:.0f} s each over {CONNECTIONS} keep-alive "
        "connections (bench/_loadgen.py). The sync *floor* rows send the same requests through an Envoy rendered "
        "from the same envoy/envoy.yaml to a grpcio server of the same kind (sync, thread pool) whose handlers "
        "return constants (bench/_floor.py: no token check, no database, no log line): what Python gRPC plus "
        "Envoy's transcoding cost on this machine before any work is done, which bounds the request rate, and so "
        f"the latency of {CONNECTIONS} closed-loop clients, that any handler could reach here (floor stats p50 "
        f"{floor_p50:.2f} ms). The *grpc.aio* floor row serves the same constants from grpcio's asyncio server "
        "(one event loop fed by grpc's poller thread, no thread pool) behind an identical Envoy of its own; its "
        "÷ floor column is its request rate over the sync floor's "
        f"({ratio(FLOOR_STATS_AIO, FLOOR_STATS):.2f} in this run): what grpc.aio's request path alone would "
        "change, before handlers that block on the database. The peer is a trivial uvicorn/Starlette JSON "
        "endpoint with uvicorn's default logging, an access line per request like the gallery's (no token, no "
        "proxy: an upper bound for Python); gallery paths ÷ peer request rate: "
        f"{ratio(cases[0][0], cases[-1][0]):.2f}. The one-event rows are what a gallery's page of thumbnails "
        "asks for: an event uploaded with a 3 KiB thumbnail, read by GetEvent (JSON with its metadata and pull "
        "state) and the thumbnail's GET (the bytes, which Envoy sends itself once the server's Check has let it, "
        "rpc/file_handoff.py, as for content; each answer checked).\n\n"
        + md_table(header, rows)
    )
    return Section("Small requests", text_table(header, rows), markdown, raw)
