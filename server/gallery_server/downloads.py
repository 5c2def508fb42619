"""What a download answers: HTTP range and conditional-request rules (RFC 9110), and byte windows.

Nothing here knows gRPC. The servicer hands in the request's `range`, `if-none-match` and
`if-range` header values and gets back a Reply: the HTTP status, the byte window to send and the
response headers. Envoy turns the status into the real HTTP status (envoy/envoy.yaml, Lua filter).

Order of evaluation (RFC 9110 section 13.2.2): If-None-Match first (a match is 304), then If-Range,
then Range. What is not understood is ignored, as RFC 9110 allows: a malformed Range, an unknown
unit or several ranges (no multipart/byteranges here) get the whole file with 200; a malformed
If-None-Match matches nothing.

The Content-Range of a resumable pre-signed PUT (signed_urls.py) is parsed here too, next to the
Range of a download, by the same rules for its unit.

The native read (ReadEventContent) uses `read_window`, the offset/limit rules of
google.bytestream.ByteStream.Read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import urllib.parse
from collections.abc import Iterator, Mapping
from typing import BinaryIO

from .errors import InvalidArgument, OutOfRange

CHUNK_BYTES = 1 << 20  # one streamed message

OK = 200
PARTIAL_CONTENT = 206
NOT_MODIFIED = 304
PRECONDITION_FAILED = 412
# The reason of an If-Match that fails a request answered with an error (a DELETE): 412 too.
PRECONDITION_FAILED_REASON = "PRECONDITION_FAILED"
RANGE_NOT_SATISFIABLE = 416
# The refusals a download answers with headers and no body.
REFUSED_WITHOUT_BODY = frozenset({PRECONDITION_FAILED, RANGE_NOT_SATISFIABLE})

# Response headers (lower case, as gRPC metadata must be).
ETAG = "etag"
ACCEPT_RANGES = "accept-ranges"
CONTENT_RANGE = "content-range"
# The whole file's size and SHA-256, also on a 206: what an HTTP/1.1 client checks a download
# against, since an error in the middle of a stream reaches it as a clean end.
SIZE = "x-content-length"
SHA256 = "x-content-sha256"

_RANGE_SPEC = re.compile(r"([0-9]*)-([0-9]*)")  # DIGIT is ASCII: not \d, which is Unicode
# Larger than any file: what a position of more than 19 significant digits means here. int() of
# such text would be exact but refuses more than 4,300 digits, which a header may well hold.
_BEYOND_ANY_FILE = 10**19
# One entity-tag of a list: optional weak prefix, then a quoted opaque tag (RFC 9110 8.8.3), and
# the comma that ends it (or the end).
_ENTITY_TAG = re.compile(r'(W/)?"([\x21\x23-\x7e\x80-\xff]*)"\s*(?:,|$)')
# Empty list elements, which a recipient must ignore wherever they are (RFC 9110 5.6.1.2).
_EMPTY_ELEMENTS = re.compile(r"[\s,]*")


@dataclasses.dataclass(frozen=True)
class Content:
    """A stored file ready to be sent: open, with what its response headers need."""

    file: BinaryIO
    size: int
    sha256: str  # lowercase hex
    mime_type: str
    filename: str = ""  # for Content-Disposition; empty for none


@dataclasses.dataclass(frozen=True)
class Reply:
    """What to answer: the HTTP status, the bytes [start, start + length) and the headers."""

    status: int
    start: int
    length: int
    headers: tuple[tuple[str, str], ...]


def etag(sha256: str) -> str:
    """The strong entity-tag of content with this SHA-256: `"<hex>"`."""
    return f'"{sha256}"'


def _position(digits: str) -> int:
    significant = digits.lstrip("0")
    return _BEYOND_ANY_FILE if len(significant) > 19 else int(significant or "0")


def _before(a: str, b: str) -> bool:
    """Whether the number `a` is less than `b`, both in digits of any length."""
    a, b = a.lstrip("0"), b.lstrip("0")
    return (len(a), a) < (len(b), b)


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """The one byte range `[start, end]` (inclusive) a Range header asks of `size` bytes.

    None when the header is to be ignored (absent, malformed, another unit, several ranges, or a
    suffix range of an empty file, which no Content-Range can express). Raises
    RangeNotSatisfiable when the range is valid but selects nothing.
    """
    unit, sep, specs = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    # A list may hold empty elements (RFC 9110 5.6.1): `bytes=0-1,` is one range.
    ranges = [s.strip() for s in specs.split(",") if s.strip()]
    if len(ranges) != 1:
        return None
    match = _RANGE_SPEC.fullmatch(ranges[0])
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first, last = match.group(1), match.group(2)
    if first == "":  # suffix range: the last n bytes
        n = _position(last)
        if n == 0:
            raise RangeNotSatisfiable(size)
        if size == 0:
            return None
        return max(0, size - n), size - 1
    start = _position(first)
    if last and _before(last, first):
        return None  # invalid (last before first): ignored like any malformed header
    if start >= size:
        raise RangeNotSatisfiable(size)
    return start, min(_position(last), size - 1) if last else size - 1


_CONTENT_RANGE_SPEC = re.compile(r"(?:([0-9]{1,19})-([0-9]{1,19})|\*)/([0-9]{1,19})")  # ASCII digits only


@dataclasses.dataclass(frozen=True)
class ContentRange:
    """`bytes first-last/total`, or `bytes */total` (first and last None: where to resume?)."""

    first: int | None
    last: int | None
    total: int

    @property
    def length(self) -> int:
        return 0 if self.first is None or self.last is None else self.last - self.first + 1


def parse_content_range(header: str) -> ContentRange:
    """The Content-Range of a resumable PUT (GCS-style); the unit is case-insensitive, as
    parse_range's is."""
    unit, _, spec = header.strip().partition(" ")
    match = _CONTENT_RANGE_SPEC.fullmatch(spec) if unit.lower() == "bytes" else None
    if match is None or (match[1] is not None and not int(match[1]) <= int(match[2]) < int(match[3])):
        raise InvalidArgument(
            "INVALID_CONTENT_RANGE",
            "Content-Range must be `bytes <first>-<last>/<total>` with first <= last < total,"
            " or `bytes */<total>`",
            field="content_range", content_range=header[:100],
        )
    first = int(match[1]) if match[1] is not None else None
    last = int(match[2]) if match[2] is not None else None
    return ContentRange(first, last, int(match[3]))


def entity_tags(header: str) -> list[tuple[bool, str | None]] | None:
    """The (weak, opaque-tag) pairs of an If-Match, If-None-Match or If-Range list; a bare `*`
    (any content) is [(False, None)], apart from a quoted "*", an ordinary tag that no content here
    has. None when the value is not a valid list (an empty one included).
    """
    value = header.strip()
    if value == "*":
        return [(False, None)]
    tags = []
    pos = _EMPTY_ELEMENTS.match(value).end()  # type: ignore[union-attr]
    while pos < len(value):
        match = _ENTITY_TAG.match(value, pos)
        if match is None:
            return None
        tags.append((match.group(1) is not None, match.group(2)))
        pos = _EMPTY_ELEMENTS.match(value, match.end()).end()  # type: ignore[union-attr]
    return tags or None


def none_match(header: str, opaque_tag: str) -> bool:
    """Whether If-None-Match matches content whose entity-tag is `opaque_tag` (weak comparison,
    `*` matches): a download's SHA-256, or a listing page's (listing.etag)."""
    tags = entity_tags(header)
    if not tags:
        return False
    return any(tag in (None, opaque_tag) for _, tag in tags)


def match(header: str, sha256: str) -> bool:
    """Whether If-Match holds for content with this SHA-256: `*`, or one of its entity-tags by
    strong comparison (RFC 9110 13.1.1). A list that does not parse, or an empty one, holds for
    nothing."""
    tags = entity_tags(header)
    return tags is not None and any(tag is None or (not weak and tag == sha256) for weak, tag in tags)


def if_range_holds(header: str, sha256: str) -> bool:
    """Whether If-Range lets the Range apply: a strong match of the entity-tag (RFC 9110 13.1.5).

    A date never matches: no Last-Modified is sent, so no client can hold a valid one.
    """
    tags = entity_tags(header)
    return tags is not None and len(tags) == 1 and tags[0] == (False, sha256)


def reply(
    size: int,
    sha256: str,
    *,
    range_header: str = "",
    if_match: str | None = None,
    if_none_match: str = "",
    if_range: str = "",
) -> Reply:
    """Evaluate a GET of content of `size` bytes with this SHA-256 under the request's headers,
    in RFC 9110's order (13.2.2): If-Match, If-None-Match, then Range with If-Range.
    If-Modified-Since and If-Unmodified-Since are ignored, as for a resource without a
    Last-Modified (none is sent). `if_match` None: no If-Match (an empty one names no content)."""
    common = ((ETAG, etag(sha256)), (ACCEPT_RANGES, "bytes"), (SIZE, str(size)), (SHA256, sha256))
    if if_match is not None and not match(if_match, sha256):
        return Reply(PRECONDITION_FAILED, 0, 0, common)
    if if_none_match and none_match(if_none_match, sha256):
        return Reply(NOT_MODIFIED, 0, 0, common)
    if range_header and (not if_range or if_range_holds(if_range, sha256)):
        try:
            selected = parse_range(range_header, size)
        except RangeNotSatisfiable:
            return Reply(RANGE_NOT_SATISFIABLE, 0, 0, (*common, (CONTENT_RANGE, f"bytes */{size}")))
        if selected is not None:
            start, end = selected
            return Reply(
                PARTIAL_CONTENT, start, end - start + 1,
                (*common, (CONTENT_RANGE, f"bytes {start}-{end}/{size}")),
            )
    return Reply(OK, 0, size, common)


def content_disposition(name: str) -> str:
    """An attachment header safe for any filename: ASCII fallback plus RFC 5987 UTF-8 form.

    A stored name may hold `/` or `\\` (names are not paths); the suggested filename never does,
    so that a client saving under it cannot be steered into another folder."""
    name = name.replace("/", "_").replace("\\", "_")
    fallback = "".join(c if c.isascii() and c.isprintable() and c != '"' else "_" for c in name)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{urllib.parse.quote(name, safe='')}"


# Request headers whose answer depends on more than the size: left to the server's own path.
_CONDITIONAL_HEADERS = ("if-range", "if-none-match", "if-match", "if-modified-since",
                        "if-unmodified-since")


def unconditional_reply(headers: Mapping[str, str], size: int, sha256: str) -> Reply | None:
    """reply() for a GET (header names lower case) that carries no conditional header and gets
    bytes: 200 with the whole file or 206 with one window. None for any other request."""
    if any(name in headers for name in _CONDITIONAL_HEADERS):
        return None
    answer = reply(size, sha256, range_header=headers.get("range", ""))
    return answer if answer.status in (OK, PARTIAL_CONTENT) else None


# On every answer (Envoy's virtual host adds them; a file Envoy sends itself gets them from the
# handoff): no media file or thumbnail uploaded as HTML or SVG is sniffed into another type, nor
# run as a page if a browser opens it.
SAFETY_HEADERS = (
    ("x-content-type-options", "nosniff"),
    ("content-security-policy", "sandbox; default-src 'none'"),
)


def content_headers(answer: Reply, mime_type: str, filename: str) -> tuple[tuple[str, str], ...]:
    """The response headers of a download with bytes: the reply's, the Content-Type and, for a
    named file, the Content-Disposition."""
    return (*answer.headers, ("content-type", mime_type), *disposition_headers(filename))


def disposition_headers(filename: str) -> tuple[tuple[str, str], ...]:
    """The Content-Disposition of a download: none for a file stored without a name."""
    return (("content-disposition", content_disposition(filename)),) if filename else ()


def read_window(size: int, offset: int, limit: int) -> tuple[int, int]:
    """(start, length) of a ByteStream-style read: `limit` 0 means to the end.

    Negative values are INVALID_ARGUMENT; an offset past the end is OUT_OF_RANGE; an offset equal
    to the size reads nothing.
    """
    check_read(offset, limit)
    if offset > size:
        raise OutOfRange(
            "READ_OFFSET_OUT_OF_RANGE", f"read_offset {offset} is past the end ({size} bytes)",
            field="read_offset", read_offset=str(offset), size=str(size),
        )
    remaining = size - offset
    return offset, min(limit, remaining) if limit else remaining


def check_read(offset: int, limit: int) -> None:
    """Refuse a negative read offset or limit (checkable before the content is looked up)."""
    if offset < 0:
        raise InvalidArgument(
            "INVALID_READ_OFFSET", f"read_offset must be >= 0, got {offset}",
            field="read_offset", read_offset=str(offset),
        )
    if limit < 0:
        raise InvalidArgument(
            "INVALID_READ_LIMIT", f"read_limit must be >= 0, got {limit}",
            field="read_limit", read_limit=str(limit),
        )


def read_chunks(file: BinaryIO, start: int, length: int, chunk: int = CHUNK_BYTES) -> Iterator[bytes]:
    """`length` bytes of `file` from `start`, in pieces of at most `chunk` bytes.

    Raises if the file ends early (it changed under the record that describes it)."""
    file.seek(start)
    remaining = length
    while remaining:
        data = file.read(min(chunk, remaining))
        if not data:
            raise OSError(f"file ended {remaining} bytes early")
        remaining -= len(data)
        yield data


def sha256_of(file: BinaryIO, chunk: int = CHUNK_BYTES) -> str:
    """The SHA-256 of a whole open file, read in pieces; leaves the position at the end."""
    file.seek(0)
    digest = hashlib.sha256()
    while data := file.read(chunk):
        digest.update(data)
    return digest.hexdigest()


class RangeNotSatisfiable(Exception):
    """A valid Range that selects no byte of the content (HTTP 416)."""

    def __init__(self, size: int) -> None:
        super().__init__(f"no byte of {size} is in range")
        self.size = size
