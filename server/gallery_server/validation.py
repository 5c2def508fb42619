"""Validators for every identifier and name that enters the service.

The policy, everywhere a name or id comes in (REST path, query and form, native fields, pre-signed
URLs, the drop folders):
- Identifiers are ASCII-only patterns, so no look-alike, NUL, separator or traversal can pass:
  device ids `^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$`, event ids `evt_` + 22 URL-safe characters,
  upload ids `^[A-Za-z0-9_-]{8,64}$` (resumable uploads' ids), sha256 64 lowercase hex digits. Nothing is
  normalised: a value is either exactly valid or refused.
- Display names (the event's filename, a pre-signed URL's filename, an announced name) are
  NFC-normalised, then must be 1..255 characters and hold no control (Cc), format (Cf: bidi
  overrides and isolates, zero-width characters, BOM), surrogate, private-use or unassigned
  character, nor a line or paragraph separator; `.` and `..` are refused. Look-alike letters of
  other scripts are allowed (they are real names in those scripts). A name is never used to build
  a path; `/` and `\\` are allowed in it and replaced in Content-Disposition.
- A device_event_id follows the character rules of names, at most 128 characters, compared
  exactly (validation.device_event_id() at every entry point).
- Metadata keys (at every depth) follow the same character rules as names and are at most 256
  characters; keys and string values must be valid Unicode (no lone surrogates, which JSON's
  `\\ud800` escapes can produce).
- Page tokens and signed-URL tokens are opaque, bounded and authenticated or parsed defensively
  (paging.py, signed_urls.py): any malformed one is the same 400 or 403.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import unicodedata
from typing import Any

from . import logs
from .errors import InvalidArgument

MEDIA_TYPES = ("image", "video", "audio", "document", "other")
MAX_NAME_CHARS = 255
MAX_DEVICE_EVENT_ID_CHARS = 128
MAX_LIMIT = 1000
DEFAULT_LIMIT = 50

_DEVICE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_EVENT_ID_RE = re.compile(r"evt_[A-Za-z0-9_-]{22}")
_UPLOAD_ID_RE = re.compile(r"[A-Za-z0-9_-]{8,64}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


def new_event_id() -> str:
    # 128 random bits, URL-safe base64 without padding: 22 characters.
    return "evt_" + secrets.token_urlsafe(16)


def device_id(value: str) -> str:
    if not _DEVICE_RE.fullmatch(value):
        raise InvalidArgument(
            "INVALID_DEVICE_ID",
            "device must match ^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$",
            field="device",
            device=value[:200],
        )
    logs.note(device=value)
    return value


def upload_id(value: str) -> str:
    """A resumable upload's id, chosen by the client or the server (StartUpload)."""
    if not _UPLOAD_ID_RE.fullmatch(value):
        raise InvalidArgument(
            "INVALID_UPLOAD_ID", "upload_id must match ^[A-Za-z0-9_-]{8,64}$",
            field="upload_id", upload_id=value[:200],
        )
    return value


def event_id(value: str) -> str:
    if not _EVENT_ID_RE.fullmatch(value):
        raise InvalidArgument(
            "INVALID_EVENT_ID", "eventId must look like evt_ followed by 22 URL-safe characters",
            field="event_id", event_id=value[:200],
        )
    return value


def display_name(value: str, field: str = "name") -> str:
    """A filename shown to users: never used to build a path, but kept printable and bounded."""
    value = unicodedata.normalize("NFC", value)  # before measuring: NFC can lengthen a name
    if not value.strip():  # blanks alone name nothing (`?filename=+` is one space)
        raise InvalidArgument("NAME_REQUIRED", f"{field} is required", field=field)
    if len(value) > MAX_NAME_CHARS:
        raise InvalidArgument(
            "NAME_TOO_LONG", f"{field} is longer than {MAX_NAME_CHARS} characters", field=field
        )
    if not _printable(value):
        raise InvalidArgument(
            "NAME_INVALID", f"{field} contains control, format or unassigned characters",
            field=field,
        )
    if value in (".", ".."):
        raise InvalidArgument("NAME_INVALID", f"{field} cannot be . or ..", field=field)
    return value


# Control, format (bidi overrides, zero-width), surrogate, private-use, unassigned; line and
# paragraph separators, which split log lines and headers as a newline would.
_UNPRINTABLE = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def _printable(value: str) -> bool:
    return not any(unicodedata.category(c) in _UNPRINTABLE for c in value)


def device_event_id(value: str) -> str:
    """A device's own id for a capture (empty: none), from any entry point (REST form field,
    native UploadHeader and StartUpload). Surrounding whitespace is dropped (a form field's
    trailing newline); what remains is 1 to MAX_DEVICE_EVENT_ID_CHARS characters, printable by
    the rule of display names. Only whitespace is refused, not taken for none: a device that sent
    it as its id would store each retry anew. Not NFC-normalised: it is compared exactly, as the
    device sent it."""
    stripped = value.strip()
    if len(stripped) > MAX_DEVICE_EVENT_ID_CHARS or not _printable(stripped) or (value and not stripped):
        raise InvalidArgument(
            "INVALID_DEVICE_EVENT_ID",
            f"device_event_id must be 1 to {MAX_DEVICE_EVENT_ID_CHARS} printable characters, not only whitespace",
            field="device_event_id",
        )
    return stripped


def media_type(value: str) -> str:
    if value not in MEDIA_TYPES:
        raise InvalidArgument(
            "INVALID_MEDIA_TYPE",
            f"media_type must be one of {', '.join(MEDIA_TYPES)}",
            field="media_type",
            media_type=value[:64],
        )
    return value


def page(limit: int | None, offset: int | None) -> tuple[int, int]:
    limit = DEFAULT_LIMIT if limit is None else limit
    offset = 0 if offset is None else offset
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidArgument(
            "INVALID_LIMIT", f"limit must be between 1 and {MAX_LIMIT}", field="limit",
            limit=str(limit),
        )
    if offset < 0:
        raise InvalidArgument(
            "INVALID_OFFSET", "offset must be >= 0", field="offset", offset=str(offset)
        )
    return limit, offset


def sha256_hex(value: str) -> str:
    if value and not _SHA256_RE.fullmatch(value):
        raise InvalidArgument(
            "INVALID_SHA256", "sha256 must be 64 lowercase hex digits", field="sha256"
        )
    return value


def metadata_json(text: str, max_bytes: int) -> str:
    """Validate a metadata JSON string; return it in canonical compact form."""
    _check_unicode(text)
    if len(text.encode()) > max_bytes:
        raise _metadata_too_large(max_bytes)
    try:
        value = json.loads(text, parse_constant=_reject_constant) if text.strip() else {}
    except (ValueError, RecursionError):
        raise _invalid_metadata("metadata must be a JSON object") from None
    return metadata_object(value, max_bytes)


def metadata_object(value: Any, max_bytes: int) -> str:
    if not isinstance(value, dict):
        raise _invalid_metadata("metadata must be a JSON object")
    # Metadata travels as a google.protobuf.Struct, whose numbers are doubles: refuse numbers a
    # double cannot hold exactly rather than store what could never be read back unchanged.
    try:
        values = _check_metadata_value(value, 1) - 1  # the metadata object itself is no value in it
    except RecursionError:
        raise _invalid_metadata("metadata is nested too deeply") from None
    if values > MAX_METADATA_VALUES:
        raise _invalid_metadata(f"metadata must not hold over {MAX_METADATA_VALUES} values")
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    if len(text.encode()) > max_bytes:
        raise _metadata_too_large(max_bytes)
    return text


_MAX_EXACT_INT = 2**53
MAX_METADATA_KEY_CHARS = 256
# Objects and arrays inside one another, the metadata object itself the first. As a protobuf
# Struct each level is two messages deep (Value, then Struct or ListValue) inside the Event and
# its answer, and readers stop at 100 (protobuf's recursion limit: grpcio's Python client; Envoy's
# transcoder answers 502): an event nested near 50 levels would be stored and never read back.
MAX_METADATA_DEPTH = 32
# Values at every depth (objects, arrays, strings, numbers, booleans, nulls). Every read of one
# event builds its metadata as a Struct, ~1.5 - 2 us per value in Python, while the bytes limit
# lets one hold tens of thousands (64 KiB of `[],`: 21,000 values, ~55 ms of the server's CPU per
# read, against 2 - 10 ms for a usual one: black-box review, 2026-12-02). At this count a read
# costs a few ms at most.
MAX_METADATA_VALUES = 2048


def _check_metadata_value(value: Any, depth: int) -> int:
    """Check depth, numbers, keys and strings at every level; return how many values `value` is."""
    if isinstance(value, (dict, list)) and depth > MAX_METADATA_DEPTH:
        raise _invalid_metadata(f"metadata must not nest objects and arrays over {MAX_METADATA_DEPTH} deep")
    values = 1
    if isinstance(value, dict):
        for key, item in value.items():
            _check_key(key)
            values += _check_metadata_value(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            values += _check_metadata_value(item, depth + 1)
    elif isinstance(value, bool):
        pass
    elif isinstance(value, str):
        _check_unicode(value)
    elif isinstance(value, int) and abs(value) > _MAX_EXACT_INT:
        raise _invalid_metadata("metadata integers must be within +/-2^53")
    elif isinstance(value, float) and not math.isfinite(value):
        raise _invalid_metadata("metadata numbers must be finite")
    return values


def _check_key(key: str) -> None:
    _check_unicode(key)
    if not key or len(key) > MAX_METADATA_KEY_CHARS or not _printable(key):
        raise _invalid_metadata(
            f"metadata keys must be 1..{MAX_METADATA_KEY_CHARS} characters without control,"
            " format or unassigned characters"
        )


def _check_unicode(text: str) -> None:
    # A lone surrogate is no character: it cannot be encoded as UTF-8, stored or sent back.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _invalid_metadata("metadata strings must be valid Unicode (no lone surrogates)") from None


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _invalid_metadata(message: str) -> InvalidArgument:
    return InvalidArgument("INVALID_METADATA", message, field="metadata")


def _metadata_too_large(max_bytes: int) -> InvalidArgument:
    return InvalidArgument(
        "METADATA_TOO_LARGE", f"metadata is larger than {max_bytes} bytes",
        field="metadata", limit=str(max_bytes),
    )
