"""The whole stack on PostgreSQL: the same REST conversation as on SQLite gives the same JSON, and
the rows really live in PostgreSQL.

Needs GALLERY_TEST_POSTGRES_URL (the Makefile sets it); skipped without it, like every PostgreSQL test.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import hashlib
import json
import pathlib
import random
import re
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import httpx
import pytest
import sqlalchemy as sa

from gallery.v1 import gallery_pb2, gallery_pb2_grpc
from gallery_server import auth

from ..conftest import JWT_SECRET, drop_tables, rich_error, stored_files
from .conftest import Stack, running_stack, start_stack, stop_stack
from .test_listing import ANNOUNCE_SQL, ANNOUNCED, assert_listing_is_envoys_printing

EVENT_ID_RE = re.compile(r"evt_[A-Za-z0-9_-]{22}")
_rng = random.Random(20240320)
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + _rng.randbytes(300_000)
VIDEO = _rng.randbytes(1_500_000)
THUMB = b"\xff\xd8\xff\xe0" + _rng.randbytes(4_000)
SIGNED = _rng.randbytes(50_000)
METADATA = {"timestamp": "2024-03-20T10:00:00Z", "camera": {"iso": 200, "flash": False}, "tags": ["a", "b"]}

Check = Callable[[str, str, dict[str, str]], None]


@pytest.fixture(scope="module")
def pg_stack(postgres_database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    drop_tables(postgres_database)  # a new data folder: no earlier test's stored events
    with running_stack(tmp_path_factory.mktemp("pg-stack"), {"GALLERY_DATABASE_URL": postgres_database}) as stack:
        yield stack
    drop_tables(postgres_database)


@pytest.fixture
def pg_engine(postgres_database: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(postgres_database)
    yield engine
    engine.dispose()


def rest_flow(stack: Stack, headers: dict[str, str], device: str, check: Check) -> dict[str, Any]:
    """Upload (multipart and signed URL), list, stats, get, delete through Envoy.

    Returns every response in a form that does not depend on ids or clocks, so that two stacks can
    be compared; `check(stage, device, ids)` runs after the uploads and after the delete.
    """
    out: dict[str, Any] = {}
    ids: dict[str, str] = {}

    def normalize(value: Any) -> Any:
        text = json.dumps(value)
        for label, event_id in ids.items():
            text = text.replace(event_id, f"<{label}>")
        value = json.loads(text)
        return _drop_created(value)

    with httpx.Client(base_url=stack.base_url, timeout=60) as http:
        # 1. multipart upload with thumbnail and metadata (the reference's field order)
        r = http.post(
            f"/api/gallery/{device}/upload",
            headers=headers,
            data={"name": "capture.png", "media_type": "image", "has_thumbnail": "true",
                  "metadata": json.dumps(METADATA)},
            files={"event": ("capture.png", PNG, "image/png"),
                   "thumbnail": ("thumb.jpg", THUMB, "image/jpeg")},
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"success", "eventId"} and body["success"] is True, body
        assert EVENT_ID_RE.fullmatch(body["eventId"])
        ids["image"] = body["eventId"]

        # 2. multipart upload without thumbnail, media type inferred from the name
        r = http.post(
            f"/api/gallery/{device}/upload",
            headers=headers,
            data={"name": "clip.mp4"},
            files={"event": ("clip.mp4", VIDEO, "application/octet-stream")},
        )
        assert r.status_code == 200, r.text
        ids["video"] = r.json()["eventId"]

        # 3. signed URLs: thumbnail first, then the media
        r = http.get(f"/api/gallery/{device}/upload-url",
                     params={"filename": "notes.txt", "thumbnail": "true"}, headers=headers)
        assert r.status_code == 200, r.text
        urls = r.json()
        ids["signed"] = urls["eventId"]
        with httpx.Client(timeout=60) as raw:
            r = raw.put(urls["thumbnail_upload_url"], content=THUMB)
            assert r.status_code == 200, r.text
            out["signed_thumbnail_put"] = normalize(r.json())
            r = raw.put(urls["upload_url"], content=SIGNED)
            assert r.status_code == 200, r.text
            out["signed_media_put"] = normalize(r.json())
            r = raw.put(urls["upload_url"], content=SIGNED)
            assert r.status_code == 403, r.text
            out["signed_reuse"] = (r.status_code, normalize(r.json()))

        check("uploaded", device, ids)

        r = http.get(f"/api/gallery/{device}/events", headers=headers)
        assert r.status_code == 200, r.text
        listed = r.json()
        assert [e["id"] for e in listed] == [ids["signed"], ids["video"], ids["image"]], listed
        for event in listed:
            assert set(event) == {"id", "name", "media_type", "size", "has_thumbnail", "created",
                                  "mime_type", "sha256", "state"}, event
            assert event["state"] == "stored"
            created = datetime.datetime.fromisoformat(event["created"].replace("Z", "+00:00"))
            assert event["created"].endswith("Z")
            assert abs(datetime.datetime.now(datetime.UTC) - created) < datetime.timedelta(minutes=5)
            assert isinstance(event["size"], int)
        out["list"] = normalize(listed)

        for name, params in {
            "list_images": {"media_type": "image"},
            "list_page": {"limit": "1", "offset": "1"},
            "list_past_end": {"offset": "10"},
        }.items():
            r = http.get(f"/api/gallery/{device}/events", params=params, headers=headers)
            assert r.status_code == 200, r.text
            out[name] = normalize(r.json())

        r = http.get(f"/api/gallery/{device}/stats", headers=headers)
        assert r.status_code == 200, r.text
        out["stats"] = r.json()

        r = http.get(f"/api/gallery/{device}/events/{ids['image']}", headers=headers)
        assert r.status_code == 200, r.text
        out["get_image"] = normalize(r.json())

        r = http.delete(f"/api/gallery/{device}/events/{ids['video']}", headers=headers)
        assert r.status_code == 200, r.text
        out["delete"] = r.json()
        r = http.delete(f"/api/gallery/{device}/events/{ids['video']}", headers=headers)
        assert r.status_code == 404, r.text
        out["delete_again"] = normalize(r.json())
        r = http.get(f"/api/gallery/{device}/events/{ids['video']}", headers=headers)
        assert r.status_code == 404, r.text
        out["get_deleted"] = normalize(r.json())

        check("deleted", device, ids)

        r = http.get(f"/api/gallery/{device}/events", headers=headers)
        out["list_after_delete"] = normalize(r.json())
        r = http.get(f"/api/gallery/{device}/stats", headers=headers)
        out["stats_after_delete"] = r.json()
    # Device names differ between the runs; ids are already replaced.
    return json.loads(json.dumps(out).replace(device, "<device>"))


def _drop_created(value: Any) -> Any:
    if isinstance(value, list):
        return [_drop_created(v) for v in value]
    if isinstance(value, dict):
        return {k: _drop_created(v) for k, v in value.items() if k != "created"}
    return value


def expected_event(name: str, media_type: str, mime: str, data: bytes, thumb: bool, label: str) -> dict:
    return {
        "id": f"<{label}>", "name": name, "media_type": media_type, "size": len(data),
        "has_thumbnail": thumb, "mime_type": mime, "sha256": hashlib.sha256(data).hexdigest(), "state": "stored",
    }


def test_postgres_stack_matches_sqlite(
    postgres_database: str,  # first: skips before any stack starts when PostgreSQL is not configured
    stack: Stack, pg_stack: Stack, pg_engine: sa.Engine, auth_headers: Callable[..., dict[str, str]]
) -> None:
    headers = auth_headers()

    def check_files(data_dir: pathlib.Path) -> Check:
        def check(stage: str, device: str, ids: dict[str, str]) -> None:
            media = data_dir / "media" / device
            if stage == "uploaded":
                assert (media / ids["image"]).read_bytes() == PNG
                assert (media / f"{ids['image']}.thumb").read_bytes() == THUMB
                assert (media / ids["video"]).read_bytes() == VIDEO
                assert (media / ids["signed"]).read_bytes() == SIGNED
                assert (media / f"{ids['signed']}.thumb").read_bytes() == THUMB
            else:
                assert not (media / ids["video"]).exists()
                assert (media / ids["image"]).exists()
            assert not list((data_dir / "staging").iterdir())

        return check

    sqlite_result = rest_flow(stack, headers, f"sq-{uuid.uuid4().hex[:8]}", check_files(stack.data_dir))

    pg_files = check_files(pg_stack.data_dir)

    def check_pg(stage: str, device: str, ids: dict[str, str]) -> None:
        pg_files(stage, device, ids)
        with pg_engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT id, device, name, media_type, mime_type, size, sha256, has_thumbnail,"
                        " metadata_json FROM events WHERE device = :device ORDER BY name"),
                {"device": device},
            ).mappings().all()
            grants = conn.execute(
                sa.text("SELECT event_id, device, filename, media_state, thumbnail_state"
                        " FROM upload_grants WHERE device = :device"),
                {"device": device},
            ).mappings().all()
        by_id = {row["id"]: dict(row) for row in rows}
        if stage == "uploaded":
            assert set(by_id) == set(ids.values()), rows
            image = by_id[ids["image"]]
            assert image["name"] == "capture.png"
            assert image["media_type"] == "image"
            assert image["size"] == len(PNG)
            assert image["sha256"] == hashlib.sha256(PNG).hexdigest()
            assert image["has_thumbnail"] is True
            assert json.loads(image["metadata_json"]) == METADATA
            assert by_id[ids["video"]]["size"] == len(VIDEO)
            assert by_id[ids["signed"]]["name"] == "notes.txt"
            assert by_id[ids["signed"]]["has_thumbnail"] is True
            assert [dict(g) for g in grants] == [{
                "event_id": ids["signed"], "device": device, "filename": "notes.txt",
                "media_state": "done", "thumbnail_state": "done",
            }]
        else:
            assert set(by_id) == {ids["image"], ids["signed"]}, rows

    pg_result = rest_flow(pg_stack, headers, f"pg-{uuid.uuid4().hex[:8]}", check_pg)

    assert pg_result == sqlite_result

    # And the JSON is the one the contract describes.
    image = expected_event("capture.png", "image", "image/png", PNG, True, "image")
    video = expected_event("clip.mp4", "video", "video/mp4", VIDEO, False, "video")
    signed = expected_event("notes.txt", "document", "text/plain", SIGNED, True, "signed")
    assert pg_result["list"] == [signed, video, image]
    assert pg_result["list_images"] == [image]
    assert pg_result["list_page"] == [video]
    assert pg_result["list_past_end"] == []
    assert pg_result["get_image"] == {**image, "metadata": METADATA}
    assert pg_result["stats"] == {
        "total_events": 3,
        "total_size": len(PNG) + len(VIDEO) + len(SIGNED),
        "by_type": {
            "image": {"count": 1, "size": len(PNG)},
            "video": {"count": 1, "size": len(VIDEO)},
            "document": {"count": 1, "size": len(SIGNED)},
        },
    }
    assert pg_result["delete"] == {"success": True}
    assert pg_result["delete_again"]["code"] == 5
    assert pg_result["delete_again"]["details"][0]["reason"] == "EVENT_NOT_FOUND"
    assert pg_result["get_deleted"]["details"][0]["reason"] == "EVENT_NOT_FOUND"
    assert pg_result["signed_thumbnail_put"] == {"success": True, "eventId": "<signed>"}
    assert pg_result["signed_media_put"] == {"success": True, "eventId": "<signed>"}
    assert pg_result["signed_reuse"][1]["details"][0]["reason"] == "URL_ALREADY_USED"
    assert pg_result["list_after_delete"] == [signed, image]
    assert pg_result["stats_after_delete"] == {
        "total_events": 2,
        "total_size": len(PNG) + len(SIGNED),
        "by_type": {
            "image": {"count": 1, "size": len(PNG)},
            "document": {"count": 1, "size": len(SIGNED)},
        },
    }

    # The PostgreSQL stack never fell back to SQLite.
    assert not (pg_stack.data_dir / "gallery.db").exists()
    assert all(p.parent.parent.name == "media" for p in stored_files(pg_stack.data_dir))


def test_postgres_listing_bytes_are_envoys_bytes(
    pg_stack: Stack, pg_engine: sa.Engine, auth_headers: Callable[..., dict[str, str]]
) -> None:
    """PostgreSQL prints a page itself (listing_json.postgres_array): byte for byte what Envoy
    prints for each event, on the rows whose spelling could differ."""
    device, headers = f"pg-list-{uuid.uuid4().hex[:8]}", auth_headers()
    with pg_engine.begin() as connection:
        for created, size, name, thumbnail in ANNOUNCED:
            connection.execute(
                sa.text(ANNOUNCE_SQL.format(id=":id", device=":device", name=":name", size=":size",
                                            thumbnail=":thumbnail", created=":created")),
                {"id": f"evt_{uuid.uuid4().hex[:22]}", "device": device, "name": name, "size": size,
                 "thumbnail": bool(thumbnail),
                 "created": datetime.datetime.fromisoformat(created).replace(tzinfo=datetime.UTC)},
            )
    with httpx.Client(base_url=pg_stack.base_url, timeout=60) as http:
        assert_listing_is_envoys_printing(http, headers, device)


def test_requests_right_after_postgresql_ended_every_connection_are_answered(
    pg_stack: Stack, pg_engine: sa.Engine, auth_headers: Callable[..., dict[str, str]]
) -> None:
    """As after a restart of PostgreSQL: the server's pooled connections are all gone, most of them
    used moments before (so lent to a read without a ping, db.py). Every request is still answered
    as before it, at once, and an upload stores its event."""
    device, headers = f"pg-ended-{uuid.uuid4().hex[:8]}", auth_headers()
    with httpx.Client(base_url=pg_stack.base_url, timeout=60) as http:
        r = http.post(f"/api/gallery/{device}/upload", headers=headers, data={"name": "a.png"},
                      files={"event": ("a.png", PNG, "image/png")})
        assert r.status_code == 200, r.text
        event_id = r.json()["eventId"]
        reads = [f"/api/gallery/{device}/events", f"/api/gallery/{device}/stats",
                 f"/api/gallery/{device}/events/{event_id}"] * 4

        def read_all() -> list[tuple[int, bytes]]:
            # At once, from as many connections: the server's read workers take several pooled ones.
            with concurrent.futures.ThreadPoolExecutor(len(reads)) as pool:
                return list(pool.map(lambda path: _get(pg_stack, path, headers), reads))

        before = read_all()
        assert {status for status, _ in before} == {200}
        # Autocommit: within a transaction pg_stat_activity would show one snapshot throughout.
        with pg_engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            ended = [pid for pid, _ in connection.execute(sa.text(
                "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ))]
            # The ended ones only: the server's background tasks may open new ones meanwhile.
            deadline = time.monotonic() + 20
            while connection.execute(sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(:ended)"
            ), {"ended": ended}).scalar_one():
                assert time.monotonic() < deadline, "the server's connections did not end"
                time.sleep(0.01)
        assert len(ended) >= 2  # the server's pooled connections
        assert read_all() == before
        r = http.post(f"/api/gallery/{device}/upload", headers=headers, data={"name": "b.png"},
                      files={"event": ("b.png", PNG, "image/png")})
        assert r.status_code == 200, r.text
        assert http.get(f"/api/gallery/{device}/stats", headers=headers).json()["total_events"] == 2


def _get(stack: Stack, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
    with httpx.Client(base_url=stack.base_url, timeout=60) as http:
        r = http.get(path, headers=headers)
        return r.status_code, r.content


def test_while_postgresql_refuses_connections_requests_are_503_and_nothing_is_half_stored(
    postgres_database: str, tmp_path: pathlib.Path, auth_headers: Callable[..., dict[str, str]]
) -> None:
    """As while PostgreSQL restarts: every request that needs the database is UNAVAILABLE (HTTP
    503, reason DATABASE_UNAVAILABLE: try again later), not INTERNAL; an upload then leaves no file
    behind; and once the database is back, the same requests are answered."""
    url = sa.make_url(postgres_database)
    name = f"gallery_refusing_{uuid.uuid4().hex[:12]}"
    # Through the tests' own database: a server need not have one named "postgres".
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    device, headers = f"pg-refusing-{uuid.uuid4().hex[:8]}", auth_headers()
    admin_token = auth.mint(JWT_SECRET, subject="ops", devices=["*"], scope=auth.ADMIN)
    stack = None
    try:  # from the start: a stack that fails to start must not leave the database behind
        stack = start_stack(tmp_path / "data", tmp_path / "gallery.log", extra_env={
            "GALLERY_DATABASE_URL": url.set(database=name).render_as_string(hide_password=False),
        })
        with httpx.Client(base_url=stack.base_url, timeout=60) as http:
            r = http.post(f"/api/gallery/{device}/upload", headers=headers, data={"name": "a.png"},
                          files={"event": ("a.png", PNG, "image/png")})
            assert r.status_code == 200, r.text
            event_id = r.json()["eventId"]
            stored = stored_files(stack.data_dir)
            with admin.connect() as connection:
                connection.exec_driver_sql(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
                connection.exec_driver_sql(
                    f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
                )
            try:
                for method, path in [
                    ("GET", f"/api/gallery/{device}/events"), ("GET", f"/api/gallery/{device}/stats"),
                    ("GET", f"/api/gallery/{device}/events/{event_id}"),
                    ("GET", f"/api/gallery/{device}/events/{event_id}/content"),
                    ("DELETE", f"/api/gallery/{device}/events/{event_id}"),
                ]:
                    r = http.request(method, path, headers=headers)
                    assert r.status_code == 503, (path, r.status_code, r.text)
                    body = r.json()
                    assert body["code"] == 14 and body["message"] == "the database is unavailable; try again later"
                    assert [d["reason"] for d in body["details"]] == ["DATABASE_UNAVAILABLE"], body
                    assert r.headers["retry-after"] == "1", (path, r.headers)
                r = http.post(f"/api/gallery/{device}/upload", headers=headers, data={"name": "b.png"},
                              files={"event": ("b.png", VIDEO, "image/png")})
                assert r.status_code == 503, r.text
                assert stored_files(stack.data_dir) == stored
                assert list((stack.data_dir / "staging").iterdir()) == []
                with grpc.insecure_channel(stack.envoy_grpc_address) as channel:
                    with pytest.raises(grpc.RpcError) as raised:
                        gallery_pb2_grpc.GalleryServiceStub(channel).GetStats(
                            gallery_pb2.GetStatsRequest(device=device), metadata=[
                                ("authorization", headers["Authorization"])], timeout=30)
                    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
                    assert rich_error(raised.value)[0].reason == "DATABASE_UNAVAILABLE"
                    assert ("retry-after", "1") in raised.value.trailing_metadata()
                # The operator's status still answers, with what lives outside the database.
                r = http.get("/api/admin/status", headers={"Authorization": f"Bearer {admin_token}"})
                assert r.status_code == 200, r.text
                status = r.json()
                assert status["database_up"] is False and "counts" not in status and "device_storage" not in status
                assert status["disk"]["total_bytes"] > 0
            finally:
                with admin.connect() as connection:
                    connection.exec_driver_sql(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            r = http.get(f"/api/gallery/{device}/stats", headers=headers)
            assert r.status_code == 200 and r.json()["total_events"] == 1, r.text
            assert http.get(f"/api/gallery/{device}/events/{event_id}/content", headers=headers).content == PNG
        assert "database unavailable: " in stack.log()
    finally:
        if stack is not None:
            stop_stack(stack)
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()
