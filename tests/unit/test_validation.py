"""Validators: every identifier, name, page bound and metadata blob that enters the service."""

from __future__ import annotations

import json
import unicodedata

import pytest

from gallery_server import validation
from gallery_server.errors import GalleryError, InvalidArgument


def _raises(error: type[GalleryError], reason: str, func, *args, **kwargs) -> GalleryError:  # type: ignore[no-untyped-def]
    with pytest.raises(error) as info:
        func(*args, **kwargs)
    assert type(info.value) is error
    assert info.value.reason == reason
    return info.value


# -- device ids -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "device",
    [
        "a",
        "Z",
        "0",
        "device123",
        "cam-1.front_left",
        "a" * 128,
        "9" + "._-" * 42 + "x",  # 128 characters, punctuation after the first
        "a..b",
        "a-",
        "a.",
        "00:1a:2b:3c:4d:5e",  # a MAC address
        "a:",
    ],
)
def test_device_id_valid(device: str) -> None:
    assert validation.device_id(device) == device


@pytest.mark.parametrize(
    "device",
    [
        "",
        ".",
        "..",
        ".hidden",
        "-flag",
        "_under",
        "a" * 129,
        "a/b",
        "../etc",
        "a\\b",
        "a\x00",
        "\x00",
        "a b",
        "a\n",
        "cam1\n",
        "\u0430bc",  # Cyrillic a
        "dev\u0456ce",  # Cyrillic i
        "\uff41",  # fullwidth a
        "caf\u00e9",
        "\u0661\u0662",  # Arabic-Indic digits: \d would take them, the regex must not
        ":a",  # a colon stands anywhere but first
        "a%2Fb",
    ],
)
def test_device_id_invalid(device: str) -> None:
    error = _raises(InvalidArgument, "INVALID_DEVICE_ID", validation.device_id, device)
    assert error.field == "device"


def test_device_id_error_metadata_is_bounded() -> None:
    error = _raises(InvalidArgument, "INVALID_DEVICE_ID", validation.device_id, "/" * 5000)
    assert len(error.metadata["device"]) <= 200


# -- event ids ------------------------------------------------------------------------------------


def test_new_event_ids_are_valid_and_unique() -> None:
    ids = {validation.new_event_id() for _ in range(500)}
    assert len(ids) == 500
    for value in ids:
        assert validation.event_id(value) == value
        assert len(value) == 4 + 22


@pytest.mark.parametrize("value", ["evt_" + "A" * 22, "evt_" + "-_09azAZ" * 2 + "abcdef"])
def test_event_id_valid(value: str) -> None:
    assert validation.event_id(value) == value


@pytest.mark.parametrize(
    "value",
    [
        "",
        "evt_",
        "evt_" + "a" * 21,
        "evt_" + "a" * 23,
        "EVT_" + "a" * 22,
        "ev_" + "a" * 23,
        "evt_" + "a" * 21 + "/",
        "evt_" + "a" * 21 + ".",
        "evt_" + "a" * 21 + "=",
        "evt_" + "a" * 21 + "\x00",
        "evt_" + "a" * 21 + "\u0430",
        "evt_" + "a" * 22 + "\n",
        "../evt_" + "a" * 22,
    ],
)
def test_event_id_invalid(value: str) -> None:
    error = _raises(InvalidArgument, "INVALID_EVENT_ID", validation.event_id, value)
    assert error.field == "event_id"


# -- display names --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["a", "photo.jpg", "x" * 255, "résumé final (2).pdf", "日本語.png", "a b", "../../etc/passwd", "😀.gif"],
)
def test_display_name_valid(name: str) -> None:
    assert validation.display_name(name) == unicodedata.normalize("NFC", name)


def test_display_name_is_nfc_normalised() -> None:
    decomposed = "cafe\u0301.jpg"
    assert validation.display_name(decomposed) == "caf\u00e9.jpg"
    assert validation.display_name("\u212b") == "\u00c5"  # Angstrom sign -> A with ring


@pytest.mark.parametrize("char", ["\u0958", "\ufb2c", "\U0001d160"])  # NFC expands each to 2-3 code points
def test_display_name_limit_holds_after_normalisation(char: str) -> None:
    # The contract is 1..255 characters for the name as stored and returned, i.e. after NFC.
    try:
        result = validation.display_name(char * validation.MAX_NAME_CHARS)
    except InvalidArgument as exc:
        assert exc.reason == "NAME_TOO_LONG"
    else:
        assert len(result) <= validation.MAX_NAME_CHARS, f"stored name has {len(result)} characters"
    assert len(validation.display_name(char * 10)) <= validation.MAX_NAME_CHARS


def test_display_name_required() -> None:
    error = _raises(InvalidArgument, "NAME_REQUIRED", validation.display_name, "")
    assert error.field == "name"
    error = _raises(InvalidArgument, "NAME_REQUIRED", validation.display_name, "", "filename")
    assert error.field == "filename"
    for blank in (" ", "  ", "\t ", "\u00a0", "\u3000"):  # `?filename=+` is one space: it names nothing
        _raises(InvalidArgument, "NAME_REQUIRED", validation.display_name, blank)
    assert validation.display_name(" a ") == " a "  # a name keeps its own spaces


def test_display_name_too_long() -> None:
    error = _raises(InvalidArgument, "NAME_TOO_LONG", validation.display_name, "x" * 256)
    assert error.field == "name"
    _raises(InvalidArgument, "NAME_TOO_LONG", validation.display_name, "日" * 10_000)


@pytest.mark.parametrize(
    "name",
    [
        "a\x00b",
        "\x00",
        "line\nbreak",
        "tab\there",
        "cr\r",
        "esc\x1b[31m",
        "del\x7f",
        "c1\x85",
        "evil\u202egpj.exe",  # RIGHT-TO-LEFT OVERRIDE
        "\u202dx",  # LEFT-TO-RIGHT OVERRIDE
        "iso\u2066late",  # LEFT-TO-RIGHT ISOLATE
        "zero\u200bwidth",  # ZERO WIDTH SPACE (Cf)
        "bom\ufeff",
        "private\ue000",
        "unassigned\u0378",
    ],
)
def test_display_name_rejects_control_format_and_unassigned(name: str) -> None:
    error = _raises(InvalidArgument, "NAME_INVALID", validation.display_name, name, "filename")
    assert error.field == "filename"


# -- media types ----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["image", "video", "audio", "document", "other"])
def test_media_type_valid(value: str) -> None:
    assert validation.media_type(value) == value


@pytest.mark.parametrize("value", ["", "Image", "IMAGE", "images", " image", "image ", "text", "x" * 500])
def test_media_type_invalid(value: str) -> None:
    error = _raises(InvalidArgument, "INVALID_MEDIA_TYPE", validation.media_type, value)
    assert error.field == "media_type"
    assert len(error.metadata["media_type"]) <= 64


# -- page bounds ----------------------------------------------------------------------------------


def test_page_defaults() -> None:
    assert validation.page(None, None) == (50, 0)
    assert validation.page(None, 7) == (50, 7)
    assert validation.page(3, None) == (3, 0)


@pytest.mark.parametrize("limit,offset", [(1, 0), (1000, 0), (500, 10**9), (50, 0)])
def test_page_valid(limit: int, offset: int) -> None:
    assert validation.page(limit, offset) == (limit, offset)


@pytest.mark.parametrize("limit", [0, -1, 1001, 2**31 - 1, -(2**31)])
def test_page_invalid_limit(limit: int) -> None:
    error = _raises(InvalidArgument, "INVALID_LIMIT", validation.page, limit, 0)
    assert error.field == "limit"


@pytest.mark.parametrize("offset", [-1, -(2**31)])
def test_page_invalid_offset(offset: int) -> None:
    error = _raises(InvalidArgument, "INVALID_OFFSET", validation.page, 10, offset)
    assert error.field == "offset"


# -- sha256 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["", "0" * 64, "0123456789abcdef" * 4])
def test_sha256_valid(value: str) -> None:
    assert validation.sha256_hex(value) == value


@pytest.mark.parametrize(
    "value",
    ["0" * 63, "0" * 65, "A" * 64, "0123456789ABCDEF" * 4, "g" * 64, " " + "0" * 63, "0" * 64 + "\n", "z"],
)
def test_sha256_invalid(value: str) -> None:
    error = _raises(InvalidArgument, "INVALID_SHA256", validation.sha256_hex, value)
    assert error.field == "sha256"


# -- metadata -------------------------------------------------------------------------------------

LIMIT = 1024


@pytest.mark.parametrize(
    "text,expected",
    [
        ("", "{}"),
        ("   ", "{}"),
        ("{}", "{}"),
        ('{ "a" : 1 , "b": [true, null, "x"] }', '{"a":1,"b":[true,null,"x"]}'),
        ('{"name": "caf\\u00e9"}', '{"name":"café"}'),
        ('{"nested": {"deep": {"x": 1.5}}}', '{"nested":{"deep":{"x":1.5}}}'),
    ],
)
def test_metadata_json_accepts_objects(text: str, expected: str) -> None:
    result = validation.metadata_json(text, LIMIT)
    assert result == expected
    assert isinstance(json.loads(result), dict)


@pytest.mark.parametrize(
    "text",
    [
        "[]",
        "[1, 2]",
        '"a string"',
        "42",
        "true",
        "null",
        "{",
        "{'single': 1}",
        '{"a": 1,}',
        "not json",
        "NaN",
        "Infinity",
        "[" * 5000 + "]" * 5000,
    ],
)
def test_metadata_json_rejects_non_objects_and_garbage(text: str) -> None:
    error = _raises(InvalidArgument, "INVALID_METADATA", validation.metadata_json, text, 1 << 20)
    assert error.field == "metadata"


@pytest.mark.parametrize("text", ['{"a": NaN}', '{"a": Infinity}', '{"a": [-Infinity]}'])
def test_metadata_json_rejects_non_finite_numbers(text: str) -> None:
    # JSON has no NaN/Infinity: such metadata is a malformed request (INVALID_ARGUMENT), not a crash.
    error = _raises(InvalidArgument, "INVALID_METADATA", validation.metadata_json, text, LIMIT)
    assert error.field == "metadata"


def test_metadata_object_rejects_non_finite_numbers() -> None:
    for value in (float("nan"), float("inf"), -float("inf")):
        _raises(InvalidArgument, "INVALID_METADATA", validation.metadata_object, {"a": {"b": [value]}}, LIMIT)


# Metadata travels as a google.protobuf.Struct (numbers are doubles): integers beyond 2^53 are refused.
@pytest.mark.parametrize("number", [2**53, -(2**53), 2**53 - 1, 1.5e300, 0, -0.0])
def test_metadata_numbers_a_double_holds_are_accepted(number: float) -> None:
    result = validation.metadata_json(json.dumps({"n": [number]}), LIMIT)
    assert json.loads(result) == {"n": [number]}


@pytest.mark.parametrize("number", [2**53 + 1, -(2**53) - 1, 10**30])
def test_metadata_integers_beyond_double_precision_are_refused(number: int) -> None:
    _raises(InvalidArgument, "INVALID_METADATA", validation.metadata_json, json.dumps({"n": {"x": number}}), LIMIT)
    _raises(InvalidArgument, "INVALID_METADATA", validation.metadata_object, {"n": [number]}, LIMIT)


def test_metadata_booleans_are_not_numbers() -> None:
    assert validation.metadata_object({"t": True, "f": False}, LIMIT) == '{"t":true,"f":false}'


def test_metadata_object_nested_too_deeply() -> None:
    value: dict = {}
    inner = value
    for _ in range(100_000):
        inner["a"] = {}
        inner = inner["a"]
    _raises(InvalidArgument, "INVALID_METADATA", validation.metadata_object, value, 1 << 30)


def test_metadata_nesting_stops_at_its_depth() -> None:
    """Objects and arrays count alike, the metadata object itself the first level; values that
    are neither add none."""
    def nested(depth: int, innermost: object) -> dict:
        value = innermost  # the container at `depth`
        for level in range(depth - 1, 0, -1):
            value = {"k": value} if level % 2 else [value]
        assert isinstance(value, dict)
        return value

    deepest = validation.MAX_METADATA_DEPTH
    for innermost in ([], {}, ["leaf", 1, None]):
        value = nested(deepest, innermost)
        assert json.loads(validation.metadata_object(value, LIMIT)) == value
        error = _raises(InvalidArgument, "INVALID_METADATA", validation.metadata_object,
                        nested(deepest + 1, innermost), LIMIT)
        assert f"over {deepest} deep" in str(error)


def test_metadata_may_nest_32_deep_and_no_deeper() -> None:
    def nested(depth: int) -> dict:
        value: dict = {}
        for _ in range(depth - 1):
            value = {"k": value}
        return value

    assert validation.metadata_object(nested(32), LIMIT) == '{"k":' * 31 + "{}" + "}" * 31
    _raises(InvalidArgument, "INVALID_METADATA", validation.metadata_object, nested(33), LIMIT)


def test_metadata_values_are_counted_at_every_depth_up_to_the_limit() -> None:
    """Every object, array and scalar inside the metadata object counts; the object itself does not."""
    most = validation.MAX_METADATA_VALUES
    flat = {"a": [0] * (most - 1)}  # the array and its items
    assert json.loads(validation.metadata_object(flat, 1 << 20)) == flat
    keys = {f"k{i}": None for i in range(most)}
    assert json.loads(validation.metadata_object(keys, 1 << 20)) == keys
    nested = {"a": [{"b": [True, "x"]} for _ in range(most // 4)]}  # 1 + 4 per item
    refused = _raises(InvalidArgument, "INVALID_METADATA", validation.metadata_object, nested, 1 << 20)
    assert f"over {most} values" in str(refused)
    for too_many in ({"a": [0] * most}, {**keys, "one more": {}}, {"a": [[]] * most}):
        _raises(InvalidArgument, "INVALID_METADATA", validation.metadata_object, too_many, 1 << 20)
    # The same rule for the form's text.
    _raises(InvalidArgument, "INVALID_METADATA", validation.metadata_json, json.dumps({"a": [[]] * most}), 1 << 20)


def test_metadata_json_too_large_raw_text() -> None:
    text = json.dumps({"k": "v" * LIMIT})
    error = _raises(InvalidArgument, "METADATA_TOO_LARGE", validation.metadata_json, text, LIMIT)
    assert error.field == "metadata"
    assert error.metadata["limit"] == str(LIMIT)


def test_metadata_json_limit_counts_bytes_not_characters() -> None:
    text = json.dumps({"k": "é" * 400}, ensure_ascii=False)  # ~800 bytes, ~400 characters
    assert len(text) < 500
    _raises(InvalidArgument, "METADATA_TOO_LARGE", validation.metadata_json, text, 500)


def test_metadata_json_raw_limit_counts_bytes_not_characters() -> None:
    compact = '{"k":"' + "é" * 10 + '"}'  # 18 characters, 28 bytes
    padded = compact.replace(":", ": ")  # 29 bytes as sent: over the limit, though its compact form is not
    _raises(InvalidArgument, "METADATA_TOO_LARGE", validation.metadata_json, padded, 28)
    assert validation.metadata_json(compact, 28) == compact


def test_metadata_object_limit_counts_bytes_not_characters() -> None:
    _raises(InvalidArgument, "METADATA_TOO_LARGE", validation.metadata_object, {"k": "é" * 10}, 27)
    assert validation.metadata_object({"k": "é" * 10}, 28) == '{"k":"' + "é" * 10 + '"}'


def test_metadata_json_whitespace_does_not_count_after_canonicalisation_but_raw_size_does() -> None:
    padded = "{" + " " * 2000 + '"a": 1}'
    _raises(InvalidArgument, "METADATA_TOO_LARGE", validation.metadata_json, padded, LIMIT)
    assert validation.metadata_json(padded, 4096) == '{"a":1}'


def test_metadata_json_exactly_at_limit() -> None:
    text = '{"k":"' + "v" * (LIMIT - 8) + '"}'
    assert len(text.encode()) == LIMIT
    assert validation.metadata_json(text, LIMIT) == text


def test_metadata_object() -> None:
    assert validation.metadata_object({"b": 1, "a": "é"}, LIMIT) == '{"b":1,"a":"é"}'
    for value in ([], "x", 1, None, [("a", 1)]):
        _raises(InvalidArgument, "INVALID_METADATA", validation.metadata_object, value, LIMIT)
    _raises(InvalidArgument, "METADATA_TOO_LARGE", validation.metadata_object, {"k": "v" * LIMIT}, LIMIT)


# -- the names and ids policy (module docstring of validation.py) ---------------------------------


@pytest.mark.parametrize(
    "name", [".", "..", "line\u2028sep", "para\u2029sep", "zw\u200djoiner", "wj\u2060x", "\u061cx"]
)
def test_display_name_refuses_dot_names_separators_and_invisible_characters(name: str) -> None:
    _raises(InvalidArgument, "NAME_INVALID", validation.display_name, name)


@pytest.mark.parametrize("name", ["...", ".hidden", "a/b", "a\\b", "p\u0430ypal.jpg"])
def test_display_name_allows_what_is_only_a_display_concern(name: str) -> None:
    # Names are never paths (Content-Disposition replaces the separators) and letters of any
    # script are real names: a Cyrillic look-alike is a name, not an identifier.
    assert validation.display_name(name) == name


@pytest.mark.parametrize(
    "text",
    [
        '{"a": "\\ud800"}',  # a lone surrogate as a value: cannot be encoded, stored or returned
        '{"\\udfff": 1}',  # ... or as a key
        '{"x": [{"y": "\\ud83d"}]}',  # ... at any depth
        '{"": 1}',
        '{"a\\u0000": 1}',
        '{"evil\\u202e": 1}',
        '{"zero\\u200bwidth": 1}',
        '{"nested": {"k\\n": 1}}',
        json.dumps({"k" * 257: 1}),
    ],
)
def test_metadata_bad_keys_and_strings_refused(text: str) -> None:
    error = _raises(InvalidArgument, "INVALID_METADATA", validation.metadata_json, text, 65536)
    assert error.field == "metadata"


def test_metadata_string_values_may_hold_any_valid_text() -> None:
    value = {"note": "line\nbreak\t\u202e\u200b", "k" * 256: "ok", "emoji": "😀"}
    assert json.loads(validation.metadata_json(json.dumps(value), 65536)) == value


def test_content_disposition_never_suggests_a_path() -> None:
    from gallery_server.downloads import content_disposition

    header = content_disposition("../../etc/pass\\wd\"x.jpg")
    assert header == (
        "attachment; filename=\".._.._etc_pass_wd_x.jpg\"; "
        "filename*=UTF-8''.._.._etc_pass_wd%22x.jpg"
    )


def test_device_event_id() -> None:
    assert validation.device_event_id("") == ""
    assert validation.device_event_id("  DCIM/0042\n") == "DCIM/0042"  # every entry point strips
    assert validation.device_event_id("é" * validation.MAX_DEVICE_EVENT_ID_CHARS) == "é" * 128
    for bad in ("a" * 129, "a\x00b", "a\u2028b", "a\u200bb", "a\ud800b", "\u202eevil", " ", "\r\n", "\t \u3000"):
        with pytest.raises(InvalidArgument) as caught:
            validation.device_event_id(bad)
        assert caught.value.reason == "INVALID_DEVICE_EVENT_ID"


@pytest.mark.parametrize("value", ["a" * 8, "A-z_0-9_", "u" * 64])
def test_upload_id_valid(value: str) -> None:
    assert validation.upload_id(value) == value


@pytest.mark.parametrize("value", ["", "a" * 7, "u" * 65, "abcdefg.", "abcdefgh/", "abcdefg\u00e9", "abcdefgh\n"])
def test_upload_id_invalid(value: str) -> None:
    error = _raises(InvalidArgument, "INVALID_UPLOAD_ID", validation.upload_id, value)
    assert error.field == "upload_id"
