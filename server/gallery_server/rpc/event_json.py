"""A page of events as the REST listing's JSON, printed by the server (ListEventsJson).

The bytes must read exactly as Envoy's transcoder prints the `Event` message of the streamed
ListEvents that the route used to map to (print_options in envoy/envoy.yaml): fields in field-number
order under their JSON names, every scalar present even when empty or false, `size` a JSON number,
`created` RFC 3339 in UTC with 0, 3, 6 or 9 fractional digits, and `metadata` and `pull` absent
(a listing leaves them unset). tests/e2e/test_listing.py holds each listed event against Envoy's
own rendering of the same event by GetEvent.
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Iterable, Sequence
from typing import Any

from ..service import LISTED_COLUMNS

# Compact, and non-ASCII text as UTF-8, like protobuf's printer.
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
# What protobuf's printer escapes beyond JSON's own rules, and the spelling it uses. Of its set,
# only `<` and `>` can be in a stored name: names refuse control, format and separator characters
# (validation.py), and every other listed field is ASCII the server wrote; the others here are
# belt and braces, checked against Envoy byte for byte by tests/e2e/test_listing.py.
_PROTOBUF_ESCAPES = {
    char: f"\\u{ord(char):04x}" for char in "<>\x7f\u00ad\u200b\u2028\u2029\ufeff"
}
_NEEDS_ESCAPE = re.compile("[" + "".join(_PROTOBUF_ESCAPES) + "]")


def timestamp(moment: datetime.datetime) -> str:
    """RFC 3339 in UTC, as protobuf prints a google.protobuf.Timestamp (naive means UTC)."""
    if moment.utcoffset():
        moment = moment.astimezone(datetime.UTC)
    # isoformat() is C code: "auto" omits a zero fraction and prints 6 digits otherwise.
    whole_millis = moment.microsecond % 1000 == 0 and moment.microsecond
    text = moment.isoformat(timespec="milliseconds" if whole_millis else "auto")
    return (text[:-6] if moment.tzinfo is not None else text) + "Z"  # drop "+00:00"


# Rows come in LISTED_COLUMNS order; indexing a row is much cheaper than its named attributes.
_ID, _NAME, _TYPE, _MIME, _SIZE, _SHA256, _THUMBNAIL, _CREATED, _STATE = (
    LISTED_COLUMNS.index(name) for name in (
        "id", "name", "media_type", "mime_type", "size", "sha256", "has_thumbnail", "created",
        "state",
    )
)


def listing(rows: Iterable[Sequence[Any]]) -> bytes:
    """The JSON array of a page of rows of service.LISTED_COLUMNS.

    `size` is printed as an integer: the transcoder prints the proto's double the same way for
    every size below 10^15 bytes, past which it would switch to exponent notation."""
    text = _encode([
        {
            "id": row[_ID],
            "name": row[_NAME],
            "media_type": row[_TYPE],
            "size": int(row[_SIZE]),
            "has_thumbnail": bool(row[_THUMBNAIL]),
            "created": timestamp(row[_CREATED]),
            "mime_type": row[_MIME],
            "sha256": row[_SHA256],
            "state": row[_STATE],
        }
        for row in rows
    ])
    if _NEEDS_ESCAPE.search(text):
        text = _NEEDS_ESCAPE.sub(lambda match: _PROTOBUF_ESCAPES[match.group()], text)
    return text.encode()
