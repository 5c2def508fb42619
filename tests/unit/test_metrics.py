"""The metrics one server process serves (metrics.py): codes labelled as the gRPC ecosystem writes
them, gauges read when scraped, the text a scraper reads. The interceptor's counting of calls is
in test_interceptor.py."""

from __future__ import annotations

import math

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gallery_server.metrics import Metrics, code_label

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
