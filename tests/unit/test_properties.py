"""Property-based tests (hypothesis) of every validator and parser the server owns.

Each property holds for any input hypothesis can make: a parser returns a value or raises its
domain error, never anything else; what is accepted round-trips; normalisation is idempotent.
The profile is deterministic (derandomize, no example database) so CI runs the same examples every
time, and bounded so the whole module takes a few seconds.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import re
import string
import time
import unicodedata
from collections.abc import Iterator

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gallery_server import auth, downloads, listing_json, paging, validation
from gallery_server.db import Database
from gallery_server.downloads import content_disposition
from gallery_server.errors import InvalidArgument, PermissionDenied, TooLarge, Unauthenticated
from gallery_server.forms import FormReceiver, multipart_boundary
from gallery_server.service import Gallery
from gallery_server.signed_urls import MEDIA, THUMBNAIL, SignedTarget, SignedUploads
from gallery_server.storage import Storage
from gallery_server.uploads import Upload

from ..conftest import JWT_SECRET, make_settings, stored_files

PROFILE = settings(
    max_examples=100, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
FEW = settings(PROFILE, max_examples=40)

# Text that reaches for the awkward corners: controls, bidi, zero-width, surrogates, NUL, combining.
NASTY = st.sampled_from(
    ["\x00", "\n", "\r", "\u202e", "\u2066", "\u200b", "\ufeff", "\u0301", "\ud800", "/", "..",
     "\\", "%2F", "\u0430", "\u2028", "😀", "\ue000", "\u0378", " ", '"', "evt_", "*", "-", ","]
)
TEXT = st.one_of(st.text(), st.lists(st.one_of(NASTY, st.text(max_size=3))).map("".join))
DEVICE_ID = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._:-]{0,127}\Z")
SHA = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)
_UNPRINTABLE = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}


# -- validation.py ------------------------------------------------------------------------------


@PROFILE
@given(TEXT)
def test_device_id_accepts_exactly_its_ascii_pattern(value: str) -> None:
    try:
        assert validation.device_id(value) == value
    except InvalidArgument as exc:
        assert exc.reason == "INVALID_DEVICE_ID"
        assert not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}", value, re.ASCII)
        assert len(exc.metadata["device"]) <= 200
    else:
        assert value.isascii() and "/" not in value and not value.startswith(".")


@PROFILE
@given(DEVICE_ID)
def test_device_ids_of_the_pattern_are_accepted(value: str) -> None:
    assert validation.device_id(value) == value


@PROFILE
@given(TEXT)
def test_event_id_accepts_exactly_its_pattern(value: str) -> None:
    try:
        assert validation.event_id(value) == value
    except InvalidArgument as exc:
        assert exc.reason == "INVALID_EVENT_ID"
    else:
        assert re.fullmatch(r"evt_[A-Za-z0-9_-]{22}", value, re.ASCII)


def test_new_event_ids_are_valid_and_distinct() -> None:
    ids = {validation.new_event_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(validation.event_id(i) == i for i in ids)


@PROFILE
@given(TEXT)
def test_display_name_is_nfc_bounded_printable_and_idempotent(value: str) -> None:
    try:
        name = validation.display_name(value)
    except InvalidArgument as exc:
        assert exc.reason in {"NAME_REQUIRED", "NAME_TOO_LONG", "NAME_INVALID"}
        return
    assert name == unicodedata.normalize("NFC", value)
    assert 1 <= len(name) <= validation.MAX_NAME_CHARS
    assert not any(unicodedata.category(c) in _UNPRINTABLE for c in name)
    assert name not in (".", "..")
    assert validation.display_name(name) == name  # idempotent
    name.encode("utf-8")  # storable: no lone surrogate got through


@PROFILE
@given(st.one_of(st.none(), st.integers()), st.one_of(st.none(), st.integers()))
def test_page_bounds(limit: int | None, offset: int | None) -> None:
    try:
        got = validation.page(limit, offset)
    except InvalidArgument as exc:
        assert exc.reason in {"INVALID_LIMIT", "INVALID_OFFSET"}
        assert not (1 <= (limit or 50) <= 1000 and (offset or 0) >= 0) or limit == 0
    else:
        assert got == (50 if limit is None else limit, 0 if offset is None else offset)
        assert 1 <= got[0] <= validation.MAX_LIMIT and got[1] >= 0


@PROFILE
@given(st.one_of(TEXT, SHA))
def test_sha256_hex(value: str) -> None:
    try:
        assert validation.sha256_hex(value) == value
    except InvalidArgument as exc:
        assert exc.reason == "INVALID_SHA256"
        assert value and not re.fullmatch("[0-9a-f]{64}", value)


@PROFILE
@given(TEXT)
def test_media_type(value: str) -> None:
    try:
        assert validation.media_type(value) in validation.MEDIA_TYPES
    except InvalidArgument as exc:
        assert exc.reason == "INVALID_MEDIA_TYPE"
        assert value not in validation.MEDIA_TYPES


JSON_LEAF = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True), TEXT
)
JSON = st.recursive(
    JSON_LEAF,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(TEXT, inner, max_size=4)),
    max_leaves=12,
)


@PROFILE
@given(st.one_of(TEXT, JSON.map(lambda v: json.dumps(v, allow_nan=True))), st.integers(0, 512))
def test_metadata_json_only_raises_its_errors(text: str, max_bytes: int) -> None:
    try:
        canonical = validation.metadata_json(text, max_bytes)
    except InvalidArgument as exc:
        assert exc.reason in {"INVALID_METADATA", "METADATA_TOO_LARGE"}
        assert exc.field == "metadata"
        return
    assert len(canonical.encode()) <= max_bytes
    assert isinstance(json.loads(canonical), dict)
    # Canonical form is a fixed point: validating it again changes nothing.
    assert validation.metadata_json(canonical, max_bytes) == canonical


@PROFILE
@given(st.dictionaries(TEXT, JSON, max_size=5))
def test_metadata_json_round_trips_what_it_accepts(value: dict) -> None:
    try:
        canonical = validation.metadata_json(json.dumps(value, allow_nan=True), 1 << 20)
    except InvalidArgument as exc:
        assert exc.reason == "INVALID_METADATA"
        return
    assert json.loads(canonical) == value


@PROFILE
@given(st.integers(1, 200))
def test_metadata_nesting_never_crashes(depth: int) -> None:
    text = '{"a":' * depth + "1" + "}" * depth
    deep = "[" * 100_000 + "]" * 100_000
    for candidate in (text, '{"a":' + deep + "}"):
        try:
            validation.metadata_json(candidate, 1 << 20)
        except InvalidArgument as exc:
            assert exc.reason in {"INVALID_METADATA", "METADATA_TOO_LARGE"}


# -- downloads.py: Range, If-None-Match, If-Range ------------------------------------------------


RANGE_TEXT = st.one_of(
    TEXT,
    st.builds(lambda a, b: f"bytes={a}-{b}", st.integers(0, 10**20).map(str) | st.just(""),
              st.integers(0, 10**20).map(str) | st.just("")),
    st.lists(st.sampled_from(["bytes", "=", "-", ",", " ", "0", "1", "9", "٣", "items"])).map("".join),
)


@PROFILE
@given(RANGE_TEXT, st.integers(0, 10**12))
def test_parse_range_stays_within_the_content(header: str, size: int) -> None:
    try:
        selected = downloads.parse_range(header, size)
    except downloads.RangeNotSatisfiable as exc:
        assert exc.size == size
        return
    if selected is not None:
        start, end = selected
        assert 0 <= start <= end < size


CONTENT_RANGE_TEXT = st.one_of(
    TEXT,
    st.builds(lambda unit, a, b, t: f"{unit} {a}-{b}/{t}",
              st.sampled_from(["bytes", "Bytes", "BYTES", "byte", "items"]),
              st.integers(0, 10**20), st.integers(0, 10**20), st.integers(0, 10**20)),
    st.builds(lambda t: f"bytes */{t}", st.one_of(st.integers(0, 10**20).map(str), TEXT)),
    st.just("bytes \u0661-\u0662/\u0663"),  # digits, but not ASCII ones
)


@PROFILE
@given(CONTENT_RANGE_TEXT)
def test_parse_content_range_accepts_only_ranges_inside_their_total(header: str) -> None:
    try:
        got = downloads.parse_content_range(header)
    except InvalidArgument as exc:
        assert exc.reason == "INVALID_CONTENT_RANGE" and len(exc.metadata["content_range"]) <= 100
        return
    assert header.strip().lower().startswith("bytes ") and header.isascii()
    if got.first is None:
        assert got.last is None and got.length == 0
    else:
        assert got.last is not None and 0 <= got.first <= got.last < got.total
        assert got.length == got.last - got.first + 1
    # What it accepts, written back canonically, parses to the same range.
    spec = "*" if got.first is None else f"{got.first}-{got.last}"
    assert downloads.parse_content_range(f"bytes {spec}/{got.total}") == got


@PROFILE
@given(st.integers(1, 10**15), st.data())
def test_parse_content_range_round_trips_valid_ranges(total: int, data: st.DataObject) -> None:
    first = data.draw(st.integers(0, total - 1))
    last = data.draw(st.integers(first, total - 1))
    unit = data.draw(st.sampled_from(["bytes", "Bytes", "BYTES"]))
    got = downloads.parse_content_range(f"{unit} {first}-{last}/{total}")
    assert (got.first, got.last, got.total) == (first, last, total)


@PROFILE
@given(st.one_of(TEXT, st.text(min_size=120, max_size=140)))
def test_device_event_id_is_stripped_bounded_printable_and_idempotent(value: str) -> None:
    try:
        got = validation.device_event_id(value)
    except InvalidArgument as exc:
        assert exc.reason == "INVALID_DEVICE_EVENT_ID" and exc.field == "device_event_id"
        stripped = value.strip()
        assert (len(stripped) > validation.MAX_DEVICE_EVENT_ID_CHARS or (value and not stripped)
                or any(unicodedata.category(c) in _UNPRINTABLE for c in stripped))
        return
    assert got == value.strip() and len(got) <= validation.MAX_DEVICE_EVENT_ID_CHARS
    assert not any(unicodedata.category(c) in _UNPRINTABLE for c in got)
    assert validation.device_event_id(got) == got  # idempotent: the same id at every entry point


@PROFILE
@given(st.integers(0, 10**12), st.data())
def test_parse_range_round_trips_valid_ranges(size: int, data: st.DataObject) -> None:
    if size == 0:
        return
    start = data.draw(st.integers(0, size - 1))
    end = data.draw(st.integers(start, size - 1))
    assert downloads.parse_range(f"bytes={start}-{end}", size) == (start, end)
    assert downloads.parse_range(f"bytes={start}-", size) == (start, size - 1)
    n = end - start + 1
    assert downloads.parse_range(f"bytes=-{n}", size) == (size - n, size - 1)


ETAG_CHARS = st.text(alphabet=st.sampled_from(
    [chr(c) for c in range(0x21, 0x7F) if chr(c) != '"']), max_size=20)


@PROFILE
@given(st.lists(st.tuples(st.booleans(), ETAG_CHARS), min_size=1, max_size=5),
       st.sampled_from([",", ", ", " ,", " , ,", ",,"]), st.sampled_from(["", ",", ", ,", " ,,"]))
def test_entity_tag_lists_round_trip(tags: list[tuple[bool, str]], separator: str, ends: str) -> None:
    header = ends + separator.join(f'{"W/" if weak else ""}"{tag}"' for weak, tag in tags) + ends
    assert downloads.entity_tags(header) == tags


@PROFILE
@given(TEXT, SHA)
def test_conditional_headers_never_raise(header: str, sha: str) -> None:
    tags = downloads.entity_tags(header)
    assert tags is None or tags == [(False, None)] or all(isinstance(t, str) for _, t in tags)
    assert isinstance(downloads.match(header, sha), bool)
    assert isinstance(downloads.none_match(header, sha), bool)
    assert isinstance(downloads.if_range_holds(header, sha), bool)
    # The ETag the server sends always matches, alone or in a list, weak or strong.
    assert downloads.none_match(downloads.etag(sha), sha)
    assert downloads.none_match(f'"x", W/{downloads.etag(sha)}', sha)
    assert downloads.if_range_holds(downloads.etag(sha), sha)


@PROFILE
@given(st.integers(0, 10**9), SHA, RANGE_TEXT, TEXT, TEXT)
def test_reply_is_always_a_consistent_answer(size: int, sha: str, rng: str, inm: str, ifr: str) -> None:
    reply = downloads.reply(size, sha, range_header=rng, if_none_match=inm, if_range=ifr)
    assert reply.status in {200, 206, 304, 416}
    assert 0 <= reply.start and reply.start + reply.length <= size
    headers = dict(reply.headers)
    assert headers["etag"] == f'"{sha}"' and headers["x-content-length"] == str(size)
    if reply.status == 206:
        assert headers["content-range"] == f"bytes {reply.start}-{reply.start + reply.length - 1}/{size}"
    if reply.status in (304, 416):
        assert reply.length == 0


@PROFILE
@given(st.integers(0, 10**9), st.integers(-(2**63), 2**63 - 1), st.integers(-(2**63), 2**63 - 1))
def test_read_window(size: int, offset: int, limit: int) -> None:
    try:
        start, length = downloads.read_window(size, offset, limit)
    except InvalidArgument as exc:
        assert exc.reason in {"INVALID_READ_OFFSET", "INVALID_READ_LIMIT"}
        assert offset < 0 or limit < 0
    except downloads.OutOfRange as exc:
        assert exc.reason == "READ_OFFSET_OUT_OF_RANGE" and offset > size
    else:
        assert start == offset and 0 <= length <= size - offset


@PROFILE
@given(TEXT.filter(lambda t: _utf8(t)))  # stored names are valid Unicode (display_name)
def test_content_disposition_is_one_safe_ascii_header(name: str) -> None:
    header = content_disposition(name)
    assert header.isascii() and header.isprintable()
    fallback = re.fullmatch(r'attachment; filename="([^"]*)"; filename\*=UTF-8\'\'(\S*)', header)
    assert fallback is not None, header
    assert "/" not in fallback.group(1) and "\\" not in fallback.group(1)


# -- paging.py: since/until and page tokens ------------------------------------------------------


MOMENTS = st.datetimes(
    min_value=datetime.datetime(1, 1, 2), max_value=datetime.datetime(9999, 12, 30),
    timezones=st.sampled_from([datetime.UTC, datetime.timezone(datetime.timedelta(hours=5, minutes=30)),
                               datetime.timezone(datetime.timedelta(hours=-8))]),
)


@PROFILE
@given(st.one_of(TEXT, MOMENTS.map(lambda m: m.isoformat())))
def test_since_until_parse_to_utc_or_refuse(value: str) -> None:
    try:
        query = paging.build(since=value)
    except InvalidArgument as exc:
        assert exc.reason == "INVALID_TIME" and exc.field == "since"
        return
    assert query.since is None if not value else query.since.tzinfo == datetime.UTC


@PROFILE
@given(MOMENTS)
def test_since_round_trips_rfc3339(moment: datetime.datetime) -> None:
    assert paging.build(until=moment.isoformat()).until == moment
    z = moment.astimezone(datetime.UTC).replace(tzinfo=None).isoformat() + "Z"
    assert paging.build(until=z).until == moment


@PROFILE
@given(st.one_of(MOMENTS, MOMENTS.map(lambda m: m.astimezone(datetime.UTC).replace(tzinfo=None)),
                 MOMENTS.map(lambda m: m.replace(microsecond=m.microsecond // 1000 * 1000))))
def test_listing_timestamps_print_as_protobuf_prints_them(moment: datetime.datetime) -> None:
    # The REST listing's `created` is printed by the server (listing_json.py) and must read as
    # the transcoder printed the Timestamp (0, 3 or 6 fractional digits here, UTC, "Z").
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    assert listing_json.timestamp(moment) == stamp.ToJsonString()


@PROFILE
@given(
    st.sampled_from(["", *validation.MEDIA_TYPES]), st.sampled_from(["", "newest", "oldest"]),
    st.one_of(st.none(), MOMENTS), MOMENTS, st.integers(1, 1000),
)
def test_page_tokens_round_trip_and_stay_bound_to_their_listing(
    media_type: str, order: str, since: datetime.datetime | None, last: datetime.datetime, limit: int,
) -> None:
    filters = {"media_type": media_type, "order": order, "since": since.isoformat() if since else ""}
    query = paging.build(limit=limit, **filters)
    event_id = validation.new_event_id()
    token = paging.next_page_token(query, (last, event_id), full=True)
    assert len(token) <= paging.MAX_TOKEN_CHARS and re.fullmatch(r"[A-Za-z0-9_-]+", token)
    assert paging.build(page_token=token, limit=limit, **filters).after == (last, event_id)
    other = {**filters, "order": "oldest" if order != "oldest" else "newest"}
    with pytest.raises(InvalidArgument) as info:
        paging.build(page_token=token, **other)
    assert info.value.reason == "PAGE_TOKEN_MISMATCH"
    assert paging.next_page_token(query, (last, event_id), full=False) == ""


@PROFILE
@given(st.one_of(TEXT, st.text(alphabet=string.ascii_letters + string.digits + "-_=", max_size=1100),
                 st.binary(max_size=200).map(lambda b: __import__("base64").urlsafe_b64encode(b).decode())))
def test_any_page_token_is_a_listing_or_a_400(token: str) -> None:
    try:
        query = paging.build(page_token=token)
    except InvalidArgument as exc:
        assert exc.reason in {"INVALID_PAGE_TOKEN", "PAGE_TOKEN_MISMATCH"}
        assert exc.field == "page_token"
    else:
        assert token == "" or query.after is not None


# -- signed_urls.py ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SignedUploads]:
    data = tmp_path_factory.mktemp("signer")
    settings = make_settings(data)
    db = Database(settings.database_url, pool_size=1)
    db.create_tables()
    yield SignedUploads(Gallery(settings, db, Storage(data)))
    db.dispose()


@FEW
@given(DEVICE_ID, st.sampled_from([MEDIA, THUMBNAIL]), TEXT.filter(lambda n: n.isprintable() and n.strip()))
def test_signed_url_tokens_round_trip_and_resist_tampering(
    signer: SignedUploads, device: str, purpose: str, filename: str
) -> None:
    event_id = validation.new_event_id()
    try:
        filename = validation.display_name(filename)
    except InvalidArgument:
        return
    token = signer._sign([1, device, event_id, purpose, int(time.time()) + 60, filename])
    assert re.fullmatch(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+", token)
    assert signer.verify(device, token) == SignedTarget(device, event_id, purpose, filename)
    for i in range(0, len(token), max(1, len(token) // 8)):  # any changed character is refused
        changed = token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1:]
        with pytest.raises(PermissionDenied) as info:
            signer.verify(device, changed)
        assert info.value.reason in {"URL_SIGNATURE_INVALID", "URL_DEVICE_MISMATCH"}
    with pytest.raises(PermissionDenied) as info:
        signer.verify(device + "x", token)
    assert info.value.reason == "URL_DEVICE_MISMATCH"


@PROFILE
@given(TEXT)
def test_any_signed_url_token_is_a_403(token: str) -> None:
    signer = SignedUploads.__new__(SignedUploads)  # only the key is needed to verify
    signer._key = b"k" * 32
    with pytest.raises(PermissionDenied) as info:
        signer.verify("cam1", token)
    assert info.value.reason == "URL_SIGNATURE_INVALID"


# -- forms.py: the multipart parser and its limits -----------------------------------------------


BOUNDARY = "prop-b0undary"


def _part(name: str, value: bytes, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Storage:
    return Storage(tmp_path_factory.mktemp("forms"))


def _receive(storage: Storage, pieces: list[bytes], max_metadata: int = 64) -> Upload:
    upload = Upload(storage, "cam1", max_media_bytes=64, max_thumbnail_bytes=16)
    with upload:
        form = FormReceiver(upload, f"multipart/form-data; boundary={BOUNDARY}",
                            max_metadata_bytes=max_metadata)
        for piece in pieces:
            form.feed(piece)
        form.finish()
    return upload


def _split(body: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(body)) for c in cuts})
    return [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]


@PROFILE
@given(st.lists(st.one_of(
    st.binary(max_size=80),
    st.sampled_from([f"--{BOUNDARY}".encode(), b"\r\n", b"\r\n\r\n", f"--{BOUNDARY}--".encode(),
                     b'Content-Disposition: form-data; name="name"', b'name="event"; filename="x"',
                     b'name="metadata"', b'name="has_thumbnail"', b'name="thumbnail"', b"\x00", b"--"]),
), max_size=12))
def test_any_body_is_parsed_or_refused_with_a_domain_error(storage: Storage, pieces: list[bytes]) -> None:
    try:
        _receive(storage, pieces)
    except (InvalidArgument, TooLarge) as exc:
        assert re.fullmatch(r"[A-Z_]+", exc.reason)
    assert stored_files(storage.data_dir) == []  # staging is empty after every upload closes


@PROFILE
@given(st.binary(max_size=64), st.lists(st.integers(0, 400), max_size=6), st.text(max_size=40),
       st.sampled_from(["", "true", "false"]))
def test_chunking_never_changes_what_is_parsed(
    storage: Storage, media: bytes, cuts: list[int], name: str, flag: str,
) -> None:
    body = (_part("event", media, "f.bin") + _part("name", name.encode())
            + _part("has_thumbnail", flag.encode()) + _part("metadata", b'{"k":1}')
            + f"--{BOUNDARY}--\r\n".encode())
    whole = _receive(storage, [body])
    pieces = _receive(storage, _split(body, cuts))
    assert whole.fields == pieces.fields
    assert (whole.fields.name, whole.fields.metadata_json) == (name, '{"k":1}')
    assert whole.media.size == pieces.media.size == len(media)


@PROFILE
@given(st.sampled_from(["name", "media_type", "has_thumbnail", "metadata"]), st.integers(-1, 1200),
       st.lists(st.integers(0, 2000), max_size=4))
def test_text_fields_are_bounded(storage: Storage, field: str, extra: int, cuts: list[int]) -> None:
    limit = {"name": 4 * validation.MAX_NAME_CHARS, "media_type": 64, "has_thumbnail": 16,
             "metadata": 64}[field]
    body = _part(field, b"x" * (limit + extra)) + f"--{BOUNDARY}--\r\n".encode()
    try:
        _receive(storage, _split(body, cuts))
    except InvalidArgument as exc:
        # Over the limit, however the body was cut; at or under it, judged on content instead.
        assert (exc.reason == "FORM_FIELD_TOO_LARGE") == (extra > 0), exc.reason
        assert exc.field == field
    else:
        assert extra <= 0


@PROFILE
@given(TEXT)
def test_any_content_type_is_multipart_or_a_400(content_type: str) -> None:
    try:
        boundary = multipart_boundary(content_type)
    except InvalidArgument as exc:
        assert exc.reason == "NOT_MULTIPART"
    else:
        assert boundary


# -- auth.py -------------------------------------------------------------------------------------


@PROFILE
@given(st.one_of(st.none(), TEXT, TEXT.map(lambda t: "Bearer " + t)))
def test_bearer_header_parsing(header: str | None) -> None:
    try:
        token = auth.bearer_token(header)
    except Unauthenticated as exc:
        assert exc.reason in {"TOKEN_MISSING", "TOKEN_MALFORMED"}
    else:
        assert token and token == token.strip() and header and header.lower().startswith("bearer ")


@PROFILE
@given(TEXT)
def test_any_token_text_is_a_principal_or_a_401(token: str) -> None:
    verifier = auth.Verifier(secret=JWT_SECRET)
    with pytest.raises(Unauthenticated) as info:
        verifier.verify(token)
    assert info.value.reason in {"TOKEN_INVALID", "TOKEN_EXPIRED"}


@PROFILE
@given(st.lists(TEXT.filter(lambda t: _utf8(t)), max_size=4), st.lists(
    st.text(alphabet=string.ascii_letters + ":_", min_size=1, max_size=12), max_size=4),
    TEXT.filter(lambda t: _utf8(t) and t != ""))
def test_minted_tokens_verify_to_what_they_grant(devices: list[str], scopes: list[str], sub: str) -> None:
    token = auth.mint(JWT_SECRET, subject=sub, devices=devices, scope=" ".join(scopes))
    principal = auth.Verifier(secret=JWT_SECRET).verify(token)
    assert (principal.subject, principal.devices, principal.scopes) == (sub, frozenset(devices), frozenset(scopes))
    assert principal.expires_at > time.time()  # a day from now, plus the leeway
    # Any changed character of the signature is refused.
    head, _, signature = token.rpartition(".")
    forged = f"{head}.{signature[:-1]}{'A' if signature[-1] != 'A' else 'B'}"
    with pytest.raises(Unauthenticated):
        auth.Verifier(secret=JWT_SECRET).verify(forged)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def test_profile_is_deterministic() -> None:
    assert PROFILE.derandomize and PROFILE.database is None and PROFILE.deadline is None
    assert pathlib.Path(__file__).exists()
