"""The log format: one JSON object per line, the `extra` fields beside the standard ones."""

from __future__ import annotations

import io
import json
import logging

import pytest

from gallery_server import logs


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """What configure() prints; conftest's logging_left_as_found undoes it after the test."""
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    logs.configure("INFO")
    return stream


def ours(stream: io.StringIO) -> list[str]:
    """The lines of this module's loggers (a thread left by another test may log too)."""
    return [line for line in stream.getvalue().splitlines() if '"logger": "gallery' in line]


def test_configure_skips_looking_up_the_caller_of_each_line(captured: io.StringIO) -> None:
    assert logging._srcfile is None  # type: ignore[attr-defined]


def test_an_access_line_is_one_json_object_with_its_fields(captured: io.StringIO) -> None:
    logging.getLogger("gallery.access").info("rpc", extra={
        "method": "/gallery.v1.GalleryService/GetStats", "code": "OK", "subject": "ünï", "duration_ms": 0.42,
        "when": object(),  # not JSON: printed as its str()
    })
    (line,) = ours(captured)
    entry = json.loads(line)
    assert list(entry)[:4] == ["time", "level", "logger", "message"]
    assert entry["time"].endswith("+00:00")
    assert {k: entry[k] for k in ("level", "logger", "message", "method", "code", "subject", "duration_ms")} == {
        "level": "INFO", "logger": "gallery.access", "message": "rpc",
        "method": "/gallery.v1.GalleryService/GetStats", "code": "OK", "subject": "ünï", "duration_ms": 0.42,
    }
    assert entry["when"].startswith("<object object at")
    assert not {"funcName", "lineno", "pathname", "threadName", "args", "msg"} & set(entry)


def test_an_error_line_carries_its_traceback(captured: io.StringIO) -> None:
    try:
        raise ValueError("boom")
    except ValueError as exc:
        logging.getLogger("gallery").error("unexpected error", exc_info=exc, extra={"request_id": "r1"})
    (line,) = ours(captured)
    entry = json.loads(line)
    assert entry["level"] == "ERROR" and entry["request_id"] == "r1"
    assert entry["traceback"].startswith("Traceback") and "ValueError: boom" in entry["traceback"]


def test_debug_lines_stay_out_at_info(captured: io.StringIO) -> None:
    logging.getLogger("gallery.access").debug("rpc started")
    assert ours(captured) == []


def test_a_line_logged_while_an_rpc_is_served_carries_its_request_id(captured: io.StringIO) -> None:
    serving = logs.request_id.set("req-42")
    try:
        logging.getLogger("gallery.service").info("event stored", extra={"event_id": "evt_1"})
        logging.getLogger("gallery.access").info("rpc", extra={"request_id": "given"})  # its own wins
    finally:
        logs.request_id.reset(serving)
    logging.getLogger("gallery.service").info("between requests")
    first, given, between = (json.loads(line) for line in ours(captured))
    assert (first["request_id"], first["event_id"]) == ("req-42", "evt_1")
    assert given["request_id"] == "given"
    assert "request_id" not in between


def _grpc_decoding_error(value: bytes) -> None:
    """What grpc's `_decode` logs for a header value that is not UTF-8 (grpc_string.pyx)."""
    try:
        value.decode("utf8")
    except UnicodeDecodeError:
        logging.getLogger("grpc._cython.cygrpc").exception("Invalid encoding on %s", value)


def test_a_header_value_grpc_cannot_decode_is_never_written(captured: io.StringIO) -> None:
    _grpc_decoding_error(b"Bearer eyJ.valid-token\xff")
    assert captured.getvalue() == ""  # at INFO: nothing at all (any client could cause it)
    logging.getLogger().setLevel("DEBUG")
    _grpc_decoding_error(b"Bearer eyJ.valid-token\xff")
    (line,) = captured.getvalue().splitlines()
    entry = json.loads(line)
    assert (entry["level"], entry["message"]) == ("DEBUG", "a request header value is not UTF-8: read as Latin-1")
    assert "valid-token" not in line and "traceback" not in entry


def test_a_noted_field_may_not_be_a_log_records_own() -> None:
    """logging refuses an `extra` that overwrites a LogRecord attribute: the access line would
    fail as its call ends. Refused where it is noted instead, outside a call too."""
    with pytest.raises(ValueError, match="LogRecord"):
        logs.note(name="cam1")
    logs.note(device="cam1")  # outside a call: nothing to add it to
