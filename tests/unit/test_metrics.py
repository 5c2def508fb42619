"""The metrics one server process serves (metrics.py): calls counted by the interceptor under the
gRPC ecosystem's names and labels, gauges read when scraped, the text a scraper reads."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gallery_server import auth
from gallery_server.metrics import Metrics, code_label
from gallery_server.rpc.interceptor import GalleryInterceptor

from ..conftest import JWT_SECRET

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


@dataclasses.dataclass
class _Details:
    method: str
    invocation_metadata: tuple[tuple[str, str], ...] = ()


class _Aborted(Exception):
    pass


class _LiveCall:
    """The ServicerContext methods the interceptor uses, of a call whose client is still there."""

    def __init__(self, metadata: list[tuple[str, str]]) -> None:
        self._metadata = metadata

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return self._metadata

    def is_active(self) -> bool:
        return True

    def abort_with_status(self, status: Any) -> None:
        raise _Aborted(status.code)


def _intercepted(metrics: Metrics, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    wrapped = GalleryInterceptor(auth.Verifier(secret=JWT_SECRET), metrics=metrics).intercept_service(
        lambda details: handler, _Details(method),
    )
    assert wrapped is not None
    return wrapped


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_calls_are_counted_by_type_service_method_and_code(mint: Callable[..., str]) -> None:
    metrics = Metrics()
    unary = _intercepted(metrics, f"/{SERVICE}/GetStats",
                         grpc.unary_unary_rpc_method_handler(lambda request, context: "stats"))
    token = [("authorization", f"Bearer {mint()}")]
    assert unary.unary_unary(object(), _LiveCall(token)) == "stats"
    assert unary.unary_unary(object(), _LiveCall(token)) == "stats"
    with pytest.raises(_Aborted):
        unary.unary_unary(object(), _LiveCall([]))  # no token
    labels = {"grpc_type": "unary", "grpc_service": SERVICE, "grpc_method": "GetStats"}
    assert value(metrics, "grpc_server_started_total", **labels) == 3
    assert value(metrics, "grpc_server_handled_total", **labels, grpc_code="OK") == 2
    assert value(metrics, "grpc_server_handled_total", **labels, grpc_code="Unauthenticated") == 1
    assert value(metrics, "grpc_server_handling_seconds_count", **labels) == 3
    assert 0 < value(metrics, "grpc_server_handling_seconds_sum", **labels) < 5


def test_a_stream_counts_once_it_ends(mint: Callable[..., str]) -> None:
    metrics = Metrics()

    def behavior(request: Any, context: Any) -> Iterator[str]:
        yield from ("a", "b")

    stream = _intercepted(metrics, f"/{SERVICE}/ReadEventContent",
                          grpc.unary_stream_rpc_method_handler(behavior))
    labels = {"grpc_type": "server_stream", "grpc_service": SERVICE, "grpc_method": "ReadEventContent"}
    answers = stream.unary_stream(object(), _LiveCall([("authorization", f"Bearer {mint()}")]))
    assert next(answers) == "a"
    assert value(metrics, "grpc_server_started_total", **labels) == 1
    assert value(metrics, "grpc_server_handled_total", **labels, grpc_code="OK") == 0  # still open
    assert list(answers) == ["b"]
    assert value(metrics, "grpc_server_handled_total", **labels, grpc_code="OK") == 1


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
