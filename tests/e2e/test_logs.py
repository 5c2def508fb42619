"""Secrets never reach the logs: a real stack at log level DEBUG is sent good and bad bearer
tokens and pre-signed URLs (used, reused, tampered, expired), REST and native; afterwards neither
the server's log, the supervisor's nor Envoy's (its stderr, and any access log file its config
names) holds a token, a signed-URL token or the JWT secret.

The one JWT allowed in the output is the development token that `gallery run` prints in its
banner for the operator (README, "Two commands"): it is minted at start, not received.
"""

from __future__ import annotations

import base64
import json
import re
import time

import grpc
import httpx
import jwt

from gallery.v1 import gallery_pb2 as pb
from gallery.v1 import gallery_pb2_grpc
from gallery_server import auth
from gallery_server.local_stack import stop_stack

from ..conftest import JWT_SECRET
from .conftest import access_line, log_entries, start_stack

DEVICE = "log-cam"
JWT_RE = re.compile(rb"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
# Envoy access log operators that would write a secret: the path carries signed-URL tokens, the
# Authorization header bearer tokens.
RISKY_ACCESS_LOG = re.compile(r"%REQ\((:PATH|X-ENVOY-ORIGINAL-PATH|AUTHORIZATION)[^%]*%|%PATH%", re.I)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_no_secret_in_any_log_at_debug(tmp_path) -> None:  # type: ignore[no-untyped-def]
    stack = start_stack(tmp_path / "data", tmp_path / "gallery.log", extra_env={
        "GALLERY_LOG_LEVEL": "DEBUG", "GALLERY_MAKE_THUMBNAILS": "false",
    })
    sent: list[str] = []  # every secret that went over the wire

    def token(**kw: object) -> str:
        value = auth.mint(JWT_SECRET, subject="logger", devices=kw.pop("devices", [DEVICE]),  # type: ignore[arg-type]
                          scope=f"{auth.READ} {auth.WRITE}", **kw)  # type: ignore[arg-type]
        sent.append(value)
        return value

    try:
        with httpx.Client(base_url=stack.base_url, timeout=30) as http:
            good = {"Authorization": f"Bearer {token()}"}
            assert http.get(f"/api/gallery/{DEVICE}/stats", headers=good).status_code == 200
            r = http.post(f"/api/gallery/{DEVICE}/upload", headers=good,
                          files={"event": ("a.txt", b"hello")}, data={"name": "a.txt"})
            assert r.status_code == 200, r.text
            event = r.json()["eventId"]
            bad_tokens = [
                token(ttl_seconds=-600),  # expired
                token(devices=["someone-else"]),  # another device
                jwt.encode({"sub": "x", "exp": int(time.time()) + 60}, "wrong-secret-" + "w" * 40,
                           algorithm="HS256"),
                "eyJhbGciOiJub25lIn0." + _b64(b'{"sub":"x"}') + ".",
                "not-a-jwt-but-secret-looking-" + "q" * 30,
            ]
            sent.extend(bad_tokens)
            for bad in bad_tokens:
                r = http.get(f"/api/gallery/{DEVICE}/events/{event}", headers={"Authorization": f"Bearer {bad}"})
                assert r.status_code in (401, 403), r.text
            # Pre-signed URLs: used, reused, tampered, another device's path, no Content-Length.
            r = http.get(f"/api/gallery/{DEVICE}/upload-url?filename=v.bin&thumbnail=true", headers=good)
            assert r.status_code == 200, r.text
            urls = r.json()
            signed = [urls["upload_url"].rsplit("/", 1)[1], urls["thumbnail_upload_url"].rsplit("/", 1)[1]]
            sent.extend(signed)
            sent.extend(part for value in signed for part in value.split("."))
            assert http.put(urls["upload_url"], content=b"video").status_code == 200
            assert http.put(urls["upload_url"], content=b"again").status_code == 403
            tampered = signed[1][:-3] + ("AAA" if not signed[1].endswith("AAA") else "BBB")
            sent.append(tampered)
            assert http.put(f"/api/gallery/{DEVICE}/upload/{tampered}", content=b"t").status_code == 403
            assert http.put(f"/api/gallery/other-cam/upload/{signed[1]}", content=b"t").status_code == 403
            chunked = http.put(urls["thumbnail_upload_url"], content=iter([b"x", b"y"]))
            assert chunked.status_code == 411, chunked.text  # Length Required
            # Tokens in a query string and a custom header: no access line may echo them either.
            http.get(f"/api/gallery/{DEVICE}/stats?access_token={sent[0]}", headers=good)
            # A valid token followed by a byte that is not UTF-8, and such a byte in a header of
            # a request with no token: grpc's own decoding must not write either value.
            spoiled = token()
            r = http.get(f"/api/gallery/{DEVICE}/stats",
                         headers=[(b"authorization", b"Bearer " + spoiled.encode() + b"\xff")])
            assert r.status_code == 401, r.text
            r = http.get(f"/api/gallery/{DEVICE}/stats", headers=[(b"x-anything", b"secret-ish-\xe9")])
            assert r.status_code == 401, r.text
            sent.append("secret-ish-")
        with grpc.insecure_channel(stack.envoy_grpc_address) as channel:
            stub = gallery_pb2_grpc.GalleryServiceStub(channel)
            stub.GetStats(pb.GetStatsRequest(device=DEVICE), metadata=[("authorization", f"Bearer {sent[0]}")],
                          timeout=30)
            try:
                stub.GetStats(pb.GetStatsRequest(device=DEVICE),
                              metadata=[("authorization", f"Bearer {bad_tokens[2]}")], timeout=30)
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            else:
                raise AssertionError("a token signed with another secret was accepted")
    finally:
        stop_stack(stack)

    config = (stack.data_dir / "run" / "envoy.yaml").read_text()
    logs = [stack.log_path.read_bytes()]
    if "access_log" in config:
        # Whatever access log Envoy keeps must not be built from the path or the Authorization
        # header, and a file it writes is checked like the rest.
        assert not RISKY_ACCESS_LOG.search(config), RISKY_ACCESS_LOG.search(config)
        for path in re.findall(r"path:\s*\"?(/[^\s\"]+)", config):
            if not path.startswith("/dev/") and (p := __import__("pathlib").Path(path)).is_file():
                logs.append(p.read_bytes())
    text = b"\n".join(logs)
    # The log really is at DEBUG and really recorded these calls.
    lines = [json.loads(line) for line in text.splitlines() if line.startswith(b"{")]
    assert any(line["level"] == "DEBUG" for line in lines), "no DEBUG line: the level did not apply"
    assert not [line for line in lines if line["level"] == "ERROR"], "a client's request made an ERROR line"
    methods = {line.get("method") for line in lines}
    assert {"/gallery.v1.GalleryService/PutSignedUpload", "/gallery.v1.GalleryService/GetEvent"} <= methods
    reasons = {line.get("reason") for line in lines}
    assert {"TOKEN_EXPIRED", "URL_SIGNATURE_INVALID", "URL_ALREADY_USED"} <= reasons
    assert JWT_SECRET.encode() not in text
    for secret in sent:
        assert secret.encode() not in text, f"a sent secret is in the logs: {secret[:12]}..."
    banner = [line for line in text.splitlines() if line.strip().startswith(b"export TOKEN=")]
    allowed = {m.group() for line in banner for m in JWT_RE.finditer(line)}
    assert {m.group() for m in JWT_RE.finditer(text)} <= allowed


def test_the_lines_of_one_request_share_its_request_id(stack, auth_headers) -> None:  # type: ignore[no-untyped-def]
    """The server's own line about an upload carries the id of the request's access line."""
    with httpx.Client(base_url=stack.base_url, timeout=30) as http:
        r = http.post(f"/api/gallery/{DEVICE}/upload", headers=auth_headers(devices=[DEVICE]),
                      files={"event": ("b.txt", b"traced")}, data={"name": "b.txt"})
        assert r.status_code == 200, r.text
    event_id = r.json()["eventId"]
    [stored] = [e for e in log_entries(stack) if e.get("message") == "event stored" and e.get("event_id") == event_id]
    access = access_line(stack, stored.get("request_id"))
    assert stored["request_id"] and access is not None
    assert access["method"] == "/gallery.v1.GalleryService/UploadEventForm"
    assert r.headers["x-request-id"] == stored["request_id"]  # the client can quote it


def test_every_answer_through_envoy_names_its_request_id(stack, auth_headers) -> None:  # type: ignore[no-untyped-def]
    """Errors too, the server's and Envoy's own, REST and native: what a client quotes in a report."""
    with httpx.Client(base_url=stack.base_url, timeout=30) as http:
        refused = http.get(f"/api/gallery/{DEVICE}/stats")  # no token: the server's 401
        assert refused.status_code == 401 and len(refused.headers.get_list("x-request-id")) == 1
        assert access_line(stack, refused.headers["x-request-id"])["reason"] == "TOKEN_MISSING"
        assert http.get("/no/such/path").headers["x-request-id"]  # Envoy's own 404
    with grpc.insecure_channel(stack.envoy_grpc_address) as channel:
        token = auth_headers(devices=[DEVICE])["Authorization"]
        call = gallery_pb2_grpc.GalleryServiceStub(channel).GetStats.with_call(
            pb.GetStatsRequest(device=DEVICE), metadata=[("authorization", token)])[1]
        ids = [value for key, value in call.initial_metadata() if key == "x-request-id"]
    assert len(ids) == 1 and access_line(stack, ids[0])["method"] == "/gallery.v1.GalleryService/GetStats"
    assert "x-request-id" not in dict(call.trailing_metadata())  # Envoy sent its id: the server adds none


def _trailing_request_ids(call: grpc.Call) -> list[str]:
    return [value for key, value in call.trailing_metadata() if key == "x-request-id"]


def test_a_native_client_on_the_direct_port_gets_the_request_id_the_server_made(stack, auth_headers) -> None:  # type: ignore[no-untyped-def]
    """In the trailing metadata, beside the status: an answer, an error and a stream's end each name
    the id of their access line. A client that sent an id of its own gets nothing added."""
    token = [("authorization", auth_headers(devices=[DEVICE])["Authorization"])]
    with grpc.insecure_channel(stack.grpc_address) as channel:
        stub = gallery_pb2_grpc.GalleryServiceStub(channel)
        answered = stub.GetStats.with_call(pb.GetStatsRequest(device=DEVICE), metadata=token)[1]
        try:
            stub.GetEvent(pb.GetEventRequest(device=DEVICE, event_id="evt_" + "A" * 22), metadata=token)
            raise AssertionError("an event that does not exist was found")
        except grpc.RpcError as exc:
            refused = exc
        streamed = stub.ListEvents(pb.ListEventsRequest(device=DEVICE), metadata=token)
        list(streamed)  # to its end: the trailing metadata comes with the status
        own = stub.GetStats.with_call(pb.GetStatsRequest(device=DEVICE),
                                      metadata=[*token, ("x-request-id", "client-trace-17")])[1]
    expected = {answered: ("GetStats", "OK"), refused: ("GetEvent", "NOT_FOUND"), streamed: ("ListEvents", "OK")}
    for call, (method, code) in expected.items():
        [request_id] = _trailing_request_ids(call)
        line = access_line(stack, request_id)
        assert line is not None and (line["method"], line["code"]) == (f"/gallery.v1.GalleryService/{method}", code)
    assert refused.code() == grpc.StatusCode.NOT_FOUND and refused.details()  # its status as before
    assert _trailing_request_ids(own) == [] and access_line(stack, "client-trace-17") is not None
