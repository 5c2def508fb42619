"""The REST multipart upload, parsed incrementally (python-multipart) straight into an Upload.

File parts (`event`, `thumbnail`) go to staging as they arrive; text parts (`name`, `media_type`,
`has_thumbnail`, `metadata`, `device_event_id`) are small and bounded. Parts may come in any
order: the reference's own curl example sends `event` before `media_type` and `metadata`.
Parts of other names are skipped, as HTTP frameworks skip fields a handler does not read: an
existing client may send more than the reference lists (a device id, a timestamp). They are
bounded too, and named in the call's access line so that a misspelt field can be found. A name
that is a field's but for its case, separators or punctuation (`mediaType`, `Device-Event-Id`) is
refused: the client meant that field, and skipping it would change what is stored (a retry keyed
by `deviceEventId` stored twice). So are the native header's fields a form does not take.
"""

from __future__ import annotations

from python_multipart.multipart import MAX_BOUNDARY_LENGTH, MultipartParser, MultipartState, parse_options_header

from . import logs, validation
from .errors import Exhausted, GalleryError, InvalidArgument, TooLarge
from .uploads import Upload

_TEXT_LIMITS = {"name": 4 * validation.MAX_NAME_CHARS, "media_type": 64, "has_thumbnail": 16,
                # UTF-8 of that many characters, and the whitespace around them.
                "device_event_id": 4 * validation.MAX_DEVICE_EVENT_ID_CHARS + 64}
# RFC 2046 5.1.1: what comes before the first boundary line (a preamble) is to be ignored, and
# python-multipart takes no more than a blank line there. It is looked for within this much.
MAX_PREAMBLE_BYTES = 64 << 10
# Parts of names the upload does not read: each skipped, up to this size and this many.
MAX_OTHER_PART_BYTES = 64 << 10
MAX_OTHER_PARTS = 32
# Fields of the native upload's header that a form does not take: skipped, each would silently lose
# what the client sent it for.
_NATIVE_ONLY = {
    "eventid": "a pulled event's content is uploaded natively (UploadEvent, header event_id)",
    "sha256": "the server computes the sha256; a declared one is checked natively (UploadEvent) only",
    "size": "the size is the event part's; a declared one is checked natively (UploadEvent) only",
    "mimetype": "the type is detected from the content (or set media_type)",
    "metadatajson": "send the JSON object as `metadata`",
}
# What HTML forms and client libraries write for a flag, and every spelling the query's
# booleans take (Envoy's transcoder reads `thumbnail=t` and `y` too), so both say the same.
_TRUE = {"true", "1", "yes", "on", "t", "y"}
_FALSE = {"false", "0", "no", "off", "", "f", "n"}


def multipart_boundary(content_type: str) -> bytes:
    try:
        kind, options = parse_options_header(content_type)
    except UnicodeEncodeError:  # python-multipart reads the header as latin-1: `Ā` crashed it
        kind, options = b"", {}
    boundary = options.get(b"boundary", b"")
    if kind != b"multipart/form-data" or not boundary:
        raise InvalidArgument(
            "NOT_MULTIPART", "the upload body must be multipart/form-data with a boundary",
            field="content_type",
        )
    if len(boundary) > MAX_BOUNDARY_LENGTH:  # python-multipart's own limit (RFC 2046's is 70): its error was a 500
        raise InvalidArgument(
            "MALFORMED_MULTIPART", f"the multipart boundary is longer than {MAX_BOUNDARY_LENGTH} bytes",
            field="content_type",
        )
    return boundary


def _folded(name: str) -> str:
    """A field name's letters and digits, in lower case: `mediaType`, `Media-Type`, `media type`
    and `media.type ` are media_type."""
    return "".join(c for c in name.lower() if c.isascii() and c.isalnum())


def _utf8(field: str, value: bytearray) -> str:
    # Refused rather than decoded with U+FFFD: a name or metadata silently changed is worse.
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgument(
            "FORM_FIELD_NOT_UTF8", f"form field {field!r} is not UTF-8 text", field=field
        ) from None


class FormReceiver:
    """Feed it the body in pieces; it fills upload.fields and the upload's staged files."""

    def __init__(self, upload: Upload, content_type: str, *, max_metadata_bytes: int) -> None:
        self._upload = upload
        self._limits = {**_TEXT_LIMITS, "metadata": max_metadata_bytes}
        self._fields_folded = {_folded(field): field for field in ("event", "thumbnail", *self._limits)}
        self._seen: set[str] = set()
        self._texts: dict[str, bytearray] = {}
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[str, bytes] = {}
        self._part = ""
        self._skipped: list[str] = []  # names of the parts skipped, in order
        self._skipped_bytes = -1  # of the part being skipped; -1: none is
        self._error: Exception | None = None
        boundary = multipart_boundary(content_type)
        self._delimiter = b"--" + boundary
        self._preamble: bytes | None = b""  # None once the first boundary line was found
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._on_part_begin,
                "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value,
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
                "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end,
            },
        )

    def feed(self, data: bytes | memoryview) -> None:
        # python-multipart searches its input with bytes.find: a view becomes bytes first.
        data = data if isinstance(data, bytes) else bytes(data)
        if self._preamble is not None and not (data := self._past_preamble(data)):
            return
        try:
            self._parser.write(data)
        except (GalleryError, OSError):
            # Raised by our callbacks, which python-multipart lets through as they are: a refusal
            # of the form's content (_fail), the device's quota, the database or the disk. Not the
            # body's shape, whose error below would have made them a 400.
            raise
        except Exception as exc:  # the parser's own: a body that is no multipart form
            raise self._error or InvalidArgument(
                "MALFORMED_MULTIPART", f"malformed multipart body: {exc}"
            ) from None

    def _past_preamble(self, data: bytes) -> bytes:
        """The body from its first boundary line on, once that has come (b"" until then)."""
        seen = self._preamble + data if self._preamble else data
        # What was searched before, but for a delimiter cut by the piece's end and its line break.
        start = max(0, len(self._preamble or b"") - len(self._delimiter))
        while (found := seen.find(self._delimiter, start)) >= 0:
            if found == 0 or seen[found - 1] == 0x0A:  # a boundary begins a line
                self._preamble = None
                return seen[found:] if found else seen
            start = found + 1
        if len(seen) > MAX_PREAMBLE_BYTES:
            raise InvalidArgument(
                "MALFORMED_MULTIPART",
                f"malformed multipart body: no boundary line within its first {len(seen)} bytes",
            )
        self._preamble = seen
        return b""

    def finish(self) -> None:
        """Check the body ended properly and copy the text fields into upload.fields."""
        if self._parser.state != MultipartState.END:
            raise InvalidArgument(
                "MALFORMED_MULTIPART", "multipart body ended before its closing boundary"
            )
        texts = {k: _utf8(k, v) for k, v in self._texts.items()}
        fields = self._upload.fields
        fields.name = texts.get("name", "")
        fields.media_type = texts.get("media_type", "").strip()
        fields.metadata_json = validation.metadata_json(
            texts.get("metadata", ""), self._limits["metadata"]
        )
        flag = texts.get("has_thumbnail", "").strip().lower()
        if flag not in _TRUE | _FALSE:
            raise InvalidArgument(
                "INVALID_HAS_THUMBNAIL", "has_thumbnail must be true or false",
                field="has_thumbnail",
            )
        fields.thumbnail_promised = flag in _TRUE
        fields.device_event_id = validation.device_event_id(texts.get("device_event_id", ""))

    # -- parser callbacks: errors are kept, because python-multipart re-raises its own ----------

    def _fail(self, error: Exception) -> None:
        self._error = error
        raise error

    def _on_part_begin(self) -> None:
        self._headers = {}
        self._part = ""
        self._skipped_bytes = -1

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        self._headers[self._header_field.decode("latin-1").lower()] = bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    def _on_headers_finished(self) -> None:
        disposition = self._headers.get("content-disposition", b"")
        _, options = parse_options_header(disposition)
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if not name:  # RFC 7578 4.2: every part names its field
            self._fail(InvalidArgument("UNKNOWN_FORM_FIELD", "a form part has no name", field=""))
        if name not in ("event", "thumbnail", *self._limits):
            self._skip(name)
            return
        if name in self._seen:
            self._fail(InvalidArgument(
                "DUPLICATE_FORM_FIELD", f"form field {name!r} appears twice", field=name
            ))
        self._seen.add(name)
        self._part = name
        if name == "event":
            # A file input left empty: a browser sends its part with filename="" and no bytes (HTML's
            # form data set), which is no event file. Any other part is one, a 0-byte file too.
            # (python-multipart drops a filename*, which names a file however empty its filename is.)
            if options.get(b"filename") != b"" or b"filename*" in disposition.lower():
                self._upload.write_media(b"")
        elif name != "thumbnail":
            self._texts[name] = bytearray()

    def _skip(self, name: str) -> None:
        folded = _folded(name)
        if meant := self._fields_folded.get(folded):
            self._fail(InvalidArgument(
                "UNKNOWN_FORM_FIELD", f"unknown form field {name[:64]!r}: the field is {meant!r}", field=name[:64],
            ))
        if folded in _NATIVE_ONLY:
            self._fail(InvalidArgument(
                "UNKNOWN_FORM_FIELD", f"form field {name[:64]!r} is not one of this upload's: {_NATIVE_ONLY[folded]}",
                field=name[:64],
            ))
        if len(self._skipped) == MAX_OTHER_PARTS:
            self._fail(InvalidArgument(
                "TOO_MANY_FORM_FIELDS", f"more than {MAX_OTHER_PARTS} form fields the upload does not read",
                field=name[:64],
            ))
        self._skipped.append(name[:64])
        logs.note(ignored_form_fields=list(self._skipped))  # a list: a name may hold a comma
        self._skipped_bytes = 0

    def _on_part_end(self) -> None:
        # Checked as soon as it arrives, not after the event file that may follow it, and known to
        # the upload from then on: a retry of a capture stored already takes no quota (Upload).
        if self._part == "device_event_id":
            try:
                self._upload.fields.device_event_id = validation.device_event_id(
                    _utf8(self._part, self._texts[self._part]))
            except InvalidArgument as exc:
                self._fail(exc)

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = memoryview(data)[start:end]
        try:
            if self._skipped_bytes >= 0:
                self._skipped_bytes += len(chunk)
                if self._skipped_bytes > MAX_OTHER_PART_BYTES:
                    self._fail(InvalidArgument(
                        "FORM_FIELD_TOO_LARGE",
                        f"form field {self._skipped[-1]!r} is longer than {MAX_OTHER_PART_BYTES} bytes",
                        field=self._skipped[-1],
                    ))
            elif self._part == "event":
                if chunk:  # an empty piece of a file left unchosen would make it a 0-byte file
                    self._upload.write_media(chunk)
            elif self._part == "thumbnail":
                self._upload.write_thumbnail(chunk)
            else:
                text = self._texts[self._part]
                if len(text) + len(chunk) > self._limits[self._part]:
                    self._fail(InvalidArgument(
                        "FORM_FIELD_TOO_LARGE",
                        f"form field {self._part!r} is longer than {self._limits[self._part]} bytes",
                        field=self._part,
                    ))
                text += chunk
        except (InvalidArgument, TooLarge, Exhausted) as exc:  # Exhausted: a full disk
            self._fail(exc)
