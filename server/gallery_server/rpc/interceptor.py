"""Cross-cutting work for every RPC: authentication, request ids, access logs, error mapping.

The interceptor wraps each method handler so that, inside the worker thread running the RPC:
- the bearer token is verified (except for the methods in PUBLIC_METHODS and health checks) and
  the Principal is available to the servicer through current_principal();
- reflection streams are counted (MAX_REFLECTION_STREAMS);
- a GalleryError becomes its mapped status; any other exception is logged with its traceback and
  becomes a generic INTERNAL, so no exception text reaches a client;
- one access-log line records method, code (CANCELLED or DEADLINE_EXCEEDED when the client was
  gone before the answer), reason, duration, subject, the device the request names (logs.note),
  peer, X-Forwarded-For and request id (never a token); a caller that sent no usable id (a
  native client on the direct port: Envoy always sends one) gets the one the server made in
  the trailing metadata, `x-request-id`, to quote;
- a request message that does not parse (text that is not UTF-8, bytes that are not protobuf)
  is INVALID_ARGUMENT `MALFORMED_REQUEST` once authentication passed, not grpcio's INTERNAL;
- a REST query that names one of the request's fields twice is INVALID_ARGUMENT
  `REPEATED_QUERY_PARAMETER`, where Envoy's transcoder would take the last value silently;
- the chunks of an upload's body and of a download skip protobuf's copies (chunks.py).
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import functools
import logging
import re
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from typing import Any

import grpc
from google.api import annotations_pb2
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import DecodeError

from .. import auth, logs
from ..errors import Busy, GalleryError, InvalidArgument, Unauthenticated
from ..metrics import CALL_TYPES, Metrics
from . import chunks, status, token_check

log = logging.getLogger("gallery.access")

# Methods that carry their own proof (signed URLs, the bearer token of the request Envoy asks
# about).
PUBLIC_METHODS = frozenset({
    "/gallery.v1.GalleryService/PutSignedUpload",
    "/gallery.v1.GalleryService/GetSignedUploadStatus",
    "/envoy.service.auth.v3.Authorization/Check",
})
# Health answers anyone: load balancers and Envoy's own checks carry no token. Its Watch holds no
# thread; Envoy does not route it from outside (envoy.yaml).
HEALTH_PREFIX = "/grpc.health.v1.Health/"
# Reflection needs a token like any call, and each of its streams holds a server thread while it
# waits for the client's next question (grpcurl asks, then waits): without a token or a count,
# a few hundred idle streams took every thread of the server.
REFLECTION_PREFIX = "/grpc.reflection."
MAX_REFLECTION_STREAMS = 4
# How close to its deadline a client that went counts as gone for the deadline (_Call.log).
DEADLINE_SLACK_SECONDS = 0.5
# X-Forwarded-For as a client sent it may be long; the access line keeps its start.
MAX_FORWARDED_CHARS = 256
# A request id the access log takes from the caller: Envoy's UUIDs, or a native client's own
# tracing id. Anything else (a direct client's kilobytes, or a value made to look like a second
# record) is replaced by one of the server's.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
REQUEST_ID_HEADER = "x-request-id"
# Where Envoy's transcoder keeps a REST request's path and query (the gRPC call has its own path).
ORIGINAL_PATH_HEADER = "x-envoy-original-path"

_principal: contextvars.ContextVar[auth.Principal] = contextvars.ContextVar("principal")


def _reset_here(var: contextvars.ContextVar[Any], token: contextvars.Token[Any]) -> None:
    """Undo `var.set` in a streaming RPC's generator. One left unfinished is closed by whichever
    thread collects it, whose context never held the value: there is nothing to undo there, and
    the ValueError reset would raise must not replace the generator's own exit."""
    with contextlib.suppress(ValueError):
        var.reset(token)


# The unary call being served on this thread, for on_behalf_of().
_serving: contextvars.ContextVar[_Call] = contextvars.ContextVar("gallery_call")


def on_behalf_of(*, request_id: str = "", subject: str = "") -> None:
    """For a handler that serves someone else's request, Envoy's Check of a REST download
    (file_handoff.py): the call's access line and the lines written meanwhile carry that request's
    id (when well-formed) instead of the id of Envoy's own call, which the access line keeps as
    `call_request_id` (on the direct port anyone may send a Check naming any id), and the subject
    its token named."""
    call = _serving.get(None)
    if call is None:
        return
    if _REQUEST_ID.fullmatch(request_id) and request_id != call.request_id:
        call.call_request_id = call.call_request_id or call.request_id
        call.request_id = request_id
        logs.request_id.set(request_id)  # the interceptor's reset restores what was before
    if subject:
        call.subject = subject


def current_principal() -> auth.Principal:
    """The verified caller of the RPC running in this thread."""
    try:
        return _principal.get()
    except LookupError:  # a public method asked: treat as unauthenticated
        raise Unauthenticated("TOKEN_MISSING", "missing bearer token") from None


class GalleryInterceptor(grpc.ServerInterceptor):
    def __init__(
        self, verifier: auth.Verifier, pools: Mapping[str, futures.ThreadPoolExecutor] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._verifier = verifier
        self._metrics = metrics
        # Methods that run on a pool of their own rather than the server's (rpc/server.py).
        self._pools = dict(pools or {})
        self._reflection_streams = threading.BoundedSemaphore(MAX_REFLECTION_STREAMS)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(HEALTH_PREFIX):
            return handler
        public = method in PUBLIC_METHODS
        if handler.response_streaming:
            behavior = handler.unary_stream or handler.stream_stream
        else:
            behavior = handler.unary_unary or handler.stream_unary
        behavior = _refusing_undecodable(behavior, handler.request_streaming)
        if method.startswith(REFLECTION_PREFIX):
            behavior = _counted(behavior, self._reflection_streams)
        call_type = CALL_TYPES[(handler.request_streaming, handler.response_streaming)]
        if handler.response_streaming:
            wrapped: Callable[..., Any] = self._wrap_stream(method, call_type, public, behavior)
        else:
            wrapped = self._wrap_unary(method, call_type, public, behavior)
        pool = self._pools.get(method)
        if pool is not None:
            # grpcio runs a behavior that carries this attribute on that executor instead of the
            # server's (grpc/_server.py, _select_thread_pool_for_behavior); a test checks it does.
            wrapped.experimental_thread_pool = pool  # type: ignore[attr-defined]
        factory = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(handler.request_streaming, handler.response_streaming)]
        return factory(
            wrapped,
            request_deserializer=_tolerant(method, handler.request_deserializer),
            response_serializer=(
                handler.response_serializer and chunks.serializer(handler.response_serializer)
            ),
        )

    def _wrap_unary(self, method: str, call_type: str, public: bool, behavior: Callable[..., Any]) -> Callable:
        def run(request: Any, context: grpc.ServicerContext) -> Any:
            call = _Call(method, call_type, context, self._metrics)
            serving = logs.request_id.set(call.request_id)
            noting = logs.call_fields.set(call.fields)
            this_call = _serving.set(call)
            try:
                token = self._enter(call, public)
                try:
                    _refuse_repeated_query_parameters(method, request, call.metadata)
                    return behavior(request, context)
                finally:
                    _principal.reset(token) if token else None
            except BaseException as exc:  # noqa: BLE001  (mapped, logged, re-raised by abort)
                call.fail(exc)
            finally:
                call.log()
                _serving.reset(this_call)
                logs.call_fields.reset(noting)
                logs.request_id.reset(serving)

        return run

    def _wrap_stream(self, method: str, call_type: str, public: bool, behavior: Callable[..., Any]) -> Callable:
        def run(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            call = _Call(method, call_type, context, self._metrics)
            serving = logs.request_id.set(call.request_id)
            noting = logs.call_fields.set(call.fields)
            try:
                token = self._enter(call, public)
                try:
                    _refuse_repeated_query_parameters(method, request, call.metadata)
                    yield from behavior(request, context)
                finally:
                    _reset_here(_principal, token) if token else None
            except BaseException as exc:  # noqa: BLE001
                call.fail(exc)
            finally:
                call.log()
                _reset_here(logs.call_fields, noting)
                _reset_here(logs.request_id, serving)

        return run

    def _enter(self, call: _Call, public: bool) -> contextvars.Token[auth.Principal] | None:
        if public:
            return None
        token = auth.bearer_token(call.metadata.get("authorization"))
        principal = self._verifier.verify(token)
        call.subject = principal.subject
        return _principal.set(principal)


def _refuse_repeated_query_parameters(method: str, request: Any, metadata: Mapping[str, str]) -> None:
    """A REST request (its path and query kept by the transcoder in x-envoy-original-path) whose
    query gives one of the request message's fields twice: the transcoder takes the last value
    (`media_type=video&media_type=image` listed images; `filename=a.mp4&filename=b.mp4` signed a
    URL for b.mp4) and says nothing. Unknown names stay ignored, repeated or not. A request
    stream (an upload) takes nothing from its query."""
    path = metadata.get(ORIGINAL_PATH_HEADER, "")
    if "?" not in path or not hasattr(request, "DESCRIPTOR"):
        return
    counts = collections.Counter(name for name, _ in urllib.parse.parse_qsl(path.partition("?")[2],
                                                                            keep_blank_values=True))
    if len(counts) == counts.total():
        return
    fields = _query_names(method, request.DESCRIPTOR)
    # Counted once each: public methods (no token) run this too, on queries of up to 32 KiB.
    for name in (name for name, count in counts.items() if count > 1 and name in fields):
        raise InvalidArgument(
            "REPEATED_QUERY_PARAMETER", f"query parameter {name!r} is given more than once: give it once",
            field=name,
        )


@functools.cache
def _query_names(method: str, descriptor: Descriptor) -> frozenset[str]:
    """The names a REST query may give the single fields of `method`'s request (`descriptor`):
    each one's own and its JSON name, but those its path binds, which a query cannot change
    (README: the path alone names them). A repeated field takes a name more than once by design
    (`?sha256s=...&sha256s=...` adds two to FindExistingChecksums')."""
    bound: set[str] = set()
    with contextlib.suppress(KeyError):  # a method of no REST binding: nothing bound
        rule = descriptor.file.pool.FindMethodByName(method.strip("/").replace("/", ".")).GetOptions().Extensions[
            annotations_pb2.http]
        for binding in (rule, *rule.additional_bindings):
            kind = binding.WhichOneof("pattern")
            template = binding.custom.path if kind == "custom" else getattr(binding, kind or "get")
            bound.update(re.findall(r"\{([^}=]+)", template))
    return frozenset(name for field in descriptor.fields if field.name not in bound and not field.is_repeated
                     for name in (field.name, field.json_name))


def _counted(behavior: Callable[..., Iterator[Any]], slots: threading.BoundedSemaphore) -> Callable:
    """A streaming `behavior` that runs only with one of `slots`, held until its stream ends;
    RESOURCE_EXHAUSTED `TOO_MANY_REFLECTION_STREAMS` when none is free."""

    def run(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        if not slots.acquire(blocking=False):
            raise Busy(
                "TOO_MANY_REFLECTION_STREAMS",
                f"at most {MAX_REFLECTION_STREAMS} reflection streams at once on a server: "
                "close one, or retry later",
                limit=str(MAX_REFLECTION_STREAMS),
            )
        try:
            yield from behavior(request, context)
        finally:
            slots.release()

    return run


class _Undecodable:
    """A request the protobuf runtime could not parse, kept so the RPC can answer a clean 400.

    Envoy puts path and query values into string fields byte for byte, so `?page_token=%FF` is a
    string that is not UTF-8; grpcio would answer it with INTERNAL ("Exception deserializing
    request!"), a 500 through Envoy, before any of our code ran."""


def _tolerant(
    method: str, deserializer: Callable[[bytes], Any] | None,
) -> Callable[[bytes], Any] | None:
    """`method`'s deserializer, answering _Undecodable instead of raising DecodeError; an
    upload's body messages are decoded without copying their bytes (chunks.py)."""
    if deserializer is None:
        return None
    deserializer = chunks.deserializer(method, deserializer)

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError:
            return _Undecodable()

    return deserialize


def _malformed() -> InvalidArgument:
    return InvalidArgument(
        "MALFORMED_REQUEST", "the request is not a valid message (e.g. text that is not UTF-8)"
    )


def _refusing_undecodable(behavior: Callable[..., Any], streaming: bool) -> Callable[..., Any]:
    """Raise MALFORMED_REQUEST where the servicer would have met an undecodable message."""

    def checked(messages: Iterator[Any]) -> Iterator[Any]:
        for message in messages:
            if isinstance(message, _Undecodable):
                raise _malformed()
            yield message
            del message  # not held while the next one is awaited (an upload chunk is 1-4 MiB)

    def call(request: Any, context: grpc.ServicerContext) -> Any:
        if streaming:
            return behavior(checked(request), context)
        if isinstance(request, _Undecodable):
            raise _malformed()
        return behavior(request, context)

    return call


class _Call:
    """Bookkeeping of one RPC for the access log and the metrics."""

    def __init__(
        self, method: str, call_type: str, context: grpc.ServicerContext, metrics: Metrics | None,
    ) -> None:
        self.method = method
        self.call_type = call_type
        self.metrics = metrics
        self.context = context
        self.metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        offered = self.metadata.get(REQUEST_ID_HEADER, "")
        # The id made for a caller that sent none it could use, returned in the trailing metadata
        # (with the answer's status, in the batch grpcio sends anyway): a native client on the
        # direct port can quote it, as a REST client quotes the header Envoy returns.
        self.made_id: tuple[tuple[str, str], ...] = ()
        if _REQUEST_ID.fullmatch(offered):
            self.request_id = offered
        else:
            self.request_id = uuid.uuid4().hex
            self.made_id = ((REQUEST_ID_HEADER, self.request_id),)
            context.set_trailing_metadata(self.made_id)
        self.call_request_id = ""  # this call's own id, when it serves another request's (on_behalf_of)
        self.subject = ""
        self.fields: dict[str, str | list[str]] = {}  # logs.note(): what the call is about (its device)
        self.code = "OK"
        self.reason = ""
        self.started = time.perf_counter()
        if metrics is not None:
            metrics.call_started(call_type, method)
        if log.isEnabledFor(logging.DEBUG):
            # Names only: the values carry bearer tokens (authorization) and, for a transcoded
            # PUT, the path with its signed-URL token is not in the metadata at all.
            log.debug("rpc started", extra={"method": method, "request_id": self.request_id,
                                            "metadata_keys": sorted(self.metadata)})

    def fail(self, exc: BaseException) -> None:
        if isinstance(exc, GalleryError):
            mapped = status.to_status(exc, self.made_id)
            self.code, self.reason = mapped.code.name, exc.reason
            self.context.abort_with_status(mapped)
        if isinstance(exc, GeneratorExit):  # grpcio closed the answer stream: its client went
            self.code = "CANCELLED"
            raise exc
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise exc
        if not self.context.is_active():  # the client went away: nothing to report to it
            self.code = "CANCELLED"
            raise exc
        self.code = "INTERNAL"
        log.error("unexpected error in %s", self.method, exc_info=exc,
                  extra={"request_id": self.request_id})
        self.context.abort_with_status(status.internal_status(self.made_id))

    def log(self) -> None:
        """The call's access line, and its count and duration in the metrics."""
        seconds = time.perf_counter() - self.started
        if self.code == "OK" and not self.context.is_active():
            # The handler finished after its client had gone (cancelled, or past its deadline):
            # the client never got this answer (a device channel whose device vanished ends so).
            # grpcio: 0 once past the deadline; huge, or None, without one. The client cancels at
            # its own deadline, which the server's trails by the request's way there: a client that
            # went within DEADLINE_SLACK_SECONDS of it went for the deadline.
            remaining = self.context.time_remaining()
            past = remaining is not None and remaining <= DEADLINE_SLACK_SECONDS
            self.code = "DEADLINE_EXCEEDED" if past else "CANCELLED"
        if self.metrics is not None:
            self.metrics.call_finished(self.call_type, self.method, self.code, seconds, self.reason)
        # A token Envoy had checked before a request's body (token_check.py) is the request's own
        # line to tell: the check's is debug's, but for a refusal, which no server line tells.
        level = logging.DEBUG if self.fields.keys() == {token_check.PASSED} else logging.INFO
        log.log(
            level,
            "rpc",
            extra={
                "method": self.method,
                "code": self.code,
                "reason": self.reason,
                "subject": self.subject,
                **self.fields,
                # Where the call came from: the peer (Envoy, for calls through it) and the client
                # addresses Envoy puts in X-Forwarded-For (the last one is the one it saw).
                "peer": self.context.peer(),
                **({"forwarded_for": forwarded[:MAX_FORWARDED_CHARS]}
                   if (forwarded := self.metadata.get("x-forwarded-for")) else {}),
                "request_id": self.request_id,
                **({"call_request_id": self.call_request_id} if self.call_request_id else {}),
                "duration_ms": round(seconds * 1000, 2),
            },
        )
