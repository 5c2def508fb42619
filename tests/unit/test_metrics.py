"""The metrics one server process serves (metrics.py): codes labelled as the gRPC ecosystem writes
them, gauges read when scraped, the text a scraper reads. The interceptor's counting of calls is
in test_interceptor.py."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import socket
import time

import grpc
import httpx
import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gallery_server import status_files
from gallery_server.db import Database
from gallery_server.metrics import CALL_TYPES, Metrics, code_label
from gallery_server.reconcile import Findings

SERVICE = "gallery.v1.GalleryService"

# Go's codes.Code.String(), which go-grpc-prometheus's grpc_code label and its dashboards use.
GO_CODE_NAMES = {
    "OK": "OK", "CANCELLED": "Canceled", "UNKNOWN": "Unknown", "INVALID_ARGUMENT": "InvalidArgument",
    "DEADLINE_EXCEEDED": "DeadlineExceeded", "NOT_FOUND": "NotFound", "ALREADY_EXISTS": "AlreadyExists",
    "PERMISSION_DENIED": "PermissionDenied", "RESOURCE_EXHAUSTED": "ResourceExhausted",
    "FAILED_PRECONDITION": "FailedPrecondition", "ABORTED": "Aborted", "OUT_OF_RANGE": "OutOfRange",
    "UNIMPLEMENTED": "Unimplemented", "INTERNAL": "Internal", "UNAVAILABLE": "Unavailable",
    "DATA_LOSS": "DataLoss", "UNAUTHENTICATED": "Unauthenticated",
}


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_every_grpc_code_is_labelled_as_go_names_it() -> None:
    assert {code.name: code_label(code.name) for code in grpc.StatusCode} == GO_CODE_NAMES


def test_the_endpoint_serves_what_a_scraper_reads(tmp_path) -> None:
    metrics = Metrics()
    in_flight = [3]
    metrics.gauge("gallery_uploads_in_flight", "Uploads being received.", lambda: in_flight[0])
    metrics.watch_free_space(tmp_path)
    metrics.call_finished("unary", f"/{SERVICE}/GetStats", "NOT_FOUND", 0.002)
    port, stop = metrics.serve("127.0.0.1", 0)
    try:
        def scrape() -> dict[str, float]:
            r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/plain")
            return {
                sample.name + str(sorted(sample.labels.items())): sample.value
                for family in text_string_to_metric_families(r.text) for sample in family.samples
            }

        samples = scrape()
        assert samples["gallery_uploads_in_flight[]"] == 3
        assert samples["gallery_data_free_bytes[]"] > 0
        handled = ("grpc_server_handled_total[('grpc_code', 'NotFound'), ('grpc_method', 'GetStats'),"
                   f" ('grpc_service', '{SERVICE}'), ('grpc_type', 'unary')]")
        assert samples[handled] == 1
        assert not [name for name in samples if name.split("[")[0].endswith("_created")]
        in_flight[0] = 0
        assert scrape()["gallery_uploads_in_flight[]"] == 0  # read at each scrape
    finally:
        stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)


def test_a_counter_read_at_each_scrape_is_a_counter() -> None:
    metrics = Metrics()
    served = [5]
    metrics.counter("gallery_listing_pages_read_total", "Pages read.", lambda: served[0])
    exposition = prometheus_client.generate_latest(metrics.registry).decode()
    assert "# TYPE gallery_listing_pages_read_total counter" in exposition
    assert "gallery_listing_pages_read_total 5.0" in exposition
    served[0] = 7
    assert "gallery_listing_pages_read_total 7.0" in prometheus_client.generate_latest(metrics.registry).decode()


def test_free_space_that_cannot_be_read_is_nan_and_the_rest_is_served(tmp_path) -> None:
    metrics = Metrics()
    metrics.watch_free_space(tmp_path / "gone")  # a data root removed, or a stale mount
    metrics.gauge("gallery_uploads_in_flight", "Uploads being received.", lambda: 2)
    port, stop = metrics.serve("127.0.0.1", 0)
    try:
        r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    finally:
        stop()
    assert r.status_code == 200
    samples = {s.name: s.value for f in text_string_to_metric_families(r.text) for s in f.samples}
    assert math.isnan(samples["gallery_data_free_bytes"])
    assert samples["gallery_uploads_in_flight"] == 2


def test_call_types_are_named_as_the_ecosystem_names_them() -> None:
    assert CALL_TYPES == {
        (False, False): "unary", (True, False): "client_stream",
        (False, True): "server_stream", (True, True): "bidi_stream",
    }


def test_handling_is_observed_in_seconds_in_buckets_from_1_ms_to_2_hours() -> None:
    metrics = Metrics()
    metrics.call_finished("unary", f"/{SERVICE}/GetStats", "OK", 0.002)
    labels = {"grpc_type": "unary", "grpc_service": SERVICE, "grpc_method": "GetStats"}
    assert value(metrics, "grpc_server_handling_seconds_sum", **labels) == 0.002
    bounds = [
        sample.labels["le"] for family in metrics.registry.collect() for sample in family.samples
        if sample.name == "grpc_server_handling_seconds_bucket"
    ]
    assert bounds == ["0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0", "2.5",
                      "5.0", "10.0", "30.0", "60.0", "300.0", "1800.0", "7200.0", "+Inf"]
    assert value(metrics, "grpc_server_handling_seconds_bucket", **labels, le="0.001") == 0
    assert value(metrics, "grpc_server_handling_seconds_bucket", **labels, le="0.0025") == 1


def test_free_space_is_what_the_server_may_use(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks available to an unprivileged writer (not those kept for root), in fragment-size units."""
    statvfs = type("statvfs", (), {"f_bavail": 3, "f_bfree": 5, "f_frsize": 4096, "f_bsize": 8192})
    monkeypatch.setattr("gallery_server.metrics.os.statvfs", lambda path: statvfs)
    metrics = Metrics()
    metrics.watch_free_space(tmp_path)
    assert value(metrics, "gallery_data_free_bytes") == 3 * 4096


def test_the_endpoint_listens_on_its_host_only() -> None:
    port, stop = Metrics().serve("127.0.0.2", 0)  # all of 127/8 is the loopback on Linux
    try:
        assert httpx.get(f"http://127.0.0.2:{port}/metrics", timeout=10).status_code == 200
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    finally:
        stop()


def test_the_reconciliation_figures_are_nan_rather_than_a_failed_scrape(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Read from the status file at each scrape: before any pass, or from a file someone else
    wrote, a figure is NaN and every other figure is still served."""
    status = tmp_path / "reconcile.json"

    metrics = Metrics()
    metrics.watch_reconciliation(lambda: status_files.read(status, Findings))
    finished = "gallery_reconcile_last_finished_timestamp_seconds"
    assert math.isnan(value(metrics, finished))
    status.write_text(json.dumps({"finished": "2026-11-30T12:00:00.000000Z", "missing_media": 2}))
    assert value(metrics, finished) == datetime.datetime(2026, 11, 30, 12, tzinfo=datetime.UTC).timestamp()
    assert value(metrics, "gallery_reconcile_missing_media") == 2
    status.write_text(json.dumps({"finished": "yesterday", "missing_media": "many"}))
    assert math.isnan(value(metrics, finished)) and math.isnan(value(metrics, "gallery_reconcile_missing_media"))
    assert value(metrics, "gallery_reconcile_size_mismatch") == 0
    version = {"version": importlib.metadata.version("gallery")}
    assert metrics.registry.get_sample_value("gallery_build_info", version) == 1


def test_the_backlogs_are_nan_while_the_database_does_not_answer(tmp_path) -> None:  # type: ignore[no-untyped-def]
    metrics = Metrics()
    metrics.watch_backlogs(Database(f"sqlite:///{tmp_path}/no-such-folder/gallery.db"))
    assert math.isnan(value(metrics, "gallery_thumbnails_pending"))
    assert math.isnan(value(metrics, "gallery_pulls_open"))
    version = {"version": importlib.metadata.version("gallery")}
    assert metrics.registry.get_sample_value("gallery_build_info", version) == 1  # the rest is served


def test_a_silent_database_does_not_hold_the_scrape() -> None:
    """A database that takes connections and never answers: the scrape answers within the read's
    bounded wait, NaN for the counts, and the next ones too, while that read still hangs."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        db = Database(f"postgresql+psycopg://gallery@127.0.0.1:{silent.getsockname()[1]}/gallery", pool_size=1)
        metrics = Metrics()
        metrics.watch_backlogs(db)
        started = time.monotonic()
        for _ in range(3):  # each a whole scrape (get_sample_value collects every gauge)
            assert math.isnan(value(metrics, "gallery_thumbnails_pending"))
            assert math.isnan(value(metrics, "gallery_pulls_open"))
        assert time.monotonic() - started < 3  # one wait of 1 s in all, not one per gauge and scrape
        db.dispose()


def test_a_count_that_fails_on_its_own_leaves_its_gauge_unknown_and_the_reads_going(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A count raising what is no database error ended the read's thread before it said it was
    done: no read ever started again, and every gauge kept its value for the process's life."""
    from gallery_server.metrics import _DatabaseCounts

    calls = {"bad": 0, "good": 0}

    def bad(db: Database) -> int:
        calls["bad"] += 1
        raise RuntimeError("a bug in a count")

    def good(db: Database) -> int:
        calls["good"] += 1
        return 3 + calls["good"]

    counts = _DatabaseCounts(None, {"bad": bad, "good": good})  # type: ignore[arg-type]
    assert math.isnan(counts.value("bad")) and counts.value("good") == 4
    time.sleep(counts.FRESH_SECONDS)
    assert counts.value("good") == 5  # read again
    assert calls == {"bad": 2, "good": 2}
    assert "metrics count failed" in caplog.text
