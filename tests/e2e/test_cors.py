"""Browsers: a web page on an origin in GALLERY_CORS_ORIGINS calls the REST API through the real
Envoy (its CORS filter, envoy_config.cors_policy); pages on other origins, and every page when the
variable is unset, get no CORS headers, so the browser keeps the answers from them."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest

from gallery_server import auth, envoy_config
from gallery_server.local_stack import Stack

from ..conftest import JWT_SECRET
from .conftest import running_stack

APP = "https://app.example"
OTHER_APP = "http://localhost:3000"
STRANGER = "https://evil.example"


@pytest.fixture(scope="module")
def cors_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("cors")
    with running_stack(root, {
        "GALLERY_CORS_ORIGINS": f"{APP}, {OTHER_APP}", "GALLERY_MAKE_THUMBNAILS": "false",
    }) as stack:
        yield stack


@pytest.fixture
def page(cors_stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=cors_stack.base_url, timeout=60) as client:
        yield client


def bearer(device: str) -> dict[str, str]:
    token = auth.mint(JWT_SECRET, subject="web", devices=[device], scope=f"{auth.READ} {auth.WRITE}")
    return {"Authorization": f"Bearer {token}"}


def preflight(client: httpx.Client, path: str, origin: str, method: str, headers: str) -> httpx.Response:
    """What a browser sends before a request a page makes with a non-simple method or header."""
    return client.options(path, headers={
        "Origin": origin, "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": headers,
    })


def listed(header: str) -> set[str]:
    return {name.strip().lower() for name in header.split(",")}


def assert_allowed_answer(r: httpx.Response, origin: str) -> None:
    assert r.headers["access-control-allow-origin"] == origin, r.headers
    assert listed(r.headers["access-control-expose-headers"]) == set(envoy_config.CORS_EXPOSED_HEADERS)
    assert "access-control-allow-credentials" not in r.headers  # tokens, never cookies
    assert r.headers["vary"] == "origin"  # a cache keeps one page's answer from another's


def test_a_preflight_from_an_allowed_origin_is_answered_by_envoy(page: httpx.Client) -> None:
    for origin in (APP, OTHER_APP):
        r = preflight(page, "/api/gallery/cam1/upload/some-token", origin, "PUT", "content-range, content-type")
        assert r.status_code == 200, r.text
        assert r.headers["access-control-allow-origin"] == origin
        methods = {name.strip() for name in r.headers["access-control-allow-methods"].split(",")}
        assert methods == {"GET", "HEAD", "POST", "PUT", "DELETE"}  # as written: methods are case-sensitive
        assert {"authorization", "content-range", "content-type", "range", "if-none-match"} <= listed(
            r.headers["access-control-allow-headers"])
        assert r.headers["access-control-max-age"] == "600"
        assert r.content == b""


def test_a_page_lists_uploads_and_reads_what_the_answers_say(page: httpx.Client) -> None:
    device, origin = f"web-{uuid.uuid4().hex[:8]}", {"Origin": APP}
    for name in ("a.txt", "b.txt"):
        r = page.post(f"/api/gallery/{device}/upload", headers={**bearer(device), **origin},
                      files={"event": (name, b"hello " + name.encode())}, data={"name": name})
        assert r.status_code == 200, r.text
        assert_allowed_answer(r, APP)
    r = page.get(f"/api/gallery/{device}/events", params={"limit": 1}, headers={**bearer(device), **origin})
    assert r.status_code == 200, r.text
    assert_allowed_answer(r, APP)
    assert r.headers["x-next-page-token"]  # exposed: the page can ask for the next one
    [event] = r.json()
    # A download Envoy sends itself (the file handoff) and one the server streams (a conditional
    # GET) carry the same headers.
    content = f"/api/gallery/{device}/events/{event['id']}/content"
    r = page.get(content, headers={**bearer(device), **origin})
    assert (r.status_code, r.content) == (200, b"hello b.txt")
    assert_allowed_answer(r, APP)
    r = page.get(content, headers={**bearer(device), **origin, "If-None-Match": '"other"', "Range": "bytes=0-4"})
    assert (r.status_code, r.content) == (206, b"hello")
    assert_allowed_answer(r, APP)


def test_a_page_uploads_to_a_pre_signed_url(page: httpx.Client) -> None:
    device = f"web-{uuid.uuid4().hex[:8]}"
    r = page.get(f"/api/gallery/{device}/upload-url", params={"filename": "clip.mp4"},
                 headers={**bearer(device), "Origin": OTHER_APP})
    assert r.status_code == 200, r.text
    assert_allowed_answer(r, OTHER_APP)
    url = r.json()["upload_url"]
    assert preflight(page, url, OTHER_APP, "PUT", "content-type").status_code == 200
    r = page.put(url, content=b"\x00" * 1000, headers={"Origin": OTHER_APP, "Content-Type": "video/mp4"})
    assert r.status_code == 200, r.text
    assert_allowed_answer(r, OTHER_APP)
    assert r.json()["success"] is True


@pytest.mark.parametrize(("method", "path", "headers", "status"), [
    ("GET", "/api/gallery/cam1/stats", {}, 401),  # the server's refusal: no token
    ("POST", "/api/gallery/cam1/checksums", {}, 401),  # Envoy's Check's, before the body (token_check.py)
    ("GET", "/api/gallery/cam1/events?limit%5F=1", {}, 400),  # Lua's
    ("GET", "/api/nowhere", {}, 404),  # Envoy's own: no route
    ("PATCH", "/api/gallery/cam1/stats", {}, 405),  # a method the path has not (Lua's too)
], ids=["server", "token-check", "lua", "envoy", "method"])
def test_errors_reach_the_page_too(page: httpx.Client, method: str, path: str, headers: dict, status: int) -> None:
    """Else the browser hides the error's JSON and the page sees only a failed fetch."""
    r = page.request(method, path, headers={"Origin": APP, **headers})
    assert r.status_code == status, r.text
    assert_allowed_answer(r, APP)
    assert r.json()["details"][0]["reason"]


def test_other_origins_get_no_cors_headers(page: httpx.Client) -> None:
    device = f"web-{uuid.uuid4().hex[:8]}"
    r = preflight(page, f"/api/gallery/{device}/events", STRANGER, "GET", "authorization")
    assert not [name for name in r.headers if name.startswith("access-control-")], r.headers
    r = page.get(f"/api/gallery/{device}/events", headers={**bearer(device), "Origin": STRANGER})
    assert r.status_code == 200  # answered: it is the browser that withholds it from the page
    assert not [name for name in r.headers if name.startswith("access-control-")], r.headers


def test_without_cors_origins_no_page_is_allowed(http: httpx.Client, auth_headers) -> None:
    """The shared stack sets no GALLERY_CORS_ORIGINS: the default."""
    r = preflight(http, "/api/gallery/cam1/events", APP, "GET", "authorization")
    assert not [name for name in r.headers if name.startswith("access-control-")], r.headers
    r = http.get("/api/gallery/cam1/events", headers={**auth_headers(), "Origin": APP})
    assert r.status_code == 200, r.text
    assert not [name for name in r.headers if name.startswith("access-control-")], r.headers
    assert "vary" not in r.headers
