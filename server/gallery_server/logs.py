"""Structured logs: one JSON object per line on stderr, with the fields passed as `extra`."""

from __future__ import annotations

import contextvars
import datetime
import json
import logging

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

# The id of the RPC being served in this thread (rpc/interceptor.py sets it): every line logged
# meanwhile carries it, so that a domain module's line (an event stored, the database unavailable)
# can be matched with the request's access line.
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("gallery_request_id", default="")
# Fields of the access line of the RPC being served (rpc/interceptor.py owns the dict): what the
# call is about, noted by the domain code that learns it (validation.device_id notes the device),
# so that an operator finds what one device did or was refused, whoever's token asked.
call_fields: contextvars.ContextVar[dict[str, str | list[str]] | None] = contextvars.ContextVar(
    "gallery_call_fields", default=None)


def note(**fields: str | list[str]) -> None:
    """Add `fields` to the access line of the RPC being served; outside an RPC, nothing."""
    if clash := fields.keys() & _STANDARD:  # logging would refuse the access line's `extra`
        raise ValueError(f"{sorted(clash)} are LogRecord attributes")
    current = call_fields.get()
    if current is not None:
        current.update(fields)


class JsonFormatter(logging.Formatter):
    # One encoder for every line: json.dumps(default=...) builds a new one per call.
    _encode = json.JSONEncoder(default=str).encode

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if "request_id" not in entry and (serving := request_id.get()):
            entry["request_id"] = serving
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return self._encode(entry)


def _without_header_values(record: logging.LogRecord) -> bool:
    """grpc logs a request header value that is not UTF-8 whole, at ERROR with a traceback
    (grpc/_cython/_cygrpc/grpc_string.pyx, `_decode`): the value may be a bearer token, and any
    client could write ERROR lines at will. The line keeps the fact, at DEBUG, not the value."""
    if record.msg != "Invalid encoding on %s":
        return True
    record.msg, record.args = "a request header value is not UTF-8: read as Latin-1", ()
    record.exc_info = record.exc_text = None
    record.levelno, record.levelname = logging.DEBUG, "DEBUG"
    return logging.getLogger().isEnabledFor(logging.DEBUG)


def configure(level: str) -> None:
    """JSON lines on stderr at `level`, for the whole process (root logger, logging's settings)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("grpc._cython.cygrpc").addFilter(_without_header_values)
    # A record's caller is never printed (JsonFormatter): skip walking the stack for it on every
    # line, as the logging HOWTO's "Optimization" section says (~3 µs of the ~17 µs of a line).
    logging._srcfile = None  # type: ignore[attr-defined]
