"""Listing filters, order and page tokens, on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import datetime
import json
import random

import pytest

from gallery_server import paging, service
from gallery_server.errors import InvalidArgument, PermissionDenied

from .test_service import other_principal, store

T0 = datetime.datetime(2024, 5, 1, 12, 0, 0, tzinfo=datetime.UTC)


@pytest.fixture
def events(gallery, principal, monkeypatch):
    """30 events, several sharing a timestamp (so the id tie-break matters), returned oldest first."""
    made = []
    for i in range(30):
        moment = T0 + datetime.timedelta(minutes=i // 3)
        monkeypatch.setattr(service, "utcnow", lambda moment=moment: moment)
        made.append(store(gallery, principal, name=f"{i}.png", media_type="video" if i % 4 == 0 else ""))
    return sorted(made, key=lambda e: (e.created, e.id))


def walk(gallery, principal, **request):
    """Follow page tokens to the end; returns the ids in the order served."""
    ids, token = [], ""
    while True:
        page, token = gallery.list_page(principal, "cam1", page_token=token, **request)
        ids += [e.id for e in page]
        if not token:
            return ids


@pytest.mark.parametrize("limit", [1, 4, 7, 30, 50])
def test_page_tokens_visit_every_event_once_in_order(gallery, principal, events, limit):
    newest = walk(gallery, principal, limit=limit)
    assert newest == [e.id for e in reversed(events)]
    assert walk(gallery, principal, limit=limit, order="oldest") == [e.id for e in events]


@pytest.mark.parametrize(("limit", "sizes"), [(7, [7, 7, 7, 7, 2]), (10, [10, 10, 10, 0]), (30, [30, 0]), (31, [30])])
def test_the_token_is_empty_once_a_page_is_short(gallery, principal, events, limit, sizes):
    """As README and the proto say: a page with fewer than `limit` events ends the listing, and a
    last page that is exactly full names one more, empty page (no second read per full page).
    Both printers of a page: rows (native) and the REST listing's JSON."""
    for read in (gallery.list_page, gallery.list_page_json):
        served, token = [], ""
        while True:
            page, token = read(principal, "cam1", limit=limit, page_token=token)
            served.append(len(json.loads(page)) if isinstance(page, bytes) else len(page))
            if not token:
                break
        assert served == sizes, read.__name__


def test_time_window_is_inclusive_then_exclusive(gallery, principal, events):
    since, until = T0 + datetime.timedelta(minutes=2), T0 + datetime.timedelta(minutes=5)
    ids = walk(gallery, principal, limit=2, order="oldest", since=since.isoformat(), until=until.isoformat())
    assert ids == [e.id for e in events if since <= e.created.replace(tzinfo=datetime.UTC) < until]
    assert len(ids) == 9


def test_a_bound_between_two_microseconds_is_the_next_one(gallery, principal, events):
    """Events are stored to the microsecond: `since` 0.5 µs after an event leaves it out, and
    `until` 0.5 µs after it takes it in (Python's parser alone dropped the digits past 6)."""
    first = events[0]
    moment = first.created.replace(tzinfo=datetime.UTC)
    between = moment.strftime("%Y-%m-%dT%H:%M:%S.%f") + "5Z"
    assert paging.build(since=between).since == moment + datetime.timedelta(microseconds=1)
    assert paging.build(since=moment.strftime("%Y-%m-%dT%H:%M:%S.%f") + "000Z").since == moment
    assert first.id not in walk(gallery, principal, order="oldest", since=between)
    assert first.id in walk(gallery, principal, order="oldest", until=between)


def test_filters_combine_with_tokens(gallery, principal, events):
    ids = walk(gallery, principal, limit=3, media_type="video")
    assert ids == [e.id for e in reversed(events) if e.media_type == "video"]


def test_pages_are_stable_across_inserts_and_deletes(gallery, principal, events, monkeypatch):
    page, token = gallery.list_page(principal, "cam1", limit=10)
    seen = [e.id for e in page]
    # A newer event arrives and an already served one goes away: neither shifts later pages.
    monkeypatch.setattr(service, "utcnow", lambda: T0 + datetime.timedelta(days=1))
    store(gallery, principal, name="late.png")
    gallery.delete_event(principal, "cam1", seen[0])
    while token:
        page, token = gallery.list_page(principal, "cam1", limit=10, page_token=token)
        seen += [e.id for e in page]
    assert seen == [e.id for e in reversed(events)]


def test_offset_still_works_as_documented(gallery, principal, events):
    page = gallery.list_events(principal, "cam1", limit=5, offset=5)
    assert [e.id for e in page] == [e.id for e in reversed(events)][5:10]


@pytest.mark.parametrize(("request_args", "reason"), [
    ({"order": "random"}, "INVALID_ORDER"),
    ({"since": "yesterday"}, "INVALID_TIME"),
    ({"since": "2024-05-01T12:00:00"}, "INVALID_TIME"),  # no zone: ambiguous
    ({"since": "2024-05-02T00:00:00Z", "until": "2024-05-01T00:00:00Z"}, "INVALID_TIME_WINDOW"),
    ({"page_token": "garbage"}, "INVALID_PAGE_TOKEN"),
    ({"page_token": "W10"}, "INVALID_PAGE_TOKEN"),  # base64 of []
])
def test_bad_listing_requests(gallery, principal, request_args, reason):
    with pytest.raises(InvalidArgument) as caught:
        gallery.list_page(principal, "cam1", **request_args)
    assert caught.value.reason == reason


def test_token_is_bound_to_its_listing(gallery, principal, events):
    _, token = gallery.list_page(principal, "cam1", limit=2)
    for other in ({"order": "oldest"}, {"media_type": "video"}, {"since": T0.isoformat()}):
        with pytest.raises(InvalidArgument) as caught:
            gallery.list_page(principal, "cam1", limit=2, page_token=token, **other)
        assert caught.value.reason == "PAGE_TOKEN_MISMATCH"
    with pytest.raises(InvalidArgument) as caught:
        gallery.list_page(principal, "cam1", limit=2, offset=2, page_token=token)
    assert caught.value.reason == "PAGE_TOKEN_WITH_OFFSET"
    # An offset of 0 skips nothing (the reference's own example sends `offset=0`): taken.
    with_zero, _ = gallery.list_page(principal, "cam1", limit=2, offset=0, page_token=token)
    assert with_zero == gallery.list_page(principal, "cam1", limit=2, page_token=token)[0]


def test_permission_comes_before_validation_of_the_listing(gallery):
    with pytest.raises(PermissionDenied):
        gallery.list_page(other_principal(), "cam1", page_token="garbage")


def test_token_round_trip_fuzz():
    rng = random.Random(7)
    query = paging.build(order="oldest", media_type="image", since="2024-01-01T00:00:00Z")
    for _ in range(200):
        moment = T0 + datetime.timedelta(microseconds=rng.randrange(10**12))
        event_id = "evt_" + "".join(rng.choice("AZaz09_-") for _ in range(22))
        token = paging.next_page_token(query, (moment, event_id), full=True)
        again = paging.build(order="oldest", media_type="image", since="2024-01-01T00:00:00Z", page_token=token)
        assert again.after == (moment, event_id)
    assert paging.next_page_token(query, (T0, "evt_" + "A" * 22), full=False) == ""


def _edited_token(created: str) -> str:
    """A real page token of the default listing whose position is moved to `created`."""
    token = paging.next_page_token(paging.build(), (T0, "evt_" + "A" * 22), full=True)
    fields = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    fields[-2] = created
    return base64.urlsafe_b64encode(json.dumps(fields).encode()).decode().rstrip("=")


@pytest.mark.parametrize(("request_args", "reason"), [
    ({"page_token": _edited_token("0001-01-01T00:00:00+01:00")}, "INVALID_PAGE_TOKEN"),  # before year 1
    ({"page_token": _edited_token("9999-12-31T23:59:59-01:00")}, "INVALID_PAGE_TOKEN"),  # past 9999
    ({"since": "0001-01-01T00:00:00+01:00"}, "INVALID_TIME"),  # shifts before year 1
    ({"until": "9999-12-31T23:59:59-01:00"}, "INVALID_TIME"),  # shifts past year 9999
    ({"page_token": "W" * 5000}, "INVALID_PAGE_TOKEN"),  # too long to be ours
])
def test_hostile_listing_values_are_400s(gallery, principal, request_args, reason):
    with pytest.raises(InvalidArgument) as caught:
        gallery.list_page(principal, "cam1", **request_args)
    assert caught.value.reason == reason


def test_deeply_nested_page_token_is_invalid(gallery, principal):
    token = base64.urlsafe_b64encode(b"[" * 600).decode().rstrip("=")
    assert len(token) <= paging.MAX_TOKEN_CHARS
    nested = base64.urlsafe_b64encode(b"[" * 3000).decode().rstrip("=")
    for value in (token, nested):
        with pytest.raises(InvalidArgument) as caught:
            gallery.list_page(principal, "cam1", page_token=value)
        assert caught.value.reason == "INVALID_PAGE_TOKEN"


def _forged_token(version=2, created="2024-05-01T12:00:00+00:00", event_id="evt_" + "A" * 22, length=0) -> str:
    """A page token of the default listing with the given fields (as a client could write one)."""
    token = paging.next_page_token(paging.build(), (T0, "evt_" + "A" * 22), full=True)
    fields = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    fields[0], fields[-2], fields[-1] = version, created, event_id
    text = json.dumps(fields)
    text += " " * (length * 3 // 4 - len(text))  # blanks after the JSON, up to `length` characters
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def test_forged_token_helper_makes_a_valid_token():
    assert paging.build(page_token=_forged_token()).after == (T0, "evt_" + "A" * 22)


@pytest.mark.parametrize("token", [
    _forged_token(version=1),  # version 1 tokens did not name the device
    _forged_token(created="2024-05-01T12:00:00"),  # no zone
    _forged_token(event_id="evt_short"),  # not an event id
    _forged_token(event_id=7),
])
def test_forged_page_tokens_are_invalid(token):
    with pytest.raises(InvalidArgument) as caught:
        paging.build(page_token=token)
    assert caught.value.reason == "INVALID_PAGE_TOKEN"


def test_a_well_formed_token_longer_than_1024_characters_is_invalid():
    assert len(_forged_token(length=1024)) == 1024
    assert paging.build(page_token=_forged_token(length=1024)).after == (T0, "evt_" + "A" * 22)
    token = _forged_token(length=1028)
    assert len(token) == 1028
    with pytest.raises(InvalidArgument) as caught:
        paging.build(page_token=token)
    assert caught.value.reason == "INVALID_PAGE_TOKEN"


def test_token_is_bound_to_its_device_and_until():
    until = "2024-06-01T00:00:00Z"
    token = paging.next_page_token(paging.build(device="cam1", until=until), (T0, "evt_" + "A" * 22), full=True)
    assert paging.build(device="cam1", until=until, page_token=token).after == (T0, "evt_" + "A" * 22)
    for other in ({"device": "cam2", "until": until}, {"device": "cam1"}):
        with pytest.raises(InvalidArgument) as caught:
            paging.build(page_token=token, **other)
        assert caught.value.reason == "PAGE_TOKEN_MISMATCH"


def test_an_empty_time_window_is_invalid():
    with pytest.raises(InvalidArgument) as caught:
        paging.build(since="2024-05-01T12:00:00Z", until="2024-05-01T12:00:00Z")
    assert caught.value.reason == "INVALID_TIME_WINDOW"


def test_a_lowercase_z_is_utc():
    assert paging.build(since="2024-05-01T12:00:00z").since == T0


@pytest.mark.parametrize("typed", [
    "2024-05-01T14:00:00+02:00", "2024-05-01T14:00:00 02:00",  # a raw `+` in a query reads as a space
    "2024-05-01T14:00:00.000 02:00", "2024-05-01T14:00:00 0200", "2024-05-01T14:00:00 02", "2024-05-01T14:00:00+02",
    "2024-05-01T14:00:00 02:00:00", "2024-05-01 14:00:00 02:00",
])
def test_an_offset_whose_plus_became_a_space_is_that_offset(typed):
    assert paging.build(since=typed).since == T0


@pytest.mark.parametrize("typed", [
    "2024-05-01 12:00", "2024-05-01 12:00:00", "2024-05-01 12", "2024-05-01T12:00:00  02:00",
])
def test_a_space_elsewhere_is_no_offset(typed):
    with pytest.raises(InvalidArgument) as caught:
        paging.build(since=typed)
    assert caught.value.reason == "INVALID_TIME"
