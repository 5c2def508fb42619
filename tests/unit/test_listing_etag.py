"""Conditional listing requests (listing.etag, Listing.answer), on SQLite and PostgreSQL: a page's
entity-tag names its query and its device's listing version, so If-None-Match with it is answered
after one lookup of that version, on any replica, whether or not the page is kept."""

from __future__ import annotations

import json

import pytest

from gallery_server import auth
from gallery_server.errors import FailedPrecondition, PermissionDenied
from gallery_server.listing import Listing
from gallery_server.service import Gallery

from ..conftest import statements_run
from .test_listing_cache import PRINTERS, replica, write_after_each_read  # noqa: F401 - replica: the fixture
from .test_service import other_principal, store


def test_a_current_tag_is_answered_after_one_lookup(gallery: Gallery, replica: Gallery,  # noqa: F811
                                                     principal: auth.Principal) -> None:
    for i in range(3):
        store(gallery, principal, name=f"{i}.png")
    answer = gallery.list_answer(principal, "cam1", "json", limit=2)
    assert (answer.page, answer.next_page_token) == gallery.list_page_json(principal, "cam1", limit=2)
    for listing in (gallery.listing, replica.listing, Listing(gallery.db, cache_bytes=0)):
        assert listing.versions_current()  # looked at by a server's first listing (and every 30 s)
        with statements_run(listing.db) as statements:
            unchanged = listing.answer("json", "cam1", if_none_match=answer.etag, limit=2)
        assert unchanged == (None, "", answer.etag)
        assert len(statements) == 1 and "listing_versions" in statements[0], statements
        assert listing.not_modified == 1
    assert replica.listing.kept.served_read == 0  # told without reading or keeping the page


def test_each_page_and_printing_has_its_own_tag(gallery: Gallery, principal: auth.Principal) -> None:
    for i in range(3):
        store(gallery, principal, name=f"{i}.png")
    first = gallery.list_answer(principal, "cam1", "json", limit=2)
    requests = [
        ("json", {"limit": 1}), ("json", {"limit": 2, "offset": 1}), ("json", {"limit": 2, "order": "oldest"}),
        ("json", {"limit": 2, "media_type": "video"}), ("json", {"limit": 2, "page_token": first.next_page_token}),
        ("rows", {"limit": 2}),
    ]
    tags = {first.etag}
    for printed, request in requests:
        answer = gallery.list_answer(principal, "cam1", printed, if_none_match=first.etag, **request)
        assert answer.page is not None, (printed, request)  # another page's tag is not this one's
        tags.add(answer.etag)
    assert len(tags) == len(requests) + 1
    # The same page asked for again, by a client that sends each of them: its own is among them.
    everything = ", ".join(sorted(tags))
    assert gallery.list_answer(principal, "cam1", "rows", if_none_match=everything, limit=2).page is None


@pytest.mark.parametrize("header", ["*", "W/\"{}\"", "\"{}\"", "\"other\", W/\"{}\""])
def test_if_none_match_compares_weakly(gallery: Gallery, principal: auth.Principal, header: str) -> None:
    store(gallery, principal)
    tag = gallery.list_answer(principal, "cam1", "json").etag
    opaque = tag.removeprefix('W/"').removesuffix('"')
    assert gallery.list_answer(principal, "cam1", "json", if_none_match=header.format(opaque)).page is None


@pytest.mark.parametrize("header", ["garbage", "W/", '"unterminated', "W/\"{}\" junk"])
def test_an_if_none_match_that_does_not_parse_matches_nothing(gallery: Gallery, principal: auth.Principal,
                                                              header: str) -> None:
    store(gallery, principal)
    tag = gallery.list_answer(principal, "cam1", "json").etag
    opaque = tag.removeprefix('W/"').removesuffix('"')
    answer = gallery.list_answer(principal, "cam1", "json", if_none_match=header.format(opaque))
    assert (answer.page, answer.next_page_token) == gallery.list_page_json(principal, "cam1")


def test_a_device_without_events_has_a_tag_until_its_first(gallery: Gallery, principal: auth.Principal) -> None:
    empty = gallery.list_answer(principal, "cam1", "json")
    assert empty.page == b"[]"
    assert gallery.list_answer(principal, "cam1", "json", if_none_match=empty.etag).page is None
    event = store(gallery, principal)
    answer = gallery.list_answer(principal, "cam1", "json", if_none_match=empty.etag)
    assert answer.page is not None and [e["id"] for e in json.loads(answer.page)] == [event.id]


def test_authorization_comes_first(gallery: Gallery, principal: auth.Principal) -> None:
    store(gallery, principal)
    tag = gallery.list_answer(principal, "cam1", "json").etag
    with pytest.raises(PermissionDenied):
        gallery.list_answer(other_principal(), "cam1", "json", if_none_match=tag)


def test_if_match_holds_for_a_star_alone(gallery: Gallery, principal: auth.Principal) -> None:
    store(gallery, principal)
    answer = gallery.list_answer(principal, "cam1", "json")
    assert gallery.list_answer(principal, "cam1", "json", if_match="*") == answer
    for header in (answer.etag, answer.etag.removeprefix("W/"), "", "garbage"):
        with pytest.raises(FailedPrecondition) as refused:
            gallery.list_answer(principal, "cam1", "json", if_match=header, if_none_match=answer.etag)
        assert refused.value.reason == "PRECONDITION_FAILED"  # evaluated before If-None-Match


@pytest.mark.parametrize("printed", PRINTERS)
def test_a_tag_never_names_a_page_older_than_its_version(gallery: Gallery, principal: auth.Principal,
                                                         monkeypatch: pytest.MonkeyPatch, printed: str) -> None:
    """A write committed right after a page's read, with nothing kept: the tag answered with that
    page must not be current after the write (a tag read after the page would be, and a client
    holding the older page would be told it is current)."""
    written = write_after_each_read(gallery, principal, monkeypatch, printed)
    none_kept = Listing(gallery.db, cache_bytes=0)
    kind = "rows" if printed == "rows" else "json"
    before = none_kept.answer(kind, "cam1")
    assert written and written[0] not in repr(before.page)
    after = none_kept.answer(kind, "cam1", if_none_match=before.etag)
    assert after.page is not None and written[0] in repr(after.page)
