"""The interceptor's per-RPC state (the caller, the request id) across grpcio's threads."""

from __future__ import annotations

import contextvars
import dataclasses
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from gallery_server import auth, logs
from gallery_server.rpc.interceptor import GalleryInterceptor, current_principal

from ..conftest import JWT_SECRET

METHOD = "/gallery.v1.GalleryService/DownloadEvent"


@dataclasses.dataclass
class _Details:
    method: str
    invocation_metadata: tuple[tuple[str, str], ...] = ()


class _FinishedCall:
    """The few ServicerContext methods the interceptor uses, of an RPC whose client has gone."""

    def __init__(self, metadata: list[tuple[str, str]]) -> None:
        self._metadata = metadata

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return self._metadata

    def is_active(self) -> bool:
        return False

    def abort_with_status(self, status: Any) -> None:
        raise AssertionError(f"aborted with {status}")


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
    call = _FinishedCall([("authorization", f"Bearer {mint(sub='closer')}"), ("x-request-id", "req-7")])
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
