"""The REST multipart upload, parsed incrementally into an Upload (python-multipart underneath)."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import itertools
import pathlib
from collections.abc import Iterator

import pytest

from gallery_server import forms
from gallery_server.errors import DatabaseUnavailable, Exhausted, GalleryError, InvalidArgument, TooLarge
from gallery_server.forms import MAX_PREAMBLE_BYTES, FormReceiver, multipart_boundary
from gallery_server.storage import Storage
from gallery_server.uploads import Upload

from ..conftest import stored_files

BOUNDARY = "--b0undary-XyZ"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"
MAX_METADATA = 256

# Media that looks like parser food: CRLFs, dashes, a near-boundary and the boundary minus a byte.
MEDIA = (
    b"\x89PNG\r\n\x1a\n"
    + b"\r\n--" + BOUNDARY[:-1].encode() + b"\r\n"
    + b"--\r\n\r\n" + bytes(range(0, 256, 9))
    + b"\r\n-" + b"\r"
)
THUMB = b"\xff\xd8\xff\xe0thumb\r\n--\r\n" + b"\x00" * 17


@dataclasses.dataclass
class Part:
    name: str
    value: bytes
    filename: str | None = None
    content_type: str | None = None

    def encode(self, boundary: str = BOUNDARY) -> bytes:
        disposition = f'form-data; name="{self.name}"'
        if self.filename is not None:
            disposition += f'; filename="{self.filename}"'
        head = f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
        if self.content_type:
            head += f"Content-Type: {self.content_type}\r\n"
        return head.encode() + b"\r\n" + self.value + b"\r\n"


def body(*parts: Part, boundary: str = BOUNDARY) -> bytes:
    return b"".join(p.encode(boundary) for p in parts) + f"--{boundary}--\r\n".encode()


def standard_parts() -> list[Part]:
    return [
        Part("name", "café photo.png".encode()),
        Part("event", MEDIA, filename="photo.png", content_type="image/png"),
        Part("media_type", b"image"),
        Part("thumbnail", THUMB, filename="t.jpg"),
        Part("has_thumbnail", b"true"),
        Part("metadata", b'{"gps": {"lat": 1.5}, "tags": ["a", "b"]}'),
    ]


@pytest.fixture
def storage(tmp_path: pathlib.Path) -> Storage:
    return Storage(tmp_path / "data")


def new_upload(storage: Storage, *, max_media: int = 1 << 20, max_thumb: int = 1 << 20) -> Upload:
    return Upload(storage, "cam1", max_media_bytes=max_media, max_thumbnail_bytes=max_thumb)


@dataclasses.dataclass(frozen=True)
class Received:
    media: bytes | None
    media_sha256: str
    thumbnail: bytes | None
    name: str
    media_type: str
    metadata_json: str
    thumbnail_promised: bool


def snapshot(upload: Upload) -> Received:
    return Received(
        media=upload.media.path.read_bytes() if upload.media_received else None,
        media_sha256=upload.media.sha256,
        thumbnail=upload.thumbnail.path.read_bytes() if upload.thumbnail else None,
        name=upload.fields.name,
        media_type=upload.fields.media_type,
        metadata_json=upload.fields.metadata_json,
        thumbnail_promised=upload.fields.thumbnail_promised,
    )


def pieces(data: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def receive(storage: Storage, chunks: list[bytes] | Iterator[bytes], **upload_kw: int) -> Received:
    with new_upload(storage, **upload_kw) as upload:
        form = FormReceiver(upload, CONTENT_TYPE, max_metadata_bytes=MAX_METADATA)
        for chunk in chunks:
            form.feed(chunk)
        form.finish()
        return snapshot(upload)


def fail(storage: Storage, data: bytes, error: type[GalleryError], reason: str, *, size: int | None = None,
         content_type: str = CONTENT_TYPE, **upload_kw: int) -> GalleryError:
    """Feed `data` (whole, or in pieces of `size`) then finish; expect `error` with `reason`."""
    with pytest.raises(error) as info, new_upload(storage, **upload_kw) as upload:
        form = FormReceiver(upload, content_type, max_metadata_bytes=MAX_METADATA)
        for chunk in pieces(data, size or max(len(data), 1)):
            form.feed(chunk)
        form.finish()
    assert type(info.value) is error, info.value
    assert info.value.reason == reason
    assert stored_files(storage.data_dir) == []
    return info.value


EXPECTED = Received(
    media=MEDIA,
    media_sha256=hashlib.sha256(MEDIA).hexdigest(),
    thumbnail=THUMB,
    name="café photo.png",
    media_type="image",
    metadata_json='{"gps":{"lat":1.5},"tags":["a","b"]}',
    thumbnail_promised=True,
)


# -- happy paths ----------------------------------------------------------------------------------


def test_whole_body(storage: Storage) -> None:
    assert receive(storage, [body(*standard_parts())]) == EXPECTED
    assert stored_files(storage.data_dir) == []


def test_every_piece_size(storage: Storage) -> None:
    data = body(*standard_parts())
    for size in range(1, len(data) + 1):
        assert receive(storage, pieces(data, size)) == EXPECTED, f"piece size {size}"
    assert stored_files(storage.data_dir) == []


def test_every_split_point(storage: Storage) -> None:
    data = body(*standard_parts())
    for split in range(len(data) + 1):
        assert receive(storage, [data[:split], data[split:]]) == EXPECTED, f"split at {split}"
    assert stored_files(storage.data_dir) == []


def test_tiny_pieces_straddling_every_delimiter(storage: Storage) -> None:
    # Three pieces whose middle (1 or 3 bytes) sits anywhere across a CRLF--boundary delimiter.
    data = body(*standard_parts())
    marker = b"\r\n--" + BOUNDARY.encode()
    starts = [0]
    start = data.find(marker)
    while start != -1:
        starts.append(start)
        start = data.find(marker, start + 1)
    assert len(starts) == len(standard_parts()) + 1
    for start in starts:
        for a in range(start, min(len(data), start + len(marker) + 4)):
            for width in (1, 3):
                b = a + width
                assert receive(storage, [data[:a], data[a:b], data[b:]]) == EXPECTED, (a, b)


def test_empty_chunks_are_harmless(storage: Storage) -> None:
    data = body(*standard_parts())
    chunks = [b""] + [piece for chunk in pieces(data, 7) for piece in (chunk, b"")]
    assert receive(storage, chunks) == EXPECTED


def test_parts_in_any_order(storage: Storage) -> None:
    # Every relative order of five parts, with the sixth moved through every position.
    first, *rest = standard_parts()
    for i, order in enumerate(itertools.permutations(rest)):
        parts = list(order)
        parts.insert(i % (len(parts) + 1), first)
        assert receive(storage, [body(*parts)]) == EXPECTED, [p.name for p in parts]


def test_minimal_form_only_event(storage: Storage) -> None:
    received = receive(storage, [body(Part("event", b"hello", filename="a.txt"))])
    assert received == Received(
        media=b"hello", media_sha256=hashlib.sha256(b"hello").hexdigest(), thumbnail=None,
        name="", media_type="", metadata_json="{}", thumbnail_promised=False,
    )


def test_empty_event_part_is_a_zero_byte_file(storage: Storage) -> None:
    received = receive(storage, [body(Part("name", b"empty.bin"), Part("event", b"", filename="e"))])
    assert received.media == b""
    assert received.media_sha256 == hashlib.sha256(b"").hexdigest()


@pytest.mark.parametrize("event", [
    Part("event", b"", filename="", content_type="application/octet-stream"),  # what a browser sends
    Part("event", b"", filename=""),
])
def test_a_file_input_left_empty_is_no_event_file(storage: Storage, event: Part) -> None:
    """HTML's form data set: no file chosen is a part with filename="" and no bytes."""
    for piece in (1, 7, 1 << 20):
        with new_upload(storage) as upload:
            form = FormReceiver(upload, CONTENT_TYPE, max_metadata_bytes=MAX_METADATA)
            for chunk in pieces(body(Part("name", b"x.jpg"), event), piece):
                form.feed(chunk)
            form.finish()
            assert not upload.media_received


@pytest.mark.parametrize("event", [
    Part("event", b"x", filename=""),  # bytes with no file name: a file (its name is the form's)
    Part("event", b"", filename="empty.txt"),  # an empty file chosen
    Part("event", b""),  # a field with no filename at all
])
def test_any_other_event_part_is_a_file(storage: Storage, event: Part) -> None:
    received = receive(storage, [body(Part("name", b"x.bin"), event)])
    assert received.media == event.value


def test_an_empty_filename_beside_a_filename_star_is_a_file(storage: Storage) -> None:
    event = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"event\"; filename=\"\";"
             " filename*=UTF-8''%C3%A9.txt\r\n\r\n\r\n").encode()
    received = receive(storage, [Part("name", b"x.bin").encode() + event + f"--{BOUNDARY}--\r\n".encode()])
    assert received.media == b""


def test_no_event_part_means_no_media(storage: Storage) -> None:
    with new_upload(storage) as upload:
        form = FormReceiver(upload, CONTENT_TYPE, max_metadata_bytes=MAX_METADATA)
        form.feed(body(Part("name", b"x")))
        form.finish()
        assert not upload.media_received
        assert upload.thumbnail is None


def test_text_fields_are_trimmed_and_flags_parsed(storage: Storage) -> None:
    for flag, expected in [("true", True), ("TRUE", True), (" 1 ", True), ("yes", True), ("on", True),
                           ("t", True), ("Y", True), ("f", False), ("n", False),  # as the query's booleans
                           ("false", False), ("0", False), ("no", False), ("off", False), ("", False)]:
        received = receive(storage, [body(
            Part("event", b"x"), Part("media_type", b"  video \r\n\t"), Part("has_thumbnail", flag.encode()),
        )])
        assert received.media_type == "video"
        assert received.thumbnail_promised is expected, flag


def test_text_field_at_limit_is_accepted(storage: Storage) -> None:
    received = receive(storage, [body(Part("event", b"x"), Part("media_type", b"v" * 64))])
    assert received.media_type == "v" * 64


def test_metadata_at_limit_is_accepted(storage: Storage) -> None:
    metadata = b'{"k":"' + b"v" * (MAX_METADATA - 8) + b'"}'
    assert len(metadata) == MAX_METADATA
    received = receive(storage, [body(Part("event", b"x"), Part("metadata", metadata))])
    assert received.metadata_json == metadata.decode()



def test_device_event_id_at_limit_is_accepted(storage: Storage) -> None:
    # 128 characters of 4 bytes each, and up to 64 bytes of whitespace around them.
    value = "\U0001F600" * 128
    raw = b" " * 32 + value.encode() + b"\r\n" * 16
    assert len(raw) == 4 * 128 + 64
    with new_upload(storage) as upload:
        form = FormReceiver(upload, CONTENT_TYPE, max_metadata_bytes=MAX_METADATA)
        form.feed(body(Part("event", b"x"), Part("device_event_id", raw)))
        form.finish()
        assert upload.fields.device_event_id == value
    data = body(Part("event", b"x"), Part("device_event_id", raw + b" "))
    error = fail(storage, data, InvalidArgument, "FORM_FIELD_TOO_LARGE")
    assert error.field == "device_event_id"

def test_a_boundary_python_multipart_refuses_is_a_bad_request(storage: Storage) -> None:
    """257 bytes: python-multipart's own error was the server's 500, with an ERROR traceback."""
    longest = "b" * 256
    parts = [Part("name", b"x.bin"), Part("event", MEDIA, filename="x.bin")]
    with new_upload(storage) as upload:
        form = FormReceiver(upload, f"multipart/form-data; boundary={longest}", max_metadata_bytes=MAX_METADATA)
        form.feed(body(*parts, boundary=longest))
        form.finish()
        assert upload.media.path.read_bytes() == MEDIA
    with new_upload(storage) as upload, pytest.raises(InvalidArgument) as info:
        FormReceiver(upload, f"multipart/form-data; boundary={longest}b", max_metadata_bytes=MAX_METADATA)
    assert (info.value.reason, info.value.field) == ("MALFORMED_MULTIPART", "content_type")
    assert "longer than 256 bytes" in info.value.message


@pytest.mark.parametrize(
    "content_type",
    [
        f'multipart/form-data; boundary="{BOUNDARY}"',
        f"Multipart/Form-Data; Boundary={BOUNDARY}",
        f"multipart/form-data;boundary={BOUNDARY}",
        f"multipart/form-data; charset=utf-8; boundary={BOUNDARY}",
    ],
)
def test_content_type_variants(storage: Storage, content_type: str) -> None:
    assert multipart_boundary(content_type) == BOUNDARY.encode()
    with new_upload(storage) as upload:
        form = FormReceiver(upload, content_type, max_metadata_bytes=MAX_METADATA)
        form.feed(body(*standard_parts()))
        form.finish()
        assert snapshot(upload) == EXPECTED


@pytest.mark.parametrize("preamble", [
    b"\r\n",  # what some clients send
    b"This is a multi-part message in MIME format.\r\n",
    b"two lines\r\nand an LF only\n",
    f"not a boundary: --{BOUNDARY} (mid-line)\r\n".encode(),
    b"x" * 10_000 + b"\r\n",
])
def test_preamble_is_ignored(storage: Storage, preamble: bytes) -> None:
    # RFC 2046 5.1.1: anything before the first boundary line is a preamble, to be ignored.
    data = preamble + body(*standard_parts())
    assert receive(storage, [data]) == EXPECTED
    assert receive(storage, pieces(data, 7)) == EXPECTED  # the boundary line split anywhere


def test_a_body_without_a_boundary_line_is_refused_early(storage: Storage) -> None:
    """Not held for ever: past MAX_PREAMBLE_BYTES without a boundary line, the feed fails."""
    with new_upload(storage) as upload:
        form = FormReceiver(upload, CONTENT_TYPE, max_metadata_bytes=MAX_METADATA)
        form.feed(b"y" * MAX_PREAMBLE_BYTES)
        with pytest.raises(InvalidArgument) as refused:
            form.feed(f"--{BOUNDARY}".encode())  # not at the start of a line: still the preamble
        assert refused.value.reason == "MALFORMED_MULTIPART"



def test_the_preamble_limit_is_64_kib(storage: Storage) -> None:
    assert MAX_PREAMBLE_BYTES == 64 << 10
    preamble = b"y" * (MAX_PREAMBLE_BYTES - 2) + b"\r\n"
    assert receive(storage, [preamble, body(*standard_parts())]) == EXPECTED
    with new_upload(storage) as upload:
        form = FormReceiver(upload, CONTENT_TYPE, max_metadata_bytes=MAX_METADATA)
        with pytest.raises(InvalidArgument) as refused:
            form.feed(b"y" + preamble)
        assert refused.value.reason == "MALFORMED_MULTIPART"

# -- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        "",
        "application/json",
        "multipart/form-data",
        "multipart/form-data; boundary=",
        'multipart/form-data; boundary=""',
        f"multipart/mixed; boundary={BOUNDARY}",
        f"text/plain; boundary={BOUNDARY}",
    ],
)
def test_bad_content_type(storage: Storage, content_type: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        multipart_boundary(content_type)
    assert info.value.reason == "NOT_MULTIPART"
    with new_upload(storage) as upload, pytest.raises(InvalidArgument) as info:
        FormReceiver(upload, content_type, max_metadata_bytes=MAX_METADATA)
    assert info.value.reason == "NOT_MULTIPART"
    assert info.value.field == "content_type"
    assert stored_files(storage.data_dir) == []


@pytest.mark.parametrize("size", [None, 1, 3, 16])
def test_fields_the_upload_does_not_read_are_skipped(storage: Storage, size: int | None) -> None:
    """As HTTP frameworks skip them: a client may send more than the reference lists, text or
    files, named twice."""
    others = [Part("device_id", b"cam1"), Part("owner", b"mallory"), Part("owner", b"again"),
              Part("filename", b"not the name"), Part("file", MEDIA[::-1], filename="x.png", content_type="image/png"),
              Part("timestamp", b"x" * forms.MAX_OTHER_PART_BYTES)]
    parts = standard_parts()
    data = body(*others[:3], *parts[:3], *others[3:], *parts[3:])
    assert receive(storage, pieces(data, size or len(data))) == EXPECTED


@pytest.mark.parametrize(("name", "meant"), [
    ("deviceEventId", "device_event_id"), ("mediaType", "media_type"), ("Media-Type", "media_type"),
    ("hasThumbnail", "has_thumbnail"), ("Name", "name"), ("EVENT", "event"), ("Thumbnail", "thumbnail"),
    ("META_DATA", "metadata"), ("media type", "media_type"), ("device.event.id ", "device_event_id"),
    ("device_event_id[]", "device_event_id"), ("device_event_id\x00", "device_event_id"),
])
def test_a_field_the_upload_reads_spelt_otherwise_is_refused(storage: Storage, name: str, meant: str) -> None:
    """The client meant that field: skipping it would change what is stored (a retry keyed by
    `deviceEventId` stored twice, a `mediaType` lost)."""
    data = body(Part("name", b"a.mp4"), Part("event", b"abc"), Part(name, b"x"))
    error = fail(storage, data, InvalidArgument, "UNKNOWN_FORM_FIELD")
    assert (error.field, error.message) == (name, f"unknown form field {name!r}: the field is {meant!r}")


@pytest.mark.parametrize("name", ["event_id", "sha256", "SHA-256", "size", "mime_type", "metadata_json"])
def test_a_field_of_the_native_upload_is_refused(storage: Storage, name: str) -> None:
    """Skipped, each would lose what the client sent it for: a pull answered as a new event, a
    checksum or size never checked."""
    data = body(Part("name", b"a.mp4"), Part("event", b"abc"), Part(name, b"x"))
    error = fail(storage, data, InvalidArgument, "UNKNOWN_FORM_FIELD")
    assert error.field == name and "is not one of this upload's" in error.message


def test_fields_skipped_are_bounded(storage: Storage) -> None:
    data = body(Part("event", b"abc"), Part("notes", b"x" * (forms.MAX_OTHER_PART_BYTES + 1)))
    error = fail(storage, data, InvalidArgument, "FORM_FIELD_TOO_LARGE", size=4096)
    assert error.field == "notes"
    many = [Part(f"f{n}", b"") for n in range(forms.MAX_OTHER_PARTS)]
    assert receive(storage, [body(Part("event", MEDIA), *many)]).media == MEDIA
    error = fail(storage, body(Part("event", b"abc"), *many, Part("o" * 100, b"")), InvalidArgument,
                 "TOO_MANY_FORM_FIELDS")
    assert error.field == "o" * 64  # a name is told in its first 64 characters


def test_part_without_name_is_unknown(storage: Storage) -> None:
    """RFC 7578 4.2: every part names its field."""
    data = (f"--{BOUNDARY}\r\nContent-Type: text/plain\r\n\r\nx\r\n--{BOUNDARY}--\r\n").encode()
    fail(storage, data, InvalidArgument, "UNKNOWN_FORM_FIELD")


@pytest.mark.parametrize("name", ["event", "thumbnail", "name", "media_type", "has_thumbnail", "metadata"])
@pytest.mark.parametrize("size", [None, 1, 5])
def test_duplicate_field(storage: Storage, name: str, size: int | None) -> None:
    data = body(Part(name, b"1"), Part("event", b"abc") if name != "event" else Part("name", b"n"), Part(name, b"0"))
    error = fail(storage, data, InvalidArgument, "DUPLICATE_FORM_FIELD", size=size)
    assert error.field == name


@pytest.mark.parametrize(
    "name,limit", [("name", 4 * 255), ("media_type", 64), ("has_thumbnail", 16), ("metadata", MAX_METADATA)]
)
@pytest.mark.parametrize("size", [None, 1, 7])
def test_oversize_text_field(storage: Storage, name: str, limit: int, size: int | None) -> None:
    data = body(Part("event", b"abc"), Part(name, b"a" * (limit + 1)))
    error = fail(storage, data, InvalidArgument, "FORM_FIELD_TOO_LARGE", size=size)
    assert error.field == name


def test_oversize_text_field_is_refused_while_streaming(storage: Storage) -> None:
    # A huge text field must be refused as it arrives, not buffered until the end.
    with new_upload(storage) as upload:
        form = FormReceiver(upload, CONTENT_TYPE, max_metadata_bytes=MAX_METADATA)
        form.feed(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="name"\r\n\r\n'.encode())
        with pytest.raises(InvalidArgument) as info:
            for _ in range(100):
                form.feed(b"n" * 100)
        assert info.value.reason == "FORM_FIELD_TOO_LARGE"


def test_oversize_event(storage: Storage) -> None:
    data = body(Part("event", b"x" * 101))
    error = fail(storage, data, TooLarge, "UPLOAD_TOO_LARGE", size=10, max_media=100)
    assert error.field == "event"


def test_oversize_thumbnail(storage: Storage) -> None:
    data = body(Part("event", b"x"), Part("thumbnail", b"t" * 51))
    error = fail(storage, data, TooLarge, "UPLOAD_TOO_LARGE", size=10, max_thumb=50)
    assert error.field == "thumbnail"


@pytest.mark.parametrize("cut", [0, 1, 10, 60, -3, -4, -6, -10, -40])
def test_truncated_body(storage: Storage, cut: int) -> None:
    data = body(*standard_parts())
    fail(storage, data[:cut], InvalidArgument, "MALFORMED_MULTIPART", size=13)


def test_every_truncation_is_refused(storage: Storage) -> None:
    data = body(*standard_parts())
    for cut in range(len(data) - 2):  # the final CRLF after the closing boundary is optional
        with new_upload(storage) as upload:
            form = FormReceiver(upload, CONTENT_TYPE, max_metadata_bytes=MAX_METADATA)
            with pytest.raises(InvalidArgument) as info:
                form.feed(data[:cut])
                form.finish()
            assert info.value.reason in {"MALFORMED_MULTIPART"}, (cut, info.value.reason)
    assert stored_files(storage.data_dir) == []


def test_body_not_starting_with_boundary(storage: Storage) -> None:
    fail(storage, b"this is not multipart at all\r\n", InvalidArgument, "MALFORMED_MULTIPART")


def test_wrong_boundary(storage: Storage) -> None:
    data = body(*standard_parts(), boundary="some-other-boundary")
    fail(storage, data, InvalidArgument, "MALFORMED_MULTIPART")


@pytest.mark.parametrize("flag", [b"maybe", b"2", b"truee", b"vrai"])
def test_invalid_has_thumbnail(storage: Storage, flag: bytes) -> None:
    data = body(Part("event", b"x"), Part("has_thumbnail", flag))
    error = fail(storage, data, InvalidArgument, "INVALID_HAS_THUMBNAIL")
    assert error.field == "has_thumbnail"


@pytest.mark.parametrize("metadata", [b"[1]", b"nope", b'"s"', b"{", b'{"a": NaN}'])
def test_invalid_metadata(storage: Storage, metadata: bytes) -> None:
    data = body(Part("event", b"x"), Part("metadata", metadata))
    error = fail(storage, data, InvalidArgument, "INVALID_METADATA")
    assert error.field == "metadata"


def test_staging_holds_files_only_while_open(storage: Storage) -> None:
    upload = new_upload(storage)
    form = FormReceiver(upload, CONTENT_TYPE, max_metadata_bytes=MAX_METADATA)
    form.feed(body(*standard_parts()))
    form.finish()
    assert len(stored_files(storage.data_dir)) == 2  # media and thumbnail, staged
    upload.close()
    assert stored_files(storage.data_dir) == []
    upload.close()  # idempotent
    assert stored_files(storage.data_dir) == []


def test_staging_empty_after_error_midway(storage: Storage) -> None:
    data = body(Part("event", MEDIA), Part("thumbnail", THUMB), Part("bogus", b"x" * (forms.MAX_OTHER_PART_BYTES + 1)))
    fail(storage, data, InvalidArgument, "FORM_FIELD_TOO_LARGE", size=9)


def test_a_bad_device_event_id_is_refused_before_the_event_file(storage: Storage) -> None:
    """device_event_id is checked when its part ends, not after the (large) file that follows."""
    with new_upload(storage) as upload:
        form = FormReceiver(upload, CONTENT_TYPE, max_metadata_bytes=MAX_METADATA)
        with pytest.raises(InvalidArgument) as info:
            form.feed(Part("device_event_id", "DSC\u2028001".encode()).encode()
                      + Part("event", b"x" * 100).encode()[:60])
        assert info.value.reason == "INVALID_DEVICE_EVENT_ID"
    trimmed = body(Part("device_event_id", b" DSC_0001\n"), Part("event", b"abc"))
    with new_upload(storage) as upload:
        form = FormReceiver(upload, CONTENT_TYPE, max_metadata_bytes=MAX_METADATA)
        form.feed(trimmed)
        form.finish()
        assert upload.fields.device_event_id == "DSC_0001"


def test_a_content_type_beyond_latin_1_is_not_multipart(storage: Storage) -> None:
    with pytest.raises(InvalidArgument) as info:
        multipart_boundary("multipart/form-data; boundary=\u0100")
    assert info.value.reason == "NOT_MULTIPART"
    assert info.value.field == "content_type"


@pytest.mark.parametrize("name", ["name", "media_type", "has_thumbnail", "metadata", "device_event_id"])
def test_a_text_field_not_utf8_is_refused(storage: Storage, name: str) -> None:
    data = body(Part("event", b"x"), Part(name, b"caf\xe9"))
    error = fail(storage, data, InvalidArgument, "FORM_FIELD_NOT_UTF8")
    assert error.field == name


def test_a_field_name_not_utf8_is_refused_as_the_field_it_nearly_names(storage: Storage) -> None:
    data = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="even'.encode() + b"\xff"
            + f't"\r\n\r\nx\r\n--{BOUNDARY}--\r\n'.encode())
    error = fail(storage, data, InvalidArgument, "UNKNOWN_FORM_FIELD")
    assert error.field == "even\ufffdt" and error.message.endswith("the field is 'event'")


def test_a_full_disk_while_receiving_the_event_is_its_own_error(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    def write_media(self: Upload, data: bytes | memoryview) -> None:
        if data:
            raise Exhausted("INSUFFICIENT_STORAGE", "no space left")

    monkeypatch.setattr(Upload, "write_media", write_media)
    fail(storage, body(Part("event", b"abc")), Exhausted, "INSUFFICIENT_STORAGE", size=5)


@pytest.mark.parametrize("raised", [
    # The device over its quota before any byte (the quota lowered below what it keeps): at the
    # event part's headers, where the upload learns it has a file.
    Exhausted("DEVICE_QUOTA_EXCEEDED", "device cam1 is at its quota"),
    DatabaseUnavailable(),  # the quota's figure read again
    OSError(errno.EIO, "Input/output error"),  # a failing disk: the server's fault, not the body's
], ids=["quota", "database", "disk"])
def test_what_a_form_cannot_help_is_not_a_malformed_body(
    storage: Storage, monkeypatch: pytest.MonkeyPatch, raised: Exception,
) -> None:
    """python-multipart lets our callbacks' errors through: they keep their own status (507, 503,
    500 with its traceback logged), where they were all 400 MALFORMED_MULTIPART."""
    def write_media(self: Upload, data: bytes | memoryview) -> None:
        raise raised

    monkeypatch.setattr(Upload, "write_media", write_media)
    with pytest.raises(type(raised)) as info, new_upload(storage) as upload:
        FormReceiver(upload, CONTENT_TYPE, max_metadata_bytes=MAX_METADATA).feed(body(Part("event", b"abc")))
    assert info.value is raised
