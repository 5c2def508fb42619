"""Conditional listings through the real Envoy: each page answers its entity-tag (ETag), and a
request naming it in If-None-Match while the device's events are unchanged gets 304 and no body
(server/gallery_server/listing.py, etag; envoy/envoy.yaml turns the server's x-http-status into
the status)."""

from __future__ import annotations

import re
import uuid

import grpc
import pytest

from gallery.v1 import gallery_pb2 as pb
from gallery.v1 import gallery_pb2_grpc

from .test_listing import upload

LISTING_TAG = re.compile(r'W/"[0-9a-f]{16}-[0-9a-f]{16}"')


def test_a_listing_is_304_while_its_events_are_unchanged(http, auth_headers):
    device, headers = f"etag-{uuid.uuid4().hex[:8]}", auth_headers()
    first = upload(http, headers, device, "a.txt")
    upload(http, headers, device, "b.txt")
    url = f"/api/gallery/{device}/events"

    page = http.get(url, headers=headers)
    assert page.status_code == 200
    assert len(page.json()) == 2
    tag = page.headers["etag"]
    assert LISTING_TAG.fullmatch(tag), tag
    assert page.headers["cache-control"] == "private, no-cache"

    again = http.get(url, headers={**headers, "If-None-Match": tag})
    assert again.status_code == 304, again.text
    assert again.content == b""
    assert "content-length" not in again.headers  # a 304 names no length (RFC 9110 8.6)
    assert "transfer-encoding" not in again.headers
    assert "content-type" not in again.headers  # no body to have a type (RFC 9110 15.4.5)
    assert again.headers["etag"] == tag
    assert again.headers["cache-control"] == "private, no-cache"
    assert "x-next-page-token" not in again.headers  # the client keeps the one it holds
    assert "x-http-status" not in again.headers

    # Weak comparison, lists and `*` (RFC 9110 13.1.2), and HEAD.
    strong = tag.removeprefix("W/")
    for header in (strong, f'"other", {tag}', "*"):
        assert http.get(url, headers={**headers, "If-None-Match": header}).status_code == 304, header
    head = http.head(url, headers={**headers, "If-None-Match": tag})
    assert head.status_code == 304 and head.content == b""
    assert "content-length" not in head.headers
    two_headers = [*headers.items(), ("If-None-Match", '"other"'), ("If-None-Match", tag)]  # one list (RFC 9110 5.3)
    assert http.get(url, headers=two_headers).status_code == 304
    head = http.head(url, headers=headers)
    assert head.status_code == 200 and head.headers["etag"] == tag
    assert int(head.headers["content-length"]) == len(page.content)

    # Another tag, one that does not parse, or another page's tag: the page itself.
    for header in ('W/"0000000000000000-0000000000000000"', "not a tag", f"{tag} junk"):
        r = http.get(url, headers={**headers, "If-None-Match": header})
        assert r.status_code == 200 and r.json() == page.json(), header
    other_page = http.get(url, params={"limit": 1}, headers=headers)
    assert other_page.headers["etag"] != tag
    r = http.get(url, params={"limit": 1}, headers={**headers, "If-None-Match": tag})
    assert r.status_code == 200 and len(r.json()) == 1

    # Any change to the device's events is a new tag: an upload, then a delete.
    third = upload(http, headers, device, "c.txt")
    r = http.get(url, headers={**headers, "If-None-Match": tag})
    assert r.status_code == 200 and r.json()[0]["id"] == third
    newer = r.headers["etag"]
    assert LISTING_TAG.fullmatch(newer) and newer != tag
    assert http.delete(f"{url}/{first}", headers=headers).status_code == 200
    r = http.get(url, headers={**headers, "If-None-Match": newer})
    assert r.status_code == 200 and first not in [e["id"] for e in r.json()]
    assert http.get(url, headers={**headers, "If-None-Match": r.headers["etag"]}).status_code == 304


def test_authorization_comes_before_the_304(http, auth_headers):
    device, headers = f"etag-{uuid.uuid4().hex[:8]}", auth_headers()
    upload(http, headers, device, "a.txt")
    tag = http.get(f"/api/gallery/{device}/events", headers=headers).headers["etag"]
    for who in (auth_headers(devices=["someone-else"]), {}):
        r = http.get(f"/api/gallery/{device}/events", headers={**who, "If-None-Match": tag})
        assert r.status_code in (401, 403), r.status_code
        assert r.json()["code"] in (7, 16)


def test_a_device_without_events_has_a_tag_too(http, auth_headers):
    device, headers = f"etag-{uuid.uuid4().hex[:8]}", auth_headers()
    url = f"/api/gallery/{device}/events"
    page = http.get(url, headers=headers)
    assert page.status_code == 200 and page.json() == []
    assert http.get(url, headers={**headers, "If-None-Match": page.headers["etag"]}).status_code == 304
    upload(http, headers, device, "a.txt")
    r = http.get(url, headers={**headers, "If-None-Match": page.headers["etag"]})
    assert r.status_code == 200 and len(r.json()) == 1


def test_if_match_holds_for_a_star_alone(http, auth_headers):
    """A listing's tags are weak, and If-Match compares strongly (RFC 9110 13.1.1): 412 for any
    list of tags, the page's own included; `*` holds, since a listing always has a page."""
    device, headers = f"etag-{uuid.uuid4().hex[:8]}", auth_headers()
    upload(http, headers, device, "a.txt")
    url = f"/api/gallery/{device}/events"
    page = http.get(url, headers=headers)
    assert http.get(url, headers={**headers, "If-Match": "*"}).json() == page.json()
    for header in (page.headers["etag"], page.headers["etag"].removeprefix("W/"), "garbage"):
        r = http.get(url, headers={**headers, "If-Match": header})
        assert r.status_code == 412, (header, r.text)
        assert r.json()["details"][0]["reason"] == "PRECONDITION_FAILED"
        assert "etag" not in r.headers


def test_a_bad_request_is_refused_before_its_tag_is_compared(http, auth_headers):
    device, headers = f"etag-{uuid.uuid4().hex[:8]}", auth_headers()
    upload(http, headers, device, "a.txt")
    r = http.get(f"/api/gallery/{device}/events", params={"page_token": "nope"},
                 headers={**headers, "If-None-Match": "*"})
    assert r.status_code == 400 and r.json()["details"][0]["reason"] == "INVALID_PAGE_TOKEN"


@pytest.mark.parametrize("path", ["stats", "paths", "events/{event_id}"])
def test_other_reads_ignore_if_none_match(http, auth_headers, path):
    """Only the listing is conditional; the other reads answer as ever on the route that runs Lua."""
    device, headers = f"etag-{uuid.uuid4().hex[:8]}", auth_headers()
    path = path.format(event_id=upload(http, headers, device, "a.txt"))
    plain = http.get(f"/api/gallery/{device}/{path}", headers=headers)
    r = http.get(f"/api/gallery/{device}/{path}", headers={**headers, "If-None-Match": "*"})
    assert r.status_code == plain.status_code == 200
    assert r.json() == plain.json()
    assert "etag" not in r.headers


@pytest.mark.parametrize("method", ["ListEventsJson", "ListEvents"])
def test_native_listings_take_if_none_match(http, auth_headers, envoy_channel, method):
    """A native client sends If-None-Match as metadata and is told by `x-http-status: 304` and no
    page; the rows (ListEvents) and the JSON (ListEventsJson) of a page have tags of their own."""
    device, headers = f"etag-{uuid.uuid4().hex[:8]}", auth_headers()
    upload(http, headers, device, "a.txt")
    stub = gallery_pb2_grpc.GalleryServiceStub(envoy_channel)
    auth = (("authorization", headers["Authorization"]),)
    request = pb.ListEventsRequest(device=device)

    def call(*metadata: tuple[str, str]) -> tuple[dict[str, str], list[object]]:
        if method == "ListEventsJson":
            body, answer = stub.ListEventsJson.with_call(request, metadata=(*auth, *metadata), timeout=10)
            return dict(answer.initial_metadata()), [body.data] if body.data else []
        responses = stub.ListEvents(request, metadata=(*auth, *metadata), timeout=10)
        events = list(responses)
        assert responses.code() == grpc.StatusCode.OK
        return dict(responses.initial_metadata()), events

    headers_first, page = call()
    tag = headers_first["etag"]
    assert LISTING_TAG.fullmatch(tag) and len(page) == 1 and "x-http-status" not in headers_first
    rest_tag = http.get(f"/api/gallery/{device}/events", headers=headers).headers["etag"]
    assert (tag == rest_tag) is (method == "ListEventsJson")  # the REST page is ListEventsJson's
    unchanged, nothing = call(("if-none-match", tag))
    assert unchanged["x-http-status"] == "304" and unchanged["etag"] == tag and nothing == []
    upload(http, headers, device, "b.txt")
    changed, page = call(("if-none-match", tag))
    assert "x-http-status" not in changed and changed["etag"] != tag and page
