"""Range and conditional-request rules of downloads (no server): examples, then properties checked
over every small case and over random headers."""

from __future__ import annotations

import hashlib
import io
import itertools
import random

import pytest

from gallery_server import downloads
from gallery_server.downloads import (
    NOT_MODIFIED,
    OK,
    PARTIAL_CONTENT,
    PRECONDITION_FAILED,
    RANGE_NOT_SATISFIABLE,
    RangeNotSatisfiable,
    parse_range,
    reply,
)
from gallery_server.errors import InvalidArgument, OutOfRange

SHA = hashlib.sha256(b"content").hexdigest()
OTHER = hashlib.sha256(b"other").hexdigest()
ETAG = f'"{SHA}"'


# -- Range ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("header", "size", "expected"), [
    ("bytes=0-0", 10, (0, 0)),
    ("bytes=0-9", 10, (0, 9)),
    ("bytes=2-5", 10, (2, 5)),
    ("bytes=5-", 10, (5, 9)),
    ("bytes=9-", 10, (9, 9)),
    ("bytes=-3", 10, (7, 9)),
    ("bytes=-10", 10, (0, 9)),
    ("bytes=-999", 10, (0, 9)),  # a suffix longer than the file is the whole file
    ("bytes=3-999", 10, (3, 9)),  # last-pos past the end is clamped
    ("BYTES=1-2", 10, (1, 2)),  # the unit is case-insensitive
    ("bytes = 1-2", 10, (1, 2)),
    ("bytes= 1-2 ", 10, (1, 2)),
    ("bytes=1-2,", 10, (1, 2)),  # empty list elements do not count
    ("bytes=, 1-2", 10, (1, 2)),
    ("bytes=0-" + "9" * 40, 10, (0, 9)),  # numbers beyond int64 are still numbers
    ("bytes=0-" + "9" * 5000, 10, (0, 9)),  # and beyond what int() takes from text
    ("bytes=-" + "9" * 5000, 10, (0, 9)),
    ("bytes=" + "0" * 5000 + "3-" + "0" * 5000 + "4", 10, (3, 4)),  # leading zeros are zeros
])
def test_satisfiable_ranges(header: str, size: int, expected: tuple[int, int]) -> None:
    assert parse_range(header, size) == expected


@pytest.mark.parametrize(("header", "size"), [
    ("bytes=10-", 10),
    ("bytes=10-20", 10),
    ("bytes=" + "9" * 40 + "-", 10),
    ("bytes=" + "9" * 5000 + "-", 10),
    ("bytes=-0", 10),
    ("bytes=0-0", 0),
    ("bytes=0-", 0),
    ("bytes=-0", 0),
])
def test_unsatisfiable_ranges(header: str, size: int) -> None:
    with pytest.raises(RangeNotSatisfiable):
        parse_range(header, size)


@pytest.mark.parametrize("header", [
    "",
    "bytes",
    "bytes=",
    "bytes=-",
    "bytes=,",
    "bytes=a-b",
    "bytes=1",
    "bytes=5-2",  # last before first: invalid, ignored
    "bytes=+1-2",
    "bytes=1-+2",
    "bytes=--1",
    "bytes=1--2",
    "bytes=0x1-2",
    "bytes=1.5-2",
    "bytes=0-1,2-3",  # several ranges: served whole, never as multipart/byteranges
    "bytes=0-1,0-1",
    "bytes=-1,-2",
    "items=0-1",
    "bites=0-1",
    "0-1",
    "bytes=1 -2",
    "bytes=١-٢",  # Arabic-Indic digits match \d in Python but are not DIGIT
    "bytes=١-",
    "bytes=" + "9" * 5000 + "-" + "1" * 5000,  # last before first, in numbers int() would refuse
])
def test_ignored_ranges(header: str) -> None:
    assert parse_range(header, 10) is None


def test_suffix_range_of_empty_file_is_ignored() -> None:
    # Satisfiable by RFC 9110, but no Content-Range can name a range of an empty file.
    assert parse_range("bytes=-5", 0) is None
    assert reply(0, SHA, range_header="bytes=-5").status == OK


def _oracle(first: str, last: str, size: int) -> str | tuple[int, int] | None:
    """What a range asks, by Python slicing of the file's bytes: an independent statement of the
    rules. None: ignored; "416": unsatisfiable; else the inclusive (start, end)."""
    data = list(range(size))
    if first == "" and last == "":
        return None
    if first == "":
        n = int(last)
        if n == 0:
            return "416"
        selected = data[-n:]
        if not selected:
            return None  # empty file: ignored
    else:
        a = int(first)
        if last != "" and int(last) < a:
            return None
        selected = data[a:int(last) + 1] if last != "" else data[a:]
        if not selected:
            return "416"
    return selected[0], selected[-1]


def test_every_small_range_matches_slicing() -> None:
    numbers = ["", *map(str, range(0, 14)), "007"]
    for size, first, last in itertools.product(range(0, 12), numbers, numbers):
        header = f"bytes={first}-{last}"
        expected = _oracle(first, last, size)
        try:
            got: object = parse_range(header, size)
        except RangeNotSatisfiable:
            got = "416"
        assert got == expected, (header, size)
        result = reply(size, SHA, range_header=header)
        if expected is None:
            assert (result.status, result.start, result.length) == (OK, 0, size)
            assert "content-range" not in dict(result.headers)
        elif expected == "416":
            assert (result.status, result.length) == (RANGE_NOT_SATISFIABLE, 0)
            assert dict(result.headers)["content-range"] == f"bytes */{size}"
        else:
            start, end = expected
            assert (result.status, result.start, result.length) == (PARTIAL_CONTENT, start, end - start + 1)
            assert dict(result.headers)["content-range"] == f"bytes {start}-{end}/{size}"


def test_random_headers_never_escape_the_file() -> None:
    rng = random.Random(9110)
    alphabet = "bytes=0123456789-, \t;"
    for _ in range(20000):
        size = rng.choice([0, 1, 2, 7, 1 << 20, (1 << 40) + 3])
        header = rng.choice(["bytes=", "BYTES=", ""]) + "".join(
            rng.choice(alphabet) for _ in range(rng.randint(0, 12))
        )
        try:
            selected = parse_range(header, size)
        except RangeNotSatisfiable as exc:
            assert exc.size == size
            continue
        if selected is not None:
            start, end = selected
            assert 0 <= start <= end < size, (header, size)
            elements = [s for s in header.partition("=")[2].split(",") if s.strip()]
            assert len(elements) == 1, header  # one range, never one of several
        result = reply(size, SHA, range_header=header)
        assert 0 <= result.start and result.start + result.length <= size
        assert result.status in (OK, PARTIAL_CONTENT, RANGE_NOT_SATISFIABLE)


# -- conditional requests ---------------------------------------------------------------------------


def test_etag_is_the_quoted_sha256() -> None:
    assert downloads.etag(SHA) == ETAG


@pytest.mark.parametrize(("header", "matches"), [
    (ETAG, True),
    (f"W/{ETAG}", True),  # weak comparison
    ("*", True),
    (" * ", True),
    ('"*"', False),  # quoted: an ordinary tag, not the wildcard
    (f'"{OTHER}", {ETAG}', True),
    (f'"{OTHER}",{ETAG}', True),
    (f'W/"{OTHER}" ,  W/{ETAG} ', True),
    (f', , {ETAG}', True),  # empty list elements, wherever they are (RFC 9110 5.6.1.2)
    (f'{ETAG},,', True),
    (f'{ETAG}, ,', True),
    (f',,{ETAG},, ,"{OTHER}",,', True),
    (",", False),  # no element at all: not a list
    (f'"a,b", {ETAG}', True),  # a comma inside an entity-tag is part of the tag
    (f'"{OTHER}"', False),
    ("", False),
    (SHA, False),  # unquoted: not an entity-tag
    (f"w/{ETAG}", False),  # the weak prefix is case-sensitive
    (f'"{SHA}', False),
    (f'{ETAG} x', False),
    (f'*, {ETAG}', False),  # `*` alone or a list, not both: malformed, so no match
    ('"a,b"', False),
    (f'"caf\xe9", {ETAG}', True),  # obs-text is part of an entity-tag
    (f'"{OTHER}" {ETAG}', False),  # a list needs its commas: malformed, so no match
])
def test_if_none_match(header: str, matches: bool) -> None:
    assert downloads.none_match(header, SHA) is matches
    result = reply(10, SHA, if_none_match=header)
    assert result.status == (NOT_MODIFIED if matches else OK)
    assert result.length == (0 if matches else 10)
    assert dict(result.headers)["etag"] == ETAG


@pytest.mark.parametrize(("header", "holds"), [
    (ETAG, True),
    ("*", True),  # the event exists
    (f'"{OTHER}", {ETAG}', True),
    (f"W/{ETAG}", False),  # If-Match compares strongly
    (f'"{OTHER}"', False),
    (SHA, False),  # unquoted: not a list, so it holds for nothing
    (f"{ETAG} x", False),
    ('"*"', False),  # quoted: an ordinary tag, not the wildcard
    ("", False),  # an empty list names no content
])
def test_if_match_fails_a_get_that_names_other_content(header: str, holds: bool) -> None:
    """RFC 9110 13.1.1: a server MUST NOT answer as asked when If-Match is false: 412, no body,
    before If-None-Match and Range are looked at."""
    assert downloads.match(header, SHA) is holds
    result = reply(10, SHA, if_match=header, if_none_match="*", range_header="bytes=0-1")
    assert (result.status, result.length) == ((NOT_MODIFIED, 0) if holds else (PRECONDITION_FAILED, 0))
    assert dict(result.headers)["etag"] == ETAG


def test_not_modified_wins_over_range() -> None:
    result = reply(10, SHA, if_none_match=ETAG, range_header="bytes=0-1")
    assert (result.status, result.length) == (NOT_MODIFIED, 0)
    assert "content-range" not in dict(result.headers)
    result = reply(10, SHA, if_none_match=f'"{OTHER}"', range_header="bytes=0-1")
    assert (result.status, result.start, result.length) == (PARTIAL_CONTENT, 0, 2)


@pytest.mark.parametrize(("if_range", "ranged"), [
    (ETAG, True),
    (f"W/{ETAG}", False),  # If-Range needs a strong match
    (f'"{OTHER}"', False),
    ("Sat, 28 Nov 2026 08:00:00 GMT", False),  # no Last-Modified is ever sent
    (f"{ETAG}, {ETAG}", False),
    ("*", False),
])
def test_if_range(if_range: str, ranged: bool) -> None:
    result = reply(10, SHA, range_header="bytes=2-3", if_range=if_range)
    assert (result.status, result.start, result.length) == (
        (PARTIAL_CONTENT, 2, 2) if ranged else (OK, 0, 10)
    )


def test_headers_of_every_reply() -> None:
    for kwargs in ({}, {"range_header": "bytes=0-0"}, {"range_header": "bytes=99-"},
                   {"if_none_match": "*"}):
        headers = dict(reply(10, SHA, **kwargs).headers)
        assert headers["etag"] == ETAG
        assert headers["accept-ranges"] == "bytes"
        assert headers["x-content-length"] == "10"  # the whole file, also for a range
        assert headers["x-content-sha256"] == SHA
        assert all(k == k.lower() for k in headers)  # gRPC metadata keys are lower case



@pytest.mark.parametrize("name", ["if-range", "if-none-match", "if-match", "if-modified-since", "if-unmodified-since"])
def test_a_conditional_request_gets_no_unconditional_reply(name: str) -> None:
    """Left to the server's own path, which alone knows these rules (not Envoy's file server)."""
    assert downloads.unconditional_reply({name: ETAG, "range": "bytes=0-1"}, 10, SHA) is None
    assert downloads.unconditional_reply({name: ETAG}, 10, SHA) is None


def test_an_unconditional_reply_is_one_with_bytes() -> None:
    whole = downloads.unconditional_reply({}, 10, SHA)
    assert whole is not None and (whole.status, whole.start, whole.length) == (OK, 0, 10)
    part = downloads.unconditional_reply({"range": "bytes=2-3"}, 10, SHA)
    assert part is not None and (part.status, part.start, part.length) == (PARTIAL_CONTENT, 2, 2)
    assert downloads.unconditional_reply({"range": "bytes=10-"}, 10, SHA) is None  # a 416: the server's

# -- native reads -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "offset", "limit", "window"), [
    (10, 0, 0, (0, 10)),
    (10, 3, 0, (3, 7)),
    (10, 3, 4, (3, 4)),
    (10, 3, 100, (3, 7)),
    (10, 10, 0, (10, 0)),  # at the end: nothing, not an error
    (10, 10, 5, (10, 0)),
    (0, 0, 0, (0, 0)),
])
def test_read_window(size: int, offset: int, limit: int, window: tuple[int, int]) -> None:
    assert downloads.read_window(size, offset, limit) == window


def test_read_window_errors() -> None:
    with pytest.raises(OutOfRange) as err:
        downloads.read_window(10, 11, 0)
    assert (err.value.reason, err.value.field) == ("READ_OFFSET_OUT_OF_RANGE", "read_offset")
    assert err.value.metadata == {"read_offset": "11", "size": "10"}
    with pytest.raises(InvalidArgument) as bad:
        downloads.read_window(10, -1, 0)
    assert (bad.value.reason, bad.value.field) == ("INVALID_READ_OFFSET", "read_offset")
    assert bad.value.metadata == {"read_offset": "-1"}
    with pytest.raises(InvalidArgument) as bad:
        downloads.read_window(10, 0, -1)
    assert (bad.value.reason, bad.value.field) == ("INVALID_READ_LIMIT", "read_limit")
    assert bad.value.metadata == {"read_limit": "-1"}


def test_read_window_property() -> None:
    for size, offset, limit in itertools.product(range(6), range(8), range(8)):
        data = bytes(range(size))
        if offset > size:
            with pytest.raises(OutOfRange):
                downloads.read_window(size, offset, limit)
            continue
        start, length = downloads.read_window(size, offset, limit)
        expected = data[offset:offset + limit] if limit else data[offset:]
        assert data[start:start + length] == expected


def test_read_chunks() -> None:
    data = random.Random(1).randbytes(1000)
    file = io.BytesIO(data)
    for start, length, chunk in itertools.product([0, 1, 999, 1000], [0, 1, 7, 1000], [1, 3, 64, 4096]):
        length = min(length, len(data) - start)
        pieces = list(downloads.read_chunks(file, start, length, chunk))
        assert b"".join(pieces) == data[start:start + length]
        assert all(0 < len(p) <= chunk for p in pieces)
    with pytest.raises(OSError):
        list(downloads.read_chunks(file, 990, 20))  # the file is shorter than its record


def test_content_is_streamed_in_messages_of_1_mib() -> None:
    data = bytes(5 << 19)  # 2.5 MiB
    assert [len(p) for p in downloads.read_chunks(io.BytesIO(data), 0, len(data))] == [1 << 20, 1 << 20, 1 << 19]


def test_a_file_stored_without_a_name_gets_no_content_disposition() -> None:
    answer = reply(10, SHA)
    assert dict(downloads.content_headers(answer, "image/png", ""))["content-type"] == "image/png"
    assert "content-disposition" not in dict(downloads.content_headers(answer, "image/png", ""))
    assert dict(downloads.content_headers(answer, "image/png", "a.png"))["content-disposition"] == (
        "attachment; filename=\"a.png\"; filename*=UTF-8''a.png"
    )


def test_sha256_of() -> None:
    data = random.Random(2).randbytes(3 * 1024 + 5)
    assert downloads.sha256_of(io.BytesIO(data), chunk=1024) == hashlib.sha256(data).hexdigest()
    assert downloads.sha256_of(io.BytesIO(b"")) == hashlib.sha256(b"").hexdigest()
