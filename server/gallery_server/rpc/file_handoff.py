"""Lets Envoy send a stored file itself: the ext_authz Check asked before a REST download.

Streaming a file through grpcio and Envoy's transcoder costs the server and Envoy CPU for every
byte; Envoy's file_server filter reads the file and writes it to the client with neither
(BENCHMARKS.md, downloads). Envoy calls Check (envoy.service.auth.v3.Authorization, the ext_authz
filter in envoy/envoy.yaml) for `GET /api/gallery/{device}/events/{eventId}/content` and
`.../thumbnail` without conditional headers. When the bearer token may read the event, its media is
stored here with the recorded size (or it has a small thumbnail, asked for whole: _thumbnail) and
the request gets bytes by the server's own rules (downloads.unconditional_reply: the whole file, or
the one window a Range selects), the answer rewrites the path to FILES_PREFIX/<device>/<file>
(<event_id>, or <event_id>.thumb), which the file_server filter maps to the media folder, and sets
the Range to that window in the one form file_server reads (`bytes=first-last`), or removes a Range
the rules ignore. It adds the response headers the streaming path sends (downloads.content_headers)
and HANDOFF_HEADER, by which Envoy's Lua filter drops them from an error Envoy answers instead (the
file gone since).

Anything else is answered "go on unchanged": the request then reaches GetEventContent (or
GetEventThumbnail) through the transcoder, which answers it as it always did (401, 403, 404, 416,
an event still on its device). Check never refuses and authorization stays with that path: an error
here costs speed, not correctness (Envoy is told to go on when Check fails, failure_mode_allow).
Nor does Check let anything be read that the streaming path would not send to the same request: the
path it writes is built from validated ids, and only this route's file_server ever sees it.

Check needs no bearer token of its own (Envoy has none to give): on the gRPC port, where Envoy
does not stand in the way, a caller learns only what its token could read anyway.

The routes that hold a body before sending it on ask Check too, for the token alone (their
context extension says so): token_check.py answers them.
"""

from __future__ import annotations

import logging
import os
import pathlib
import re
import typing
import urllib.parse

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2 as authz_pb2
from envoy.service.auth.v3 import external_auth_pb2_grpc as authz_pb2_grpc
from google.rpc import status_pb2

from .. import auth, downloads, validation
from ..errors import GalleryError
from ..service import Gallery
from . import token_check
from .interceptor import on_behalf_of

log = logging.getLogger(__name__)

CHECK_METHOD = "/envoy.service.auth.v3.Authorization/Check"
# What the rewritten path starts with; envoy/envoy.yaml maps it to <data>/media/.
FILES_PREFIX = "/_gallery_media/"
HANDOFF_HEADER = "x-gallery-handoff"  # removed by Envoy's Lua filter before the client sees it
# Check runs on the few quick-read threads (rpc/server.py) and reads and hashes a thumbnail whole
# there: only one this small (a server-made one is a few tens of KiB). A larger one, up to
# GALLERY_MAX_THUMBNAIL_BYTES, is streamed by the server on its other threads: 8 clients asking
# for a 10 MB one took the quick reads' p50 from 3 to ~80 ms (review, 2026-12-01).
HANDOFF_THUMBNAIL_BYTES = 256 * 1024

_DOWNLOAD_PATH = re.compile(r"/api/gallery/([^/?#]+)/events/([^/?#]+)/(content|thumbnail)(?:\?.*)?", re.DOTALL)
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


class FileHandoff(authz_pb2_grpc.AuthorizationServicer):
    def __init__(self, gallery: Gallery, verifier: auth.Verifier) -> None:
        self._gallery = gallery
        self._verifier = verifier
        # What Envoy's virtual host adds to every other answer (envoy_config._headers_to_add),
        # which a file Envoy sends itself does not get.
        self._always = (
            *downloads.SAFETY_HEADERS, *((("vary", "origin"),) if gallery.settings.cors_origins else ()),
        )

    def Check(self, request, context):  # type: ignore[no-untyped-def]
        http = request.attributes.request.http
        on_behalf_of(request_id=http.headers.get("x-request-id", ""))  # the download's, in the logs
        if request.attributes.context_extensions.get(token_check.CHECK_KEY) == token_check.TOKEN:
            return token_check.check_token(self._verifier, dict(http.headers))  # a route that buffers
        try:
            return self._handoff(http.method, http.path, dict(http.headers)) or token_check.GO_ON
        except GalleryError:  # the streaming path answers it, with its status and details
            return token_check.GO_ON
        except Exception:  # noqa: BLE001 - never worse than the streaming path
            log.exception("file handoff failed; the download goes through the gRPC server")
            return token_check.GO_ON

    def _handoff(
        self, method: str, path: str, headers: dict[str, str],
    ) -> authz_pb2.CheckResponse | None:
        match = _DOWNLOAD_PATH.fullmatch(path)
        if method != "GET" or match is None:
            return None
        # Decoded as the transcoder decodes a path's variables: a device's %3A (tests/e2e/test_device_ids.py).
        device, event_id = (urllib.parse.unquote(part) for part in match.groups()[:2])
        principal = self._verifier.verify(auth.bearer_token(headers.get("authorization")))
        on_behalf_of(subject=principal.subject)
        if match[3] == "thumbnail":
            found = None if "range" in headers else self._thumbnail(principal, device, event_id)
        else:
            found = self._media(principal, device, event_id)
        if found is None:
            return None
        file, size, sha256, mime_type, name = found
        answer = downloads.unconditional_reply(headers, size, sha256)
        if answer is None:
            return None
        if answer.status == downloads.PARTIAL_CONTENT:
            window = f"bytes={answer.start}-{answer.start + answer.length - 1}"
            set_range, remove = [_header("range", window)], []
        else:
            set_range, remove = [], ["range"]  # a Range the rules ignore: the whole file
        response_headers = downloads.content_headers(answer, mime_type, name)
        # The access log's line is Check's: this one says what was let read (Envoy's own access
        # log, if kept, says what it then sent).
        log.info("download handed to envoy", extra={
            "device": device, "event_id": event_id, "file": file.name, "bytes": answer.length,
            "subject": principal.subject,
        })
        return authz_pb2.CheckResponse(
            status=status_pb2.Status(code=0),
            ok_response=authz_pb2.OkHttpResponse(
                # Both ids passed validation: neither holds a `/`, a `%` or a `..`.
                headers=[_header(":path", f"{FILES_PREFIX}{device}/{file.name}"), *set_range],
                headers_to_remove=remove,
                response_headers_to_add=[
                    _header(k, v)
                    for k, v in (*response_headers, *self._always, (HANDOFF_HEADER, "1"))
                ],
            ),
        )

    def _media(self, principal: auth.Principal, device: str, event_id: str) -> _Found | None:
        """The event's media, when its file is there with the recorded size (else the streaming
        path tells what is wrong) and its type is known."""
        event, file = self._gallery.stored_media(principal, device, event_id)
        try:
            if os.stat(file).st_size != event.size or not event.mime_type:
                return None
        except FileNotFoundError:
            return None
        return _Found(file, event.size, event.sha256, event.mime_type, event.name)

    def _thumbnail(self, principal: auth.Principal, device: str, event_id: str) -> _Found | None:
        """The event's thumbnail, read and hashed here as the streaming path reads it
        (Gallery.open_thumbnail), when it is at most HANDOFF_THUMBNAIL_BYTES.

        A thumbnail is replaced by rename only (one a pulled upload, a device's PUT or its drop
        folder brings over the server's own): Envoy then reads this one or the new one whole, the
        new one under this one's ETag, x-content-length and x-content-sha256, which tell a client
        that checks. A window of it could be neither's: a GET with a Range is left to the
        server, which reads and sends one open file."""
        path = self._gallery.storage.thumbnail_path(validation.device_id(device), validation.event_id(event_id))
        try:  # a look that spares the database read when there is no thumbnail or a large one
            if path.stat().st_size > HANDOFF_THUMBNAIL_BYTES:
                return None
        except OSError:  # none: the server's 404
            return None
        # The open file's size decides: one swapped for a larger one since the look is not read.
        content = self._gallery.open_thumbnail(principal, device, event_id, at_most=HANDOFF_THUMBNAIL_BYTES)
        if content is None:
            return None
        content.file.close()
        return _Found(path, content.size, content.sha256, content.mime_type, "")


class _Found(typing.NamedTuple):
    """A stored file Envoy may send, and what its answer says of it."""

    file: pathlib.Path
    size: int
    sha256: str
    mime_type: str
    name: str  # the Content-Disposition's filename; "" for none


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, value=value), append_action=_OVERWRITE
    )
