"""The interceptor's per-RPC state (the caller, the request id) across grpcio's threads, and the
calls it reports to the metrics (metrics.py)."""

from __future__ import annotations

import contextvars
import dataclasses
import logging
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from gallery_server import auth, logs, validation
from gallery_server.errors import NotFound
from gallery_server.metrics import Metrics
from gallery_server.rpc.interceptor import GalleryInterceptor, current_principal

from ..conftest import JWT_SECRET

METHOD = "/gallery.v1.GalleryService/DownloadEvent"
SERVICE = "gallery.v1.GalleryService"


@dataclasses.dataclass
class _Details:
    method: str
    invocation_metadata: tuple[tuple[str, str], ...] = ()


class _Aborted(Exception):
    pass


class _Call:
    """The few ServicerContext methods the interceptor uses; `active`: its client is still there."""

    def __init__(self, metadata: list[tuple[str, str]], *, active: bool = True,
                 time_remaining: float | None = None) -> None:
        self._metadata = metadata
        self._active = active
        self._time_remaining = time_remaining
        self.trailing_metadata: tuple[tuple[str, str], ...] = ()

    def set_trailing_metadata(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.trailing_metadata = metadata

    def time_remaining(self) -> float | None:
        return self._time_remaining

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return self._metadata

    def is_active(self) -> bool:
        return self._active

    def peer(self) -> str:
        return "ipv4:127.0.0.1:40000"

    def abort_with_status(self, status: Any) -> None:
        self.aborted = status
        if not self._active:
            raise AssertionError(f"aborted with {status}")
        raise _Aborted(status.code)


def test_a_response_stream_closed_on_another_thread_ends_cleanly(mint: Callable[..., str]) -> None:
    """grpcio may leave a response stream unfinished (the client went away); whichever thread
    collects it closes it there, in a context that never held the RPC's values."""
    # In a context of its own: the stream's values stay set in it, as in a worker thread.
    contextvars.copy_context().run(_stream_closed_on_another_thread, mint)


def _stream_closed_on_another_thread(mint: Callable[..., str]) -> None:
    seen: list[str] = []

    def behavior(request: Any, context: Any) -> Iterator[str]:
        seen.append(current_principal().subject)
        yield "first"
        yield "second"

    handler = GalleryInterceptor(auth.Verifier(secret=JWT_SECRET)).intercept_service(
        lambda details: grpc.unary_stream_rpc_method_handler(behavior), _Details(METHOD),
    )
    assert handler is not None
    call = _Call([("authorization", f"Bearer {mint(sub='closer')}"), ("x-request-id", "req-7")], active=False)
    stream = handler.unary_stream(object(), call)
    assert next(stream) == "first" and seen == ["closer"]
    errors: list[BaseException] = []

    def close() -> None:
        try:
            stream.close()
        except BaseException as exc:  # noqa: BLE001 - what the test is about
            errors.append(exc)

    closer = threading.Thread(target=close)
    closer.start()
    closer.join()
    assert errors == []
    # This thread still holds the RPC's values: the other thread's close did not touch them.
    assert logs.request_id.get() == "req-7"


# -- metrics ----------------------------------------------------------------------------------


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
    assert unary.unary_unary(object(), _Call(token)) == "stats"
    assert unary.unary_unary(object(), _Call(token)) == "stats"
    with pytest.raises(_Aborted):
        unary.unary_unary(object(), _Call([]))  # no token
    labels = {"grpc_type": "unary", "grpc_service": SERVICE, "grpc_method": "GetStats"}
    assert value(metrics, "grpc_server_started_total", **labels) == 3
    assert value(metrics, "grpc_server_handled_total", **labels, grpc_code="OK") == 2
    assert value(metrics, "grpc_server_handled_total", **labels, grpc_code="Unauthenticated") == 1
    assert value(metrics, "gallery_refused_total", grpc_service=SERVICE, grpc_method="GetStats",
                 reason="TOKEN_MISSING") == 1  # what the code alone does not tell
    assert value(metrics, "grpc_server_handling_seconds_count", **labels) == 3
    assert 0 < value(metrics, "grpc_server_handling_seconds_sum", **labels) < 5


def test_a_stream_counts_once_it_ends(mint: Callable[..., str]) -> None:
    metrics = Metrics()

    def behavior(request: Any, context: Any) -> Iterator[str]:
        yield from ("a", "b")

    stream = _intercepted(metrics, f"/{SERVICE}/ReadEventContent",
                          grpc.unary_stream_rpc_method_handler(behavior))
    labels = {"grpc_type": "server_stream", "grpc_service": SERVICE, "grpc_method": "ReadEventContent"}
    answers = stream.unary_stream(object(), _Call([("authorization", f"Bearer {mint()}")]))
    assert next(answers) == "a"
    assert value(metrics, "grpc_server_started_total", **labels) == 1
    assert value(metrics, "grpc_server_handled_total", **labels, grpc_code="OK") == 0  # still open
    assert list(answers) == ["b"]
    assert value(metrics, "grpc_server_handled_total", **labels, grpc_code="OK") == 1


def test_a_stream_its_client_leaves_counts_as_cancelled(mint: Callable[..., str]) -> None:
    """grpcio closes the answer stream of a client that went (a video seek drops a download)."""
    metrics = Metrics()

    def behavior(request: Any, context: Any) -> Iterator[str]:
        yield from ("a", "b")

    stream = _intercepted(metrics, f"/{SERVICE}/ReadEventContent",
                          grpc.unary_stream_rpc_method_handler(behavior))
    answers = stream.unary_stream(object(), _Call([("authorization", f"Bearer {mint()}")]))
    assert next(answers) == "a"
    answers.close()
    labels = {"grpc_type": "server_stream", "grpc_service": SERVICE, "grpc_method": "ReadEventContent"}
    assert value(metrics, "grpc_server_handled_total", **labels, grpc_code="Canceled") == 1
    assert value(metrics, "grpc_server_handled_total", **labels, grpc_code="OK") == 0


def test_an_answer_its_client_left_before_counts_as_cancelled(
    mint: Callable[..., str], caplog: pytest.LogCaptureFixture,
) -> None:
    """A handler that returns after its client went (cancelled, or past its deadline: a device
    channel whose device vanished, a read stuck behind a lock) did not answer anyone."""
    metrics = Metrics()
    unary = _intercepted(metrics, f"/{SERVICE}/GetStats",
                         grpc.unary_unary_rpc_method_handler(lambda request, context: "stats"))
    token = [("authorization", f"Bearer {mint()}")]
    with caplog.at_level(logging.INFO, logger="gallery.access"):
        unary.unary_unary(object(), _Call(token, active=False))
    labels = {"grpc_type": "unary", "grpc_service": SERVICE, "grpc_method": "GetStats"}
    assert value(metrics, "grpc_server_handled_total", **labels, grpc_code="Canceled") == 1
    assert value(metrics, "grpc_server_handled_total", **labels, grpc_code="OK") == 0
    [line] = [r for r in caplog.records if r.getMessage() == "rpc"]
    assert line.code == "CANCELLED"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gallery.access"):  # its deadline passed meanwhile
        unary.unary_unary(object(), _Call(token, active=False, time_remaining=0.2))  # its cancel came first
        unary.unary_unary(object(), _Call(token, active=False, time_remaining=60))  # cancelled well before
    assert [r.code for r in caplog.records if r.getMessage() == "rpc"] == ["DEADLINE_EXCEEDED", "CANCELLED"]
    assert value(metrics, "grpc_server_handled_total", **labels, grpc_code="DeadlineExceeded") == 1
    assert value(metrics, "grpc_server_handled_total", **labels, grpc_code="Canceled") == 2


def test_the_access_line_names_the_device_and_where_the_call_came_from(
    mint: Callable[..., str], caplog: pytest.LogCaptureFixture,
) -> None:
    """The device a request names, even one its token does not grant, and the peer with the
    addresses Envoy forwards: an operator finds what one device did, or who keeps failing."""
    def behavior(request: Any, context: Any) -> str:
        current_principal().require(validation.device_id(request), auth.READ)
        return "ok"

    unary = GalleryInterceptor(auth.Verifier(secret=JWT_SECRET)).intercept_service(
        lambda details: grpc.unary_unary_rpc_method_handler(behavior), _Details(METHOD),
    )
    assert unary is not None
    token = ("authorization", f"Bearer {mint(devices=['cam1'])}")
    with caplog.at_level(logging.INFO, logger="gallery.access"):
        unary.unary_unary("cam1", _Call([token, ("x-forwarded-for", "203.0.113.7")]))
        with pytest.raises(_Aborted):
            unary.unary_unary("cam2", _Call([token]))
        with pytest.raises(_Aborted):
            unary.unary_unary("../etc", _Call([token]))  # not a device id: not named
    granted, denied, invalid = [r for r in caplog.records if r.getMessage() == "rpc"]
    assert (granted.code, granted.device, granted.forwarded_for) == ("OK", "cam1", "203.0.113.7")
    assert granted.peer == "ipv4:127.0.0.1:40000"
    assert (denied.reason, denied.device) == ("DEVICE_NOT_ALLOWED", "cam2")
    assert not hasattr(denied, "forwarded_for")
    assert invalid.reason == "INVALID_DEVICE_ID" and not hasattr(invalid, "device")
    assert logs.call_fields.get() is None  # nothing of the calls is left in this thread


@pytest.mark.parametrize(("offered", "kept"), [
    ("9f1c2d3e-4b5a-6978-8a9b-0c1d2e3f4a5b", True),  # Envoy's
    ("trace.7:span-2_x", True),
    ("x" * 129, False),
    ("id\nforged line", False),
    ("", False),
])
def test_a_callers_request_id_is_kept_only_in_a_plain_form(mint: Callable[..., str], offered: str, kept: bool) -> None:
    seen: list[str] = []
    unary = GalleryInterceptor(auth.Verifier(secret=JWT_SECRET)).intercept_service(
        lambda details: grpc.unary_unary_rpc_method_handler(lambda r, c: seen.append(logs.request_id.get())),
        _Details(METHOD),
    )
    assert unary is not None
    call = _Call([("authorization", f"Bearer {mint()}"), ("x-request-id", offered)])
    unary.unary_unary(object(), call)
    [request_id] = seen
    assert (request_id == offered) is kept
    assert re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", request_id)
    # The id the server made is returned to quote; a caller's own is not sent back.
    assert call.trailing_metadata == (() if kept else (("x-request-id", request_id),))


@pytest.mark.parametrize("error", [RuntimeError("a bug"), NotFound("EVENT_NOT_FOUND", "no such event")])
def test_an_error_keeps_the_request_id_made_beside_its_own_trailing_metadata(
    mint: Callable[..., str], error: Exception,
) -> None:
    def fail(request: Any, context: Any) -> None:
        raise error

    unary = GalleryInterceptor(auth.Verifier(secret=JWT_SECRET)).intercept_service(
        lambda details: grpc.unary_unary_rpc_method_handler(fail), _Details(METHOD),
    )
    assert unary is not None
    call = _Call([("authorization", f"Bearer {mint()}")])
    with pytest.raises(_Aborted):
        unary.unary_unary(object(), call)
    [made] = call.trailing_metadata
    assert made[0] == "x-request-id" and made in call.aborted.trailing_metadata
    assert any(key == "grpc-status-details-bin" for key, _ in call.aborted.trailing_metadata)
