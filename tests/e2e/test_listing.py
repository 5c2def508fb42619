"""Time windows, order and page tokens through the real Envoy."""

from __future__ import annotations

import datetime
import uuid


def upload(http, headers, device, name):
    r = http.post(f"/api/gallery/{device}/upload", headers=headers,
                  files={"event": (name, b"x" * 10)}, data={"name": name})
    assert r.status_code == 200, r.text
    return r.json()["eventId"]


def test_page_tokens_across_inserts_return_every_event_once(http, auth_headers):
    device, headers = f"list-{uuid.uuid4().hex[:8]}", auth_headers()
    before = [upload(http, headers, device, f"{i}.txt") for i in range(7)]
    seen, token, pages = [], "", 0
    while True:
        params = {"limit": 3, **({"page_token": token} if token else {})}
        r = http.get(f"/api/gallery/{device}/events", params=params, headers=headers)
        assert r.status_code == 200, r.text
        assert isinstance(r.json(), list)  # the documented top-level array, unchanged
        seen += [e["id"] for e in r.json()]
        token = r.headers["x-next-page-token"]
        pages += 1
        if pages == 1:
            upload(http, headers, device, "late.txt")  # newer than the cursor: not in later pages
        if not token:
            break
    assert seen == list(reversed(before))
    assert pages == 3


def test_order_and_time_window(http, auth_headers):
    device, headers = f"list-{uuid.uuid4().hex[:8]}", auth_headers()
    ids = [upload(http, headers, device, f"{i}.txt") for i in range(4)]
    listed = http.get(f"/api/gallery/{device}/events?order=oldest", headers=headers).json()
    assert [e["id"] for e in listed] == ids
    second = listed[1]["created"]
    window = http.get(f"/api/gallery/{device}/events", headers=headers,
                      params={"order": "oldest", "since": second, "until": listed[3]["created"]}).json()
    assert [e["id"] for e in window] == ids[1:3]
    future = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1)).isoformat()
    assert http.get(f"/api/gallery/{device}/events", params={"since": future}, headers=headers).json() == []


def test_bad_listing_parameters_are_json_400s(http, auth_headers):
    device, headers = f"list-{uuid.uuid4().hex[:8]}", auth_headers()
    for params, reason in (({"order": "sideways"}, "INVALID_ORDER"), ({"since": "today"}, "INVALID_TIME"),
                           ({"page_token": "nope"}, "INVALID_PAGE_TOKEN")):
        r = http.get(f"/api/gallery/{device}/events", params=params, headers=headers)
        assert r.status_code == 400, r.text
        assert r.json()["details"][0]["reason"] == reason
