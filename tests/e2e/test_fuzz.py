"""Fuzzing every REST route from the API schema: no 5xx, and JSON wherever the server answered.

There is no OpenAPI document to hand to a schema fuzzer; the schema is the gallery descriptor set
that Envoy itself loads (generated/gallery_descriptor.pb). Its google.api.http annotations (with
their additional bindings) give each route's verb, path template and body, and the request message
gives the query parameters and their types; every GET is also sent as HEAD, which Envoy answers
with the GET's binding. From those, hypothesis strategies
draw path values, query values (typed, mistyped and unknown), headers (tokens good and bad, Range,
If-None-Match, If-Range, Content-Type, Content-Range on PUT) and bodies, and send them through the
real Envoy to a real server.

What counts as a pass: never a 5xx; every answer is JSON (a google.rpc.Status on errors) except
the bytes of a successful download, Envoy's own 4xx answers included (the ones that never reach
the server: a non-numeric or out-of-range integer query value, an unparsable JSON body, a path with
an encoded `/` or a NUL, a path that matches no route).
"""

from __future__ import annotations

import json
import pathlib
import urllib.parse
from collections.abc import Iterator

import httpx
import pytest
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gallery_server import auth, validation
from gallery_server.local_stack import Stack

from ..conftest import JWT_SECRET
from .conftest import running_stack

DESCRIPTOR_SET = pathlib.Path(__file__).parents[2] / "generated" / "gallery_descriptor.pb"
EXAMPLES_PER_ROUTE = 45
DEVICE = "fz-1"
ALL = " ".join((auth.READ, auth.WRITE, auth.DEVICE))
FD = descriptor_pb2.FieldDescriptorProto


def _routes() -> list[dict]:
    """(name, verb, template, body, query fields) for every binding (additional ones too, named
    `Method.VERB`) of every annotated method of the descriptor, and a HEAD (`Method.HEAD`) for
    every GET."""
    files = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes()).file
    messages = {f".{f.package}.{m.name}": m for f in files for m in f.message_type}
    routes = []
    for file in files:
        for service in file.service:
            for method in service.method:
                if not method.options.HasExtension(annotations_pb2.http):
                    continue
                main = method.options.Extensions[annotations_pb2.http]
                for extra, rule in enumerate([main, *main.additional_bindings]):
                    pattern = rule.WhichOneof("pattern")
                    if pattern == "custom":
                        verb, template = rule.custom.kind, rule.custom.path
                    else:
                        verb, template = pattern.upper(), getattr(rule, pattern)
                    in_path = {p.strip("{}") for p in template.split("/") if p.startswith("{")}
                    fields = [f for f in messages[method.input_type].field
                              if f.name not in in_path and f.name != rule.body]
                    routes.append({"name": f"{method.name}.{verb}" if extra else method.name,
                                   "verb": verb, "template": template, "body": rule.body,
                                   "query": fields})
    heads = [{**route, "name": f"{route['name']}.HEAD", "verb": "HEAD"}
             for route in routes if route["verb"] == "GET"]
    return routes + heads


ROUTES = _routes()


def test_the_schema_has_every_documented_route() -> None:
    # The walk is only as good as the schema it reads: the reference's routes must all be here.
    assert {(r["verb"], r["template"]) for r in ROUTES} >= {
        ("GET", "/api/gallery/{device}/paths"), ("GET", "/api/gallery/{device}/events"),
        ("POST", "/api/gallery/{device}/upload"), ("GET", "/api/gallery/{device}/upload-url"),
        ("PUT", "/api/gallery/{device}/upload/{token}"), ("GET", "/api/gallery/{device}/stats"),
        ("DELETE", "/api/gallery/{device}/events/{event_id}"),
        ("GET", "/api/gallery/{device}/events/{event_id}/content"),
    }


NASTY = st.sampled_from([
    "", ".", "..", "\x00", "\u202e", "\u200b", "\ufeff", "\u0430", "😀", "%", "%2F", "%00", "%FF",
    "/", "\\", " ", "+", "&", "=", "?", "#", "evt_", "-1", "0", "1e309", "NaN", "true", "*", "'", '"',
])
TEXT = st.one_of(st.text(max_size=30), st.lists(st.one_of(NASTY, st.text(max_size=4)), max_size=6).map("".join))


@pytest.fixture(scope="module")
def fuzz_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("fuzz")
    with running_stack(root, {
        "GALLERY_MAKE_THUMBNAILS": "false", "GALLERY_MAX_UPLOAD_BYTES": "65536",
    }) as stack:
        yield stack


@pytest.fixture(scope="module")
def seeds(fuzz_stack: Stack) -> dict[str, str]:
    """Real values to mix in, so that fuzzed requests also reach past the validators."""
    headers = {"Authorization": f"Bearer {_token()}"}
    with httpx.Client(base_url=fuzz_stack.base_url, timeout=30) as http:
        r = http.post(f"/api/gallery/{DEVICE}/upload", headers=headers,
                      files={"event": ("a.txt", b"0123456789"), "thumbnail": ("t.jpg", b"\xff\xd8\xff")},
                      data={"name": "a.txt"})
        assert r.status_code == 200, r.text
        event = r.json()["eventId"]
        r = http.get(f"/api/gallery/{DEVICE}/upload-url?filename=u.bin&thumbnail=true", headers=headers)
        assert r.status_code == 200, r.text
        token = r.json()["upload_url"].rsplit("/", 1)[1]
    return {"device": DEVICE, "event_id": event, "token": token}


def _token(**kw: object) -> str:
    return auth.mint(JWT_SECRET, subject="fuzz", devices=["*"], scope=ALL, **kw)  # type: ignore[arg-type]


def _path_value(seeds: dict[str, str], name: str) -> st.SearchStrategy[str]:
    raw = st.one_of(
        st.just(seeds.get(name, "x")),
        st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._:-]{0,20}\Z"),
        st.builds(validation.new_event_id),
        TEXT,
    )
    quoted = raw.map(lambda v: urllib.parse.quote(v, safe=""))
    # Sometimes bytes that are not UTF-8 at all.
    not_utf8 = st.binary(min_size=1, max_size=8).map(lambda b: urllib.parse.quote_from_bytes(b, safe=""))
    return st.one_of(quoted, quoted, quoted, not_utf8)


def _query_value(field: FD) -> st.SearchStrategy[str]:
    if field.type in (FD.TYPE_INT32, FD.TYPE_INT64, FD.TYPE_UINT32, FD.TYPE_UINT64):
        typed = st.integers(-(2**40), 2**40).map(str)
    elif field.type == FD.TYPE_BOOL:
        typed = st.sampled_from(["true", "false", "1", "0", "yes", "maybe"])
    else:
        typed = st.sampled_from({"media_type": ["image", "video", "IMAGE"],
                                 "order": ["newest", "oldest", "up"],
                                 "since": ["2024-03-20T10:00:00Z", "2024-03-20", "0000-00-00T00:00:00Z"],
                                 "until": ["2030-01-01T00:00:00+02:00", "9999-12-31T23:59:59-23:59"],
                                 }.get(field.name, ["a.jpg", "x"]))
    return st.one_of(typed, typed, TEXT)


@st.composite
def requests(draw: st.DrawFn, route: dict, seeds: dict[str, str]) -> dict:
    path = route["template"]
    for name in ("device", "event_id", "token"):
        if "{" + name + "}" in path:
            path = path.replace("{" + name + "}", draw(_path_value(seeds, name)))
    query = []
    for field in route["query"]:
        if draw(st.booleans()):
            query.append((field.name, draw(_query_value(field))))
    if draw(st.integers(0, 4)) == 0:
        query.append((draw(st.text(min_size=1, max_size=8)), draw(TEXT)))
    if query:
        path += "?" + urllib.parse.urlencode(query, quote_via=urllib.parse.quote)
    headers: list[tuple[bytes, bytes]] = []
    auth_kind = draw(st.sampled_from(["good", "good", "good", "none", "garbage", "expired", "scheme"]))
    if auth_kind != "none":
        value = {"good": f"Bearer {_token()}", "expired": f"Bearer {_token(ttl_seconds=-300)}",
                 "scheme": f"Basic {_token()}", "garbage": "Bearer " + draw(TEXT)}[auth_kind]
        headers.append((b"authorization", _header_bytes(value)))
    for name in (b"range", b"if-none-match", b"if-range"):
        if draw(st.integers(0, 3)) == 0:
            headers.append((name, _header_bytes(draw(st.one_of(
                TEXT, st.sampled_from(["bytes=0-3", "bytes=-2", "bytes=5-", "bytes=9-1", "*", '"x", W/"y"'])
            )))))
    if route["verb"] == "PUT" and draw(st.integers(0, 2)) == 0:  # resumable chunks
        headers.append((b"content-range", _header_bytes(draw(st.one_of(TEXT, st.sampled_from([
            "bytes 0-9/10", "bytes */10", "bytes */0", "bytes 0-0/1", "bytes 5-2/10", "bytes 0-9/*",
            "Bytes 0-3/4", "bytes 0-99999999999999999999/1", "bytes 0-65536/65537", "bytes -1-2/3",
        ]))))))
    body = None
    if route["body"] == "http_body":
        boundary = draw(st.sampled_from(["b", "fz-boundary", ""]))
        content_type = draw(st.one_of(st.just(f"multipart/form-data; boundary={boundary}"), TEXT))
        headers.append((b"content-type", _header_bytes(content_type)))
        parts = draw(st.lists(st.tuples(
            st.sampled_from(["name", "event", "thumbnail", "media_type", "metadata", "has_thumbnail", "x"]),
            st.one_of(TEXT.map(str.encode), st.binary(max_size=64)),
        ), max_size=5))
        body = b"".join(
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"{n}\"\r\n\r\n".encode() + v + b"\r\n"
            for n, v in parts
        ) + (f"--{boundary}--\r\n".encode() if draw(st.booleans()) else b"")
        body = draw(st.one_of(st.just(body), st.binary(max_size=200)))
    elif route["body"] == "*":
        headers.append((b"content-type", b"application/json"))
        document = draw(st.one_of(
            st.fixed_dictionaries({"sha256s": st.lists(st.one_of(TEXT, st.just("a" * 64)), max_size=5)}),
            st.dictionaries(TEXT, st.one_of(TEXT, st.integers(), st.none()), max_size=3),
        ))
        body = draw(st.one_of(st.just(json.dumps(document).encode()), st.binary(max_size=100)))
    return {"method": route["verb"], "path": path, "headers": headers, "body": body}


_CONTROLS = bytes(c for c in range(32) if c != 9) + b"\x7f"


def _header_bytes(value: str) -> bytes:
    # Header values cannot carry control characters (h11 refuses to send them) nor start or end
    # with whitespace; anything else, including non-ASCII bytes, goes as sent.
    return value.encode("utf-8").translate(None, _CONTROLS).strip(b" \t")


DOWNLOADS = {"GetEventContent", "GetEventThumbnail"}
seen: dict[str, int] = {}


@pytest.mark.parametrize("route", ROUTES, ids=[r["name"] for r in ROUTES])
def test_fuzz_route(route: dict, fuzz_stack: Stack, seeds: dict[str, str]) -> None:
    client = httpx.Client(base_url=fuzz_stack.base_url, timeout=30)

    @settings(max_examples=EXAMPLES_PER_ROUTE, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(st.data())
    def run(data: st.DataObject) -> None:
        request = data.draw(requests(route, seeds))
        r = client.request(request["method"], request["path"], headers=request["headers"],
                           content=request["body"])
        seen[route["name"]] = seen.get(route["name"], 0) + 1
        assert r.status_code < 500, (request, r.status_code, r.text[:300])
        content_type = r.headers.get("content-type", "")
        if route["name"] in DOWNLOADS and r.status_code in (200, 206, 304, 416):
            return  # the stored bytes, in their own type (or no body)
        if request["method"] == "HEAD":
            assert not r.content, (request, r.status_code, r.content[:200])
            return
        assert content_type.startswith("application/json"), (request, r.status_code, content_type, r.content[:200])
        body = json.loads(r.content)
        if r.status_code >= 400:
            assert set(body) == {"code", "message", "details"}, (request, body)
            assert body["details"][0]["domain"] == "gallery", (request, body)

    try:
        run()
    finally:
        client.close()
    assert seen[route["name"]] >= EXAMPLES_PER_ROUTE // 2  # really sent, not filtered away
    assert "Traceback" not in fuzz_stack.log() and '"level": "ERROR"' not in fuzz_stack.log(), fuzz_stack.log()[-3000:]
