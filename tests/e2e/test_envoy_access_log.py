"""Envoy's own answers are in the stack's output, one JSON line each, and no other answer is
(envoy.yaml, access_log): a client quoting the `x-request-id` of a request Envoy refused finds its
line beside the server's; an answer from the server has the server's access line only; no line
names a path (a pre-signed URL's is its signed token), a query or a bearer token.

The 503 of no server up is in test_envoy_replies.py, whose Envoy has none.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable

import httpx

from .conftest import Stack, access_line, envoy_lines, log_entries
from .test_downloads import content_url, multipart_upload, new_device

FIELDS = {"time", "level", "logger", "message", "request_id", "http_method", "http_status", "details",
          "flags", "duration_ms", "client", "upstream_host"}
CHECK = "/envoy.service.auth.v3.Authorization/Check"


def _envoy_entries(stack: Stack) -> list[dict[str, object]]:
    return [e for e in log_entries(stack) if e.get("message") == "envoy reply"]


def _all_written(stack: Stack, http: httpx.Client) -> None:
    """Envoy writes its lines in the order it answers: once the line of a 404 it answers now is
    out, so is that of every answer before it on this client."""
    r = http.get("/no/such/path")
    assert r.status_code == 404 and envoy_lines(stack, r.headers["x-request-id"]), r.text


def test_each_answer_envoy_makes_itself_is_one_line_with_its_request_id(
    stack: Stack, http: httpx.Client, auth_headers: Callable[..., dict[str, str]],
) -> None:
    device = new_device()
    headers = auth_headers(devices=[device])
    # Over Envoy's 3 MiB + 64 KiB for any request: the transcoder's own 1 MiB holds only for a body
    # it takes whole, which after the token's check it may not (it passed on 1.2 MB once).
    digests = {"sha256s": ["a" * (1700 << 10), "b" * (1700 << 10)]}
    answers = [
        (http.get("/no/such/path"), "GET", 404),  # no route: the transcoder maps no such path
        (http.get(f"/api/gallery/{device}/events?limit=abc", headers=headers), "GET", 400),
        (http.post(f"/api/gallery/{device}/checksums", headers=headers, json=digests), "POST", 413),
    ]
    _all_written(stack, http)
    entries = _envoy_entries(stack)
    for r, method, status in answers:
        assert r.status_code == status, r.text
        request_id = r.headers["x-request-id"]
        [line] = [e for e in entries if e["request_id"] == request_id]
        assert set(line) == FIELDS, line
        assert (line["level"], line["logger"], line["http_method"], line["http_status"]) == (
            "INFO", "envoy", method, status), line
        assert line["details"] not in ("via_upstream", "file_server") and line["details"], line
        assert (line["client"], line["upstream_host"]) == ("127.0.0.1", None), line
        assert isinstance(line["duration_ms"], int) and isinstance(line["flags"], str), line
        written = datetime.datetime.fromisoformat(str(line["time"]))
        assert written.utcoffset() == datetime.timedelta(0), line  # UTC, as the server's lines
        assert access_line(stack, request_id, timeout=0) is None  # the server never saw it


def test_answers_from_the_server_make_no_envoy_line(
    stack: Stack, http: httpx.Client, auth_headers: Callable[..., dict[str, str]],
) -> None:
    device = new_device()
    headers = auth_headers(devices=[device])
    event_id = multipart_upload(http, device, headers, "a.bin", b"x" * 1000, 1000)
    ok = http.get(f"/api/gallery/{device}/stats", headers=headers)
    missing = http.get(f"/api/gallery/{device}/events/evt_{'A' * 22}", headers=headers)
    sent = http.get(content_url(device, event_id), headers=headers)  # sent by Envoy, after the Check
    assert (ok.status_code, missing.status_code, sent.status_code) == (200, 404, 200)
    assert missing.json()["details"][0]["reason"] == "EVENT_NOT_FOUND"
    ids = [r.headers["x-request-id"] for r in (ok, missing, sent)]
    methods = [(access_line(stack, request_id) or {}).get("method") for request_id in ids]
    assert methods[2] == CHECK and None not in methods  # the server's lines name each of them
    _all_written(stack, http)
    assert [e for e in _envoy_entries(stack) if e["request_id"] in ids] == []


def test_no_envoy_line_names_a_path_a_signed_token_or_a_bearer_token(
    stack: Stack, http: httpx.Client, auth_headers: Callable[..., dict[str, str]],
) -> None:
    device = new_device()
    headers = auth_headers(devices=[device])
    r = http.get(f"/api/gallery/{device}/upload-url", params={"filename": "v.bin"}, headers=headers)
    assert r.status_code == 200, r.text
    url = r.json()["upload_url"]
    token = url.rsplit("/", 1)[1]
    # PUTs of the URL that Envoy refuses itself, a bearer token sent along: headers over its
    # limit (431, refused before a request id is made), a query name percent-encoded (400).
    too_large = http.put(url, content=b"video", headers={**headers, "x-filler": "f" * (40 << 10)})
    assert too_large.status_code == 431, too_large.text
    refused = http.put(f"{url}?size%5Fhint=5", content=b"video", headers=headers)
    assert refused.status_code == 400, refused.text
    [line] = envoy_lines(stack, refused.headers["x-request-id"])
    assert (line["http_method"], line["http_status"]) == ("PUT", 400), line
    _all_written(stack, http)
    output = stack.log()
    assert not [part for part in (token, *token.split(".")) if part in output]
    assert headers["Authorization"].split()[1] not in output
    envoys = [line for line in output.splitlines() if line.startswith("{") and '"logger":"envoy"' in line]
    assert envoys and not [line for line in envoys if "/api/" in line or "/no/such" in line or "hint" in line]
