"""GalleryService over gRPC: converts messages to domain calls and domain results to messages.

Authentication happened in the interceptor; authorization and validation happen in the domain.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.api.httpbody_pb2 import HttpBody
from google.protobuf import json_format
from google.protobuf.struct_pb2 import Struct

from gallery.v1 import gallery_pb2 as pb
from gallery.v1 import gallery_pb2_grpc

from .. import downloads, validation
from ..auth import DEVICE, WRITE, Principal
from ..devices import Devices, PullStatus
from ..errors import InvalidArgument, PermissionDenied
from ..forms import FormReceiver
from ..listing import ListingAnswer, Printed
from ..models import Event
from ..resumable import SessionState
from ..service import Gallery
from ..signed_urls import THUMBNAIL, SignedTarget, SignedUploads, SignedUploadState
from ..uploads import Uploader
from . import chunks
from .interceptor import ORIGINAL_PATH_HEADER, current_principal
from .status import HTTP_STATUS_HEADER

# Where ListEvents returns the next page's token (empty after the last page).
NEXT_PAGE_TOKEN_HEADER = "x-next-page-token"
# A listing changes with every upload: a browser or proxy may keep it for its own user, but asks
# each time (If-None-Match with the page's ETag, answered 304 while it is current).
_LISTING_CACHING = ("cache-control", "private, no-cache")
# Set by Envoy from the HTTP Content-Length (envoy/envoy.yaml), which transcoding drops; its
# header_mutation filter does it, and removes a client's own. The REST reads' route skips that
# filter, so a method it takes must never read this header.
CONTENT_LENGTH_HEADER = "x-gallery-content-length"
# Set by Envoy's Lua filter on a REST HEAD, which it sends on as the GET it mirrors, and removed
# from every other request it sees: a download then answers its headers and no bytes, and names
# the length a GET would get in BODY_LENGTH_HEADER, which the Lua filter makes the Content-Length.
# The REST reads' route skips that filter, so a method it takes must never read this header.
HEAD_HEADER = "x-gallery-head"
# The REST path of a pre-signed PUT, which the transcoder keeps in x-envoy-original-path.
_SIGNED_PUT_PATH = re.compile(r"/api/gallery/([^/?#]+)/upload/([^/?#]+)/?(?:\?.*)?", re.DOTALL)
BODY_LENGTH_HEADER = "x-gallery-body-length"
# A thumbnail up to this size is taken whole by Envoy, whatever its client does (Envoy's stream
# window to this server, initial_stream_window_size in envoy/envoy.yaml), so it holds no thread for
# long and takes no download slot: a gallery page asks for dozens of thumbnails at once. A larger
# one (up to GALLERY_MAX_THUMBNAIL_BYTES) can leave its handler blocked in a send: counted like
# content.
SENT_WITHOUT_WAITING = 1 << 20


class GalleryServicer(gallery_pb2_grpc.GalleryServiceServicer):
    def __init__(
        self,
        gallery: Gallery,
        signed: SignedUploads,
        devices: Devices,
        principal: Callable[[], Principal] = current_principal,
    ) -> None:
        self.gallery = gallery
        self.signed = signed
        self.devices = devices
        self.resumable = signed.uploads  # one set of sessions for native and pre-signed uploads
        # Who is calling; the interceptor's verified principal unless a test injects one.
        self.principal = principal

    def _uploader(self, *scopes: str) -> Uploader:
        """The caller of an upload stream, refused before it holds a thread awaiting its first
        message unless its token has one of `scopes`: a read-only token can store nothing."""
        principal = self.principal()
        principal.require_scope(*scopes)
        return Uploader.of(principal)

    def GetDevicePaths(self, request, context):  # type: ignore[no-untyped-def]
        incoming, thumbnails = self.gallery.device_paths(
            self.principal(), request.device, make=HEAD_HEADER not in _request_headers(context))
        return pb.GetDevicePathsResponse(
            success=True,
            paths=pb.DevicePaths(incoming=str(incoming), thumbnails=str(thumbnails)),
        )

    def ListEvents(self, request, context):  # type: ignore[no-untyped-def]
        answer = self._list(request, context, "rows")
        if answer.page is None:
            return
        # A page holds no metadata: 1,000 events are at most ~1.4 MiB (names of 255 four-byte
        # characters), which Envoy takes whole (its stream window and buffer, ~2 MiB), whatever its
        # client does. Not counted: only a client connected directly that stops reading could
        # hold this thread, and only until the watch ends it.
        yield from self.gallery.watch_download(map(event_message, answer.page), context.cancel)

    def ListEventsJson(self, request, context):  # type: ignore[no-untyped-def]
        answer = self._list(request, context, "json")
        return HttpBody(content_type="application/json", data=answer.page or b"")

    def _list(self, request: pb.ListEventsRequest, context: grpc.ServicerContext, printed: Printed) -> ListingAnswer:
        """A listing's answer, its headers sent: the next page's token (the REST body is the
        documented top-level array, so it travels as a header) and the page's entity-tag; or, when
        If-None-Match names that tag, 304 and no page."""
        headers = _request_headers(context)
        answer = self.gallery.list_answer(
            self.principal(), request.device, printed, if_none_match=headers.get("if-none-match", ""),
            if_match=headers.get("if-match"), **_listing_request(request),
        )
        if answer.page is None:
            context.send_initial_metadata(
                ((HTTP_STATUS_HEADER, str(downloads.NOT_MODIFIED)), (downloads.ETAG, answer.etag), _LISTING_CACHING)
            )
        elif answer.etag:
            context.send_initial_metadata(
                ((NEXT_PAGE_TOKEN_HEADER, answer.next_page_token), (downloads.ETAG, answer.etag), _LISTING_CACHING)
            )
        else:  # the listing versions are not this release's (Listing): no tag to give
            context.send_initial_metadata(((NEXT_PAGE_TOKEN_HEADER, answer.next_page_token), _LISTING_CACHING))
        return answer

    def GetEvent(self, request, context):  # type: ignore[no-untyped-def]
        event = self.gallery.get_event(self.principal(), request.device, request.event_id)
        message = event_message(event, with_metadata=True)
        _set_pull(message.pull, self.devices.pull_status(event.id))
        return message

    def PullEvent(self, request, context):  # type: ignore[no-untyped-def]
        result = self.devices.pull(
            self.principal(), request.device, request.event_id, wait=request.wait,
            client_waiting=context.is_active,
        )
        response = pb.PullEventResponse(
            success=result.success, event_id=result.event.id, state=result.event.state
        )
        _set_pull(response.pull, result.pull)
        return response

    def GetEventContent(self, request, context):  # type: ignore[no-untyped-def]
        principal = self.principal()
        content = self.gallery.open_content(principal, request.device, request.event_id)
        yield from _http_download(self.gallery, principal, context, content, counted_above=0)

    def GetEventThumbnail(self, request, context):  # type: ignore[no-untyped-def]
        principal = self.principal()
        content = self.gallery.open_thumbnail(principal, request.device, request.event_id)
        yield from _http_download(self.gallery, principal, context, content, counted_above=SENT_WITHOUT_WAITING)

    def ReadEventContent(self, request, context):  # type: ignore[no-untyped-def]
        downloads.check_read(request.read_offset, request.read_limit)
        principal = self.principal()
        content = self.gallery.open_content(principal, request.device, request.event_id)
        with content.file:
            start, length = downloads.read_window(
                content.size, request.read_offset, request.read_limit
            )
            with self.gallery.download_slot(principal) if length else contextlib.nullcontext():
                context.send_initial_metadata((
                    (downloads.ETAG, downloads.etag(content.sha256)),
                    (downloads.SIZE, str(content.size)),
                    (downloads.SHA256, content.sha256),
                ))
                chunks = map(_read_content_message, downloads.read_chunks(content.file, start, length))
                yield from self.gallery.watch_download(chunks, context.cancel)

    def GetStats(self, request, context):  # type: ignore[no-untyped-def]
        stats = self.gallery.stats(self.principal(), request.device)
        quota = stats.quota
        return pb.GetStatsResponse(
            total_events=stats.total_events,
            total_size=stats.total_size,
            by_type={
                media: pb.TypeStats(count=t.count, size=t.size) for media, t in stats.by_type.items()
            },
            quota=None if quota is None else pb.DeviceQuota(
                limit_bytes=quota.limit, used_bytes=quota.used, available_bytes=quota.available,
            ),
        )

    def DeleteEvent(self, request, context):  # type: ignore[no-untyped-def]
        headers = _request_headers(context)
        self.gallery.delete_event(self.principal(), request.device, request.event_id,
                                  if_match=headers.get("if-match"), if_none_match=headers.get("if-none-match"))
        return pb.DeleteEventResponse(success=True)

    def CreateUploadUrl(self, request, context):  # type: ignore[no-untyped-def]
        # A HEAD is safe (RFC 9110): the GET's answer, for URLs that were never issued.
        urls = self.signed.create_urls(
            self.principal(), request.device, request.filename, thumbnail=request.thumbnail,
            issue=HEAD_HEADER not in _request_headers(context),
        )
        response = pb.CreateUploadUrlResponse(
            success=True, upload_url=urls.media_url, event_id=urls.event_id
        )
        if urls.thumbnail_url:
            response.thumbnail_upload_url = urls.thumbnail_url
        response.expires_at.FromDatetime(urls.expires_at)
        return response

    def UploadEvent(self, request_iterator, context):  # type: ignore[no-untyped-def]
        request_iterator = self.gallery.watch_upload(
            request_iterator, context.cancel, on_end=context.add_callback,
            caller=self._uploader(WRITE, DEVICE),  # a device answers a pull with DEVICE alone
        )
        header = _first(request_iterator)
        if header.WhichOneof("part") != "header":
            raise InvalidArgument(
                "HEADER_REQUIRED", "the first message of an upload must be its header",
                field="header",
            )
        h = header.header
        settings = self.gallery.settings
        principal = self.principal()
        # A device answering a pull fills its announced event; anyone else creates a new one.
        announced = (
            self.devices.pulled_event(principal, h.device, h.event_id) if h.event_id else None
        )
        upload = (
            self.gallery.open_upload(h.device) if announced
            else self.gallery.begin_upload(principal, h.device)
        )
        with upload:
            fields = upload.fields
            fields.name = h.name
            fields.media_type = h.media_type
            fields.metadata_json = metadata_json(h.metadata, settings.max_metadata_bytes)
            # Before the size and the body: a retry of a capture stored already takes no room.
            fields.device_event_id = validation.device_event_id(h.device_event_id)
            if h.HasField("size"):
                upload.declare_size(h.size)
            fields.declared_sha256 = h.sha256
            if announced:
                upload.fill(announced)
            upload.write_media(b"")  # no media chunks at all is a valid, empty file
            finished = False
            for message in request_iterator:
                part = message.WhichOneof("part")
                if finished:
                    raise InvalidArgument(
                        "FINISH_NOT_LAST", "nothing may follow the finish message", field="finish"
                    )
                if part == "media_chunk":
                    upload.write_media(message.media_chunk)
                elif part == "thumbnail_chunk":
                    upload.write_thumbnail(message.thumbnail_chunk)
                elif part == "finish":
                    finished = True
                    if message.finish.HasField("size"):
                        upload.declare_size(message.finish.size)
                    fields.declare_sha256(message.finish.sha256)
                elif part == "header":
                    raise InvalidArgument(
                        "HEADER_REPEATED", "only the first message may be a header",
                        field="header",
                    )
                else:  # nothing set: an empty message, or a part only a newer client knows
                    raise InvalidArgument(
                        "PART_REQUIRED",
                        "an upload message must carry one of header, media_chunk, thumbnail_chunk"
                        " or finish",
                        field="part",
                    )
                # Drop this chunk before waiting for the next: one message less held per upload.
                del message
            _require_active(context)
            if not finished:
                raise InvalidArgument(
                    "UPLOAD_NOT_FINISHED",
                    "the stream ended without a finish message: it may have been cut short, "
                    "so nothing was stored",
                    field="finish",
                )
            event = self.gallery.store(
                upload, fill=announced,
                before_insert=self.devices.complete_pull if announced else None,
            )
        return pb.UploadEventResponse(success=True, event_id=event.id)

    def StartUpload(self, request, context):  # type: ignore[no-untyped-def]
        return _session_message(self.resumable.start(
            self.principal(),
            request.device,
            name=request.name,
            media_type=request.media_type,
            metadata_json=metadata_json(request.metadata, self.gallery.settings.max_metadata_bytes),
            size=request.size if request.HasField("size") else None,
            sha256=request.sha256,
            upload_id=request.upload_id,
            dedupe=request.dedupe,
            device_event_id=request.device_event_id,
        ))

    def QueryUpload(self, request, context):  # type: ignore[no-untyped-def]
        return _session_message(
            self.resumable.query(self.principal(), request.device, request.upload_id)
        )

    def WriteUpload(self, request_iterator, context):  # type: ignore[no-untyped-def]
        # Resumable bytes go to the session file, not a StagedFile: the disk headroom is checked
        # as the messages arrive.
        request_iterator = self.gallery.watch_upload(
            request_iterator, context.cancel, size_of=lambda m: len(m.data), first_carries_data=True,
            on_end=context.add_callback, caller=self._uploader(WRITE),
        )
        first = next(request_iterator, None)
        if first is None or not first.upload_id:
            raise InvalidArgument(
                "FIRST_WRITE_REQUIRED",
                "the first message of a write must name device, upload_id and write_offset",
                field="upload_id",
            )
        # Takes the device's upload slot, if there is anything to write, before the session's lock.
        writer = self.resumable.open_write(
            self.principal(), first.device, first.upload_id, first.write_offset
        )
        try:
            if writer.done is not None:  # completed before: never stored twice
                return _session_message(writer.done)
            message, finished = first, False
            while True:
                if finished:
                    raise InvalidArgument(
                        "FINISH_NOT_LAST", "nothing may follow finish_write", field="finish_write"
                    )
                if (message.upload_id and message.upload_id != first.upload_id) or (
                    message.device and message.device != first.device
                ):
                    raise InvalidArgument(
                        "UPLOAD_ID_CHANGED", "every message of a write names the same upload",
                        field="upload_id",
                    )
                writer.write(message.data)
                finished = message.finish_write
                del message  # not held while the next one is awaited
                message = next(request_iterator, None)
                if message is None:
                    break
            # Every message received is whole: committing them is right even if the client
            # was cancelled. Only finishing needs the client to have meant the end.
            writer.commit()
            if finished:
                _require_active(context)
                return _session_message(writer.finish())
            return _session_message(writer.state())
        finally:
            writer.commit_quietly()
            writer.close()

    def FindExistingChecksums(self, request, context):  # type: ignore[no-untyped-def]
        existing = self.resumable.find_existing(
            self.principal(), request.device, list(request.sha256s)
        )
        return pb.FindExistingChecksumsResponse(existing=existing)

    def UploadEventForm(self, request_iterator, context):  # type: ignore[no-untyped-def]
        request_iterator = self.gallery.watch_upload(
            request_iterator, context.cancel, on_end=context.add_callback, caller=self._uploader(WRITE),
        )
        first = _first(request_iterator)
        with self.gallery.begin_upload(self.principal(), first.device) as upload:
            form = FormReceiver(
                upload,
                first.http_body.content_type,
                max_metadata_bytes=self.gallery.settings.max_metadata_bytes,
            )
            # Each piece is read once: a parsed message's bytes field is copied on every read.
            form.feed(piece := first.http_body.data)
            received = len(piece)
            del first, piece  # chunks are dropped once parsed: memory per upload in flight
            for message in request_iterator:
                form.feed(piece := message.http_body.data)
                received += len(piece)
                del message, piece
            _require_active(context)
            _require_whole_body(_declared_body_length(context), received)
            form.finish()
            event = self.gallery.store(upload)
        return pb.UploadEventResponse(success=True, event_id=event.id)

    def PutSignedUpload(self, request_iterator, context):  # type: ignore[no-untyped-def]
        headers = _request_headers(context)
        content_range = headers.get("content-range", "")
        # The URL is verified before its stream waits for anything, from the REST path Envoy
        # keeps: made-up URLs, headers only, took every place of the pre-signed PUTs and refused
        # every device's, and used ones its token's part; and a URL's PUT counts against the part
        # of the token that asked for it (uploads.UploadSlots), else a token's URLs and its own
        # streams added up to the total.
        declared = _declared_body_length(context)
        early = ranged = None
        if (path := _SIGNED_PUT_PATH.fullmatch(headers.get(ORIGINAL_PATH_HEADER, ""))) is not None:
            device, token = (urllib.parse.unquote(part) for part in path.groups())
            early = self.signed.verify(validation.device_id(device), token)
            ranged = self.signed.check_put(early, content_range, declared)
        # A range PUT writes a session file, not a StagedFile: free space is checked as it streams.
        request_iterator = self.gallery.watch_upload(
            request_iterator, context.cancel,
            size_of=(lambda m: len(m.http_body.data)) if content_range else None,
            on_end=context.add_callback, caller=early.uploader if early is not None else None,
        )
        first = _first(request_iterator)
        target = self.signed.verify(validation.device_id(first.device), first.token)
        if early is not None and target != early:  # counted as another URL's PUT
            raise PermissionDenied("URL_SIGNATURE_INVALID", "the upload URL is not the one in the request's path")
        self.signed.check_body_type(first.http_body.content_type)
        if early is None:  # a native call: its URL, and so its token, is known only now
            ranged = self.signed.check_put(target, content_range, declared)
        with self.gallery.held_upload(target.uploader if early is None else None, on_end=context.add_callback):
            if ranged is not None:
                return self._put_range(context, target, ranged, declared, first, request_iterator)
            assert declared is not None  # check_put refused a whole PUT without it
            settings = self.gallery.settings
            thumbnail = target.purpose == THUMBNAIL
            with self.gallery.open_upload(
                target.device, max_media_bytes=settings.max_thumbnail_bytes if thumbnail else None,
                media_is="thumbnail" if thumbnail else "event",
            ) as upload:
                upload.expect_media_size(declared)  # the Content-Length: refused before any byte
                upload.write_media(first.http_body.data)
                del first  # each chunk is dropped once written (memory per upload in flight)
                for message in request_iterator:
                    upload.write_media(message.http_body.data)
                    del message
                _require_active(context)
                _require_whole_body(declared, upload.media.size)
                event_id = self.signed.complete(target, upload)
            return pb.UploadEventResponse(success=True, event_id=event_id)

    def _put_range(self, context, target: SignedTarget, content_range: downloads.ContentRange,  # type: ignore[no-untyped-def]
                   declared: int | None, first, request_iterator):
        """A resumable PUT (Content-Range): 200 with the event id once the file is complete, else
        308 with the committed size (GCS's "resume incomplete")."""
        # A put that opens its session's writer holds the device's upload slot (the writer's).
        put = self.signed.open_range(target, content_range, declared)
        try:
            if put.done:  # the URL's event is stored: answer it, store nothing
                return pb.UploadEventResponse(success=True, event_id=put.done)
            put.write_all(_body_pieces(itertools.chain([first], request_iterator)))
            # What arrived is committed either way (close()); only a whole chunk may finish.
            _require_whole_body(declared, put.received)
            state = put.finish()
        finally:
            put.close()
        if state.complete:
            return pb.UploadEventResponse(success=True, event_id=state.event_id)
        context.send_initial_metadata([(HTTP_STATUS_HEADER, "308"), *_upload_state_headers(state)])
        return pb.UploadEventResponse(success=True, event_id="")

    def GetSignedUploadStatus(self, request, context):  # type: ignore[no-untyped-def]
        state = self.signed.status(validation.device_id(request.device), request.token)
        context.send_initial_metadata(_upload_state_headers(state))
        message = pb.SignedUploadStatus(
            success=True, event_id=state.event_id, committed_size=float(state.committed_size),
            size=float(state.size), complete=state.complete,
        )
        message.expires_at.FromDatetime(state.expires_at)
        return message


def _upload_state_headers(state: SignedUploadState) -> list[tuple[str, str]]:
    """A pre-signed upload's state as response headers: for HEAD, and for a 308's client."""
    headers = [
        ("x-committed-size", str(state.committed_size)),
        ("x-upload-complete", "true" if state.complete else "false"),
        ("x-event-id", state.event_id),
    ]
    if state.committed_size:  # GCS's form; absent while nothing is committed, as there
        headers.append(("range", f"bytes=0-{state.committed_size - 1}"))
    return headers


def _listing_request(request: pb.ListEventsRequest) -> dict[str, Any]:
    return {
        "media_type": request.media_type,
        "since": request.since,
        "until": request.until,
        "order": request.order,
        "limit": request.limit if request.HasField("limit") else None,
        "offset": request.offset if request.HasField("offset") else None,
        "page_token": request.page_token,
    }


def event_message(event: Event, *, with_metadata: bool = False) -> pb.Event:
    message = pb.Event(
        id=event.id,
        name=event.name,
        media_type=event.media_type,
        size=float(event.size),
        has_thumbnail=event.has_thumbnail,
        mime_type=event.mime_type,
        sha256=event.sha256,
        state=event.state,
    )
    message.created.FromDatetime(event.created)
    if with_metadata:
        message.metadata.SetInParent()  # present even when empty: `"metadata": {}`
        metadata = json.loads(event.metadata_json)
        if event.media_info_json and "media" not in metadata:
            # What the server read from the file; never over what the device sent.
            metadata["media"] = json.loads(event.media_info_json)
        message.metadata.update(metadata)
    return message


def metadata_json(struct: Struct, max_bytes: int) -> str:
    """A metadata Struct as validated JSON text (the same rules as the REST form field)."""
    try:
        value = json_format.MessageToDict(struct)
    except ValueError:  # NaN and infinities, which JSON cannot carry
        raise InvalidArgument(
            "INVALID_METADATA", "metadata numbers must be finite", field="metadata"
        ) from None
    return validation.metadata_object(value, max_bytes)


def _session_message(state: SessionState) -> pb.UploadSession:
    message = pb.UploadSession(
        upload_id=state.upload_id, committed_size=state.committed_size, event_id=state.event_id
    )
    message.expires_at.FromDatetime(state.expires_at)
    return message


def _set_pull(message: pb.PullStatus, status: PullStatus | None) -> None:
    if status is None:
        return
    message.state = status.state
    message.error = status.error
    message.requested.FromDatetime(status.requested)
    message.expires_at.FromDatetime(status.expires_at)


_http_body_message = chunks.bytes_message(HttpBody, "data")
_read_content_message = chunks.bytes_message(pb.ReadEventContentResponse, "data")


def _http_download(
    gallery: Gallery, principal: Principal, context: grpc.ServicerContext, content: downloads.Content, *,
    counted_above: int,
) -> Iterator[HttpBody | chunks.Encoded]:
    """Answer a download as the request's Range and conditional headers ask (downloads.reply).
    More than `counted_above` bytes to send take one of the server's download slots
    (Gallery.download_slot): a HEAD, a 304, a 412 or a 416 sends none."""
    with content.file:
        request = _request_headers(context)
        reply = downloads.reply(
            content.size, content.sha256,
            range_header=request.get("range", ""),
            if_match=request.get("if-match"),
            if_none_match=request.get("if-none-match", ""),
            if_range=request.get("if-range", ""),
        )
        metadata = [
            (HTTP_STATUS_HEADER, str(reply.status)), *reply.headers,
            *downloads.disposition_headers(content.filename),
        ]
        sent = reply.length
        if HEAD_HEADER in request:
            metadata.append((BODY_LENGTH_HEADER, str(reply.length)))
            sent = 0
        elif reply.status in downloads.REFUSED_WITHOUT_BODY:
            # Named for the Lua filter: a 412 or a 416 with no body is sent with Content-Length 0
            # and no Content-Type (the file's would name a body it has not), not chunked.
            metadata.append((BODY_LENGTH_HEADER, "0"))
        with gallery.download_slot(principal) if sent > counted_above else contextlib.nullcontext():
            context.send_initial_metadata(metadata)
            yield from gallery.watch_download(_http_body(content, reply.start, sent), context.cancel)


def _http_body(content: downloads.Content, start: int, length: int) -> Iterator[HttpBody | chunks.Encoded]:
    # The first message names the content type; a 304, a 412, a 416 or a HEAD is that message with no data.
    content_type = content.mime_type
    for chunk in downloads.read_chunks(content.file, start, length):
        if content_type:
            yield HttpBody(content_type=content_type, data=chunk)
            content_type = ""
        else:
            yield _http_body_message(chunk)
    if content_type:
        yield HttpBody(content_type=content_type)


def _request_headers(context: grpc.ServicerContext) -> dict[str, str]:
    """Text metadata by name; repeated names joined with commas, as HTTP list headers are."""
    headers: dict[str, str] = {}
    for key, value in context.invocation_metadata():
        if isinstance(value, str):
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return headers


def _body_pieces(messages: Iterator[Any]) -> Iterator[bytes | memoryview]:
    """Each transcoded message's piece of the HTTP body, the message dropped before the next is
    awaited (a chunk is up to 1 MiB)."""
    for message in messages:
        piece = message.http_body.data
        del message
        yield piece
        del piece


def _first(request_iterator: Iterator):  # type: ignore[no-untyped-def,type-arg]
    first = next(request_iterator, None)
    if first is None:
        raise InvalidArgument("EMPTY_STREAM", "the upload stream carried no message")
    return first


def _declared_body_length(context: grpc.ServicerContext) -> int | None:
    """The HTTP Content-Length of a transcoded upload, which Envoy passes on as metadata.

    A client that disconnects mid-body can reach the server as an ordinary end of stream (grpcio
    may report the cancellation only later), so the declared length is what proves completeness.
    A multipart body also proves it by its closing boundary; a raw PUT has nothing else.
    """
    declared = dict(context.invocation_metadata()).get(CONTENT_LENGTH_HEADER, "")
    # ASCII digits only: str.isdigit() takes "²" (which int() refuses: an INTERNAL) and "١٢" (12),
    # and on the direct port this header is whatever the client sent, before any token is checked.
    return int(declared) if declared.isascii() and declared.isdigit() else None


def _require_whole_body(declared: int | None, received: int) -> None:
    if declared is not None and declared != received:
        raise InvalidArgument(
            "BODY_INCOMPLETE", f"received {received} of {declared} body bytes: nothing was stored",
            field="content_length", declared=str(declared), received=str(received),
        )


def _require_active(context: grpc.ServicerContext) -> None:
    # Never store an upload whose client is gone: its stream may have ended early.
    if not context.is_active():
        raise InvalidArgument("UPLOAD_CANCELLED", "the upload was cancelled by the client")
