"""A replica's health follows its database and its data folder (rpc/readiness.py), on both
databases, with grpc_health's own servicer: what Envoy's health check reads."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from grpc_health.v1 import health, health_pb2

from gallery_server import auth
from gallery_server.db import Database, availability
from gallery_server.rpc import readiness
from gallery_server.rpc.server import HEALTH_CHECKED
from gallery_server.service import Gallery

from .test_service import store

UNREACHABLE = "postgresql+psycopg://postgres@127.0.0.1:1/gallery?connect_timeout=2"


def status(servicer: health.HealthServicer, service: str = "") -> int:
    return servicer.Check(health_pb2.HealthCheckRequest(service=service), None).status


@pytest.fixture
def watched(gallery: Gallery) -> Iterator[tuple[readiness.Readiness, health.HealthServicer]]:
    servicer = health.HealthServicer()
    for name in HEALTH_CHECKED:
        servicer.set(name, readiness.SERVING)
    yield readiness.Readiness(gallery, servicer, HEALTH_CHECKED), servicer
    availability.answered()  # process-wide: no other test starts with the database "down"


def store_five(gallery: Gallery, principal: auth.Principal) -> list[str]:
    return [store(gallery, principal, data=b"%d" % n).id for n in range(5)]


def test_stored_media_are_found_where_the_database_says(gallery: Gallery, principal: auth.Principal) -> None:
    assert gallery.stored_media_found()  # nothing stored: nothing to miss
    ids = store_five(gallery, principal)
    assert gallery.stored_media_found()
    media = gallery.settings.data_dir / "media"
    media.rename(media.with_name("elsewhere"))  # the volume that did not mount
    assert not gallery.stored_media_found()
    media.with_name("elsewhere").rename(media)
    assert gallery.stored_media_found()
    for event_id in ids[1:]:  # files lost are the reconciler's to report, while one is there
        gallery.storage.media_path("cam1", event_id).unlink()
    assert gallery.stored_media_found()


def test_the_events_looked_at_are_not_the_tables_first(gallery: Gallery, principal: auth.Principal) -> None:
    """The table's first 20 rows (an old device's, say) were the sample every time: their files
    deleted by hand, a gallery of 137 was taken for another folder and `gallery run` would not
    start. Here the 20 lowest ids of 40 have lost their files, and each look covers 20 events: it
    finds a file unless it starts below the lowest id or above the highest (about 1 in 20)."""
    ids = sorted(store(gallery, principal, data=b"%d" % n).id for n in range(40))
    for event_id in ids[:20]:
        gallery.storage.media_path("cam1", event_id).unlink()
    assert sum(gallery.stored_media_found(scan=20, batch=5) for _ in range(40)) >= 20


def test_one_file_left_is_found_wherever_its_id_sorts(gallery: Gallery, principal: auth.Principal) -> None:
    """Whatever the random start, the look wraps round to the ids before it. Before, 20 random
    picks missed the one file left in a gallery of five in 1 of 6 galleries (a test failed so)."""
    ids = sorted(store(gallery, principal, data=b"%d" % n).id for n in range(7))
    paths = [gallery.storage.media_path("cam1", event_id) for event_id in ids]
    for kept in paths:  # the lowest id, the highest, and those between
        for path in paths:
            if path != kept:
                path.rename(path.with_suffix(".aside"))
        assert all(gallery.stored_media_found(batch=2) for _ in range(20))
        for path in paths:
            if path != kept:
                path.with_suffix(".aside").rename(path)
    for path in paths:
        path.unlink()
    assert not gallery.stored_media_found(batch=2)  # none of the seven: another folder


def test_a_gallery_of_a_few_events_is_never_taken_for_another(gallery: Gallery, principal: auth.Principal) -> None:
    for event_id in store_five(gallery, principal)[:4]:
        gallery.storage.media_path("cam1", event_id).unlink()
    gallery.delete_events("cam1", [e.id for e in gallery.list_events(principal, "cam1")][:1])
    assert len(gallery.list_events(principal, "cam1")) == 4
    assert gallery.stored_media_found()  # four rows, none with its file: too few to tell


def test_a_replica_without_the_stored_media_is_not_serving_until_it_has_them(
    watched, gallery: Gallery, principal: auth.Principal, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    check, servicer = watched
    monkeypatch.setattr(readiness, "STORAGE_CHECK_SECONDS", 0.0)  # every pass
    store_five(gallery, principal)
    check.run_pass()
    assert [status(servicer, name) for name in HEALTH_CHECKED] == [readiness.SERVING] * 4
    media = gallery.settings.data_dir / "media"
    media.rename(media.with_name("elsewhere"))
    with caplog.at_level(logging.WARNING, logger="gallery_server"):
        check.run_pass()
    assert [status(servicer, name) for name in HEALTH_CHECKED] == [readiness.NOT_SERVING] * 4
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == [
        "data folder holds none of the stored media the database names: reporting NOT_SERVING until it "
        "does (is GALLERY_DATA_DIR the shared volume, mounted?)"]
    media.with_name("elsewhere").rename(media)
    check.run_pass()
    assert status(servicer) == readiness.SERVING


def test_the_folder_is_checked_only_now_and_then(
    watched, gallery: Gallery, principal: auth.Principal,
) -> None:
    check, servicer = watched
    store_five(gallery, principal)
    check.run_pass()  # checked
    media = gallery.settings.data_dir / "media"
    media.rename(media.with_name("elsewhere"))
    check.run_pass()  # not again within STORAGE_CHECK_SECONDS: the probe is the database's
    assert status(servicer) == readiness.SERVING
    media.with_name("elsewhere").rename(media)


def test_a_replica_that_cannot_reach_the_database_is_not_serving_until_it_can(watched, gallery: Gallery) -> None:
    check, servicer = watched
    check.run_pass()
    assert status(servicer) == readiness.SERVING
    reachable, gallery.db = gallery.db, Database(UNREACHABLE, pool_size=1)
    try:
        check.run_pass()
        assert not availability.up and not check.database_up  # the log's view and the gauge's
        assert [status(servicer, name) for name in HEALTH_CHECKED] == [readiness.NOT_SERVING] * 4
    finally:
        gallery.db.dispose()
        gallery.db = reachable
    check.run_pass()  # the probe finds it again: no request needed
    assert availability.up and check.database_up and status(servicer) == readiness.SERVING


def test_a_database_that_does_not_answer_is_not_waited_for(
    watched, gallery: Gallery, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A link that drops packets rather than connections: the probe gets no answer at all. Before,
    the probe waited as long as TCP would (minutes), SERVING all along, and the replica's stop
    waited for it. A real socket that takes the connection and never says a word."""
    monkeypatch.setattr(readiness, "PROBE_TIMEOUT_SECONDS", 0.5)
    check, servicer = watched
    check.run_pass()
    silent = socket.create_server(("127.0.0.1", 0))
    port = silent.getsockname()[1]
    reachable = gallery.db
    gallery.db = Database(f"postgresql+psycopg://postgres@127.0.0.1:{port}/gallery?connect_timeout=3", pool_size=1)
    try:
        started = time.monotonic()
        check.run_pass()
        assert time.monotonic() - started < 2
        # No statement failed: db.availability still says up; gallery_database_up says 0.
        assert status(servicer) == readiness.NOT_SERVING and not check.database_up
        check.stop(timeout=1)  # returns: the probe is not waited for
        assert check.probe is not None
        check.probe.join(10)  # ended by its connect timeout, before the next test
    finally:
        silent.close()
        gallery.db.dispose()
        gallery.db = reachable
    check.run_pass()
    assert status(servicer) == readiness.SERVING and check.database_up


def test_a_slow_look_at_the_data_folder_is_not_the_databases_silence(
    watched, gallery: Gallery, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The look at the data folder runs after the ping, on the probe's thread: one that hangs (a
    stuck mount) makes the replica NOT_SERVING, while gallery_database_up still says the
    database answered."""
    monkeypatch.setattr(readiness, "PROBE_TIMEOUT_SECONDS", 0.5)
    check, servicer = watched
    stuck = threading.Event()
    monkeypatch.setattr(gallery, "stored_media_found", lambda: stuck.wait(10))
    try:
        check.run_pass()
        assert status(servicer) == readiness.NOT_SERVING and check.database_up
    finally:
        stuck.set()
        assert check.probe is not None
        check.probe.join(10)
    check.run_pass()
    assert status(servicer) == readiness.SERVING


def test_a_replica_draining_stays_not_serving(watched) -> None:
    check, servicer = watched
    servicer.enter_graceful_shutdown()
    check.serving = False  # so that a pass would set SERVING
    check.run_pass()
    assert status(servicer) == readiness.NOT_SERVING
