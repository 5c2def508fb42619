"""Resumable pre-signed PUTs in the domain (both databases): Content-Range parsing, the status, the
URL's session ending with the URL, and the conflicts that are 409 over REST."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import os

import pytest
import sqlalchemy as sa
from sqlmodel import select

from gallery_server import auth, resumable
from gallery_server.downloads import ContentRange, parse_content_range
from gallery_server.errors import Conflict, InvalidArgument, PermissionDenied
from gallery_server.models import Event
from gallery_server.service import Gallery
from gallery_server.signed_urls import SESSION_PREFIX, SignedUploads

from ..conftest import failing_event_commit, random_bytes, stored_files


def new_url(signed: SignedUploads, principal: auth.Principal) -> tuple[str, str]:
    urls = signed.create_urls(principal, "cam1", "clip.mp4", thumbnail=False)
    return urls.media_url.rsplit("/", 1)[1], urls.event_id


def put_range(signed: SignedUploads, token: str, data: bytes, content_range: str) -> str:
    """What PutSignedUpload does with a Content-Range: returns the event id, "" while incomplete."""
    target = signed.verify("cam1", token)
    put = signed.open_range(target, parse_content_range(content_range), len(data))
    try:
        if put.done:
            return put.done
        put.write_all([data])
        state = put.finish()
    finally:
        put.close()
    return state.event_id if state.complete else ""


def test_parse_content_range() -> None:
    assert parse_content_range("bytes 0-9/10") == ContentRange(0, 9, 10)
    assert parse_content_range("bytes */10") == ContentRange(None, None, 10)
    assert parse_content_range("bytes 5-5/6").length == 1
    for bad in ("bytes 0-9/*", "bytes 0-10/10", "bytes 3-2/10", "bytes=0-9/10", "0-9/10", "bytes -1-2/3", ""):
        with pytest.raises(InvalidArgument) as caught:
            parse_content_range(bad)
        assert caught.value.reason == "INVALID_CONTENT_RANGE"


def test_a_content_range_takes_numbers_of_up_to_19_digits() -> None:
    nineteen = "9" * 19
    last = int(nineteen[:-1])
    assert parse_content_range(f"bytes 0-{nineteen[:-1]}/{nineteen}") == ContentRange(0, last, int(nineteen))
    assert parse_content_range(f"bytes {10**18}-{10**18}/{nineteen}") == ContentRange(10**18, 10**18, int(nineteen))
    for bad in (f"bytes 0-0/1{nineteen}", f"bytes */1{nineteen}", f"bytes 0-{nineteen}0/1{nineteen}0"):
        with pytest.raises(InvalidArgument) as caught:
            parse_content_range(bad)
        assert caught.value.reason == "INVALID_CONTENT_RANGE"


def test_a_bad_content_range_names_its_field_and_its_first_100_characters() -> None:
    header = "bytes 0-9/" + "x" * 200
    with pytest.raises(InvalidArgument) as caught:
        parse_content_range(header)
    assert caught.value.field == "content_range"
    assert caught.value.metadata == {"content_range": header[:100]}


def test_chunks_status_and_one_event(signed: SignedUploads, principal: auth.Principal) -> None:
    token, event_id = new_url(signed, principal)
    data = b"0123456789" * 100
    before = signed.status("cam1", token)
    assert (before.event_id, before.committed_size, before.size, before.complete) == (event_id, 0, 0, False)
    assert put_range(signed, token, data[:400], "bytes 0-399/1000") == ""
    assert (signed.status("cam1", token).committed_size, signed.status("cam1", token).size) == (400, 1000)
    with pytest.raises(Conflict) as caught:  # 409 over REST
        put_range(signed, token, data[:400], "bytes 0-399/1000")
    assert caught.value.reason == "WRONG_OFFSET" and caught.value.metadata["committed_size"] == "400"
    with pytest.raises(InvalidArgument) as caught:
        put_range(signed, token, data[400:500], "bytes 400-499/2000")
    assert caught.value.reason == "INVALID_CONTENT_RANGE"
    assert put_range(signed, token, data[400:], "bytes 400-999/1000") == event_id
    after = signed.status("cam1", token)
    assert (after.committed_size, after.size, after.complete) == (1000, 1000, True)
    # Retries of the final chunk, or a query, answer the event; nothing more is stored.
    assert put_range(signed, token, data[400:], "bytes 400-999/1000") == event_id
    assert put_range(signed, token, b"", "bytes */1000") == event_id
    with signed.gallery.db.session() as session:
        [event] = session.exec(select(Event)).all()
    assert (event.id, event.size, event.sha256) == (event_id, 1000, hashlib.sha256(data).hexdigest())
    assert [p.name for p in stored_files(signed.gallery.settings.data_dir)] == [event_id]


def test_empty_file_and_query_finish(signed: SignedUploads, principal: auth.Principal) -> None:
    token, event_id = new_url(signed, principal)
    assert put_range(signed, token, b"", "bytes */0") == event_id
    assert signed.status("cam1", token).complete


def test_busy_url_is_conflict(signed: SignedUploads, principal: auth.Principal,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resumable, "LOCK_WAIT_SECONDS", 0.2)
    token, _ = new_url(signed, principal)
    target = signed.verify("cam1", token)
    first = signed.open_range(target, parse_content_range("bytes 0-4/10"), 5)
    try:
        with pytest.raises(Conflict) as caught:  # another chunk PUT holds the session
            signed.open_range(target, parse_content_range("bytes 0-4/10"), 5)
        assert caught.value.reason == "UPLOAD_BUSY"
    finally:
        first.close()
    thumbnail = signed.create_urls(principal, "cam1", "a.jpg", thumbnail=True).thumbnail_url
    assert thumbnail is not None
    with pytest.raises(InvalidArgument) as caught:
        signed.open_range(signed.verify("cam1", thumbnail.rsplit("/", 1)[1]),
                          parse_content_range("bytes 0-4/10"), 5)
    assert caught.value.reason == "RESUMABLE_MEDIA_ONLY"


def test_session_ends_with_the_url(gallery: Gallery, principal: auth.Principal) -> None:
    short = SignedUploads(_with_ttl(gallery, 60))
    token, event_id = new_url(short, principal)
    assert put_range(short, token, b"abc", "bytes 0-2/10") == ""
    assert stored_files(gallery.settings.data_dir)  # the session's bytes
    # A session opened by a PUT whose body never came (nothing committed) ends with its URL too.
    idle_token, _ = new_url(short, principal)
    short.open_range(short.verify("cam1", idle_token), parse_content_range("bytes 0-2/10"), 3).close()
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=120)
    # Its session lives no longer than the URL (not GALLERY_UPLOAD_SESSION_TTL): swept with it.
    assert resumable.ResumableUploads(gallery).sweep_once(now=later) == 2
    assert stored_files(gallery.settings.data_dir) == []
    # An expired URL takes no bytes, but its status stays readable.
    expired = SignedUploads(_with_ttl(gallery, -1))
    token, event_id = new_url(expired, principal)
    with pytest.raises(PermissionDenied) as caught:
        expired.verify("cam1", token)
    assert caught.value.reason == "URL_EXPIRED"
    state = expired.status("cam1", token)
    assert (state.event_id, state.complete, state.committed_size) == (event_id, False, 0)


def _with_ttl(gallery: Gallery, ttl: int) -> Gallery:
    return Gallery(dataclasses.replace(gallery.settings, upload_url_ttl=ttl), gallery.db, gallery.storage)


# -- completion that fails keeps the session's bytes -------------------------------------------


def session_bytes(signed: SignedUploads, event_id: str) -> bytes:
    return signed.gallery.storage.session_path("cam1", SESSION_PREFIX + event_id).read_bytes()


def test_final_chunk_failing_at_commit_keeps_its_bytes(
    signed: SignedUploads, principal: auth.Principal
) -> None:
    token, event_id = new_url(signed, principal)
    data = random_bytes(5000)
    assert put_range(signed, token, data[:3000], "bytes 0-2999/5000") == ""
    with failing_event_commit(Exception("deferred constraint violated")), pytest.raises(sa.exc.OperationalError):
        put_range(signed, token, data[3000:], "bytes 3000-4999/5000")
    # Nothing stored, everything committed is still the session's.
    assert not signed.gallery.storage.media_path("cam1", event_id).exists()
    assert session_bytes(signed, event_id) == data
    state = signed.status("cam1", token)
    assert (state.committed_size, state.complete) == (5000, False)
    # A query completes it (all bytes are there), with the right bytes.
    assert put_range(signed, token, b"", "bytes */5000") == event_id
    assert signed.gallery.storage.media_path("cam1", event_id).read_bytes() == data
    assert [p.name for p in stored_files(signed.gallery.settings.data_dir)] == [event_id]


def test_a_chunk_whose_session_a_whole_put_drops_meanwhile_is_answered_with_the_event(
    signed: SignedUploads, principal: auth.Principal, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The chunk PUT found the URL unused and its session open; before it took the session's
    writer, a whole PUT completed the URL and dropped the session: 200 with the URL's event, not
    404 UPLOAD_NOT_FOUND."""
    token, event_id = new_url(signed, principal)
    target = signed.verify("cam1", token)
    assert put_range(signed, token, b"a" * 1000, "bytes 0-999/4000") == ""
    real_writer = signed.uploads.writer

    def writer_after_a_whole_put(*args, **kwargs):  # type: ignore[no-untyped-def]
        with signed.gallery.open_upload("cam1") as whole:
            whole.write_media(b"single shot")
            assert signed.complete(target, whole) == event_id
        return real_writer(*args, **kwargs)

    monkeypatch.setattr(signed.uploads, "writer", writer_after_a_whole_put)
    assert put_range(signed, token, b"b" * 3000, "bytes 1000-3999/4000") == event_id
    assert signed.gallery.storage.media_path("cam1", event_id).read_bytes() == b"single shot"


def test_single_shot_put_during_the_last_chunk(
    signed: SignedUploads, principal: auth.Principal
) -> None:
    token, event_id = new_url(signed, principal)
    target = signed.verify("cam1", token)
    data = random_bytes(4000)
    assert put_range(signed, token, data[:1000], "bytes 0-999/4000") == ""
    # A whole PUT streams while the last chunk completes the file: the chunks store the URL's
    # event, and the whole PUT is refused at its end, storing nothing.
    with signed.gallery.open_upload("cam1") as whole:
        whole.write_media(b"single shot")
        assert put_range(signed, token, data[1000:], "bytes 1000-3999/4000") == event_id
        with pytest.raises(PermissionDenied) as refused:
            signed.complete(target, whole)
        assert refused.value.reason == "URL_ALREADY_USED"
    assert signed.gallery.storage.media_path("cam1", event_id).read_bytes() == data

    # A whole PUT completes the URL after some chunks: their session, which can never be stored
    # now, goes with it.
    token, event_id = new_url(signed, principal)
    target = signed.verify("cam1", token)
    assert put_range(signed, token, data[:1000], "bytes 0-999/4000") == ""
    with signed.gallery.open_upload("cam1") as whole:
        whole.write_media(b"single shot")
        assert signed.complete(target, whole) == event_id
    assert not signed.gallery.storage.session_path("cam1", SESSION_PREFIX + event_id).exists()
    assert signed.uploads.peek("cam1", SESSION_PREFIX + event_id) is None

    # When the single-shot PUT completes the URL first, the last chunk is answered with its event.
    token, event_id = new_url(signed, principal)
    target = signed.verify("cam1", token)
    last = signed.open_range(target, parse_content_range("bytes 0-3999/4000"), 4000)
    try:
        last.write_all([data])
        signed.require_unused(target)
        with signed.gallery.open_upload("cam1") as upload:
            upload.write_media(b"single shot")
            assert signed.complete(target, upload) == event_id
        state = last.finish()
    finally:
        last.close()
    assert (state.event_id, state.complete, state.committed_size) == (event_id, True, 11)
    assert signed.gallery.storage.media_path("cam1", event_id).read_bytes() == b"single shot"
    # The session's bytes can never be stored under the URL now: they are gone.
    assert not signed.gallery.storage.session_path("cam1", SESSION_PREFIX + event_id).exists()
    assert signed.uploads.peek("cam1", SESSION_PREFIX + event_id) is None


def test_completion_after_a_crash_between_link_and_commit(
    signed: SignedUploads, principal: auth.Principal
) -> None:
    """A crash after the file reached media/ and before the row committed leaves a file with no
    row at the URL's event id: the URL's completion replaces it instead of failing forever."""
    storage = signed.gallery.storage
    for leftover in ("link", "other"):
        token, event_id = new_url(signed, principal)
        data = random_bytes(3000)
        assert put_range(signed, token, data[:1000], "bytes 0-999/3000") == ""
        target = signed.verify("cam1", token)
        last = signed.open_range(target, parse_content_range("bytes 1000-2999/3000"), 2000)
        try:
            last.write_all([data[1000:]])
            last._writer.commit()  # type: ignore[union-attr]  # the bytes are durable, then:
        finally:
            last.close()
        media = storage.media_path("cam1", event_id)
        media.parent.mkdir(parents=True, exist_ok=True)
        if leftover == "link":  # the session file linked into place, the crash before commit
            os.link(storage.session_path("cam1", SESSION_PREFIX + event_id), media)
        else:  # any other bytes at that name with no row (a single-shot PUT's, say)
            media.write_bytes(b"partial leftovers")
        assert put_range(signed, token, b"", "bytes */3000") == event_id
        assert media.read_bytes() == data
        assert not storage.session_path("cam1", SESSION_PREFIX + event_id).exists()


def test_status_is_read_only_and_a_query_opens_no_session(
    signed: SignedUploads, principal: auth.Principal
) -> None:
    token, event_id = new_url(signed, principal)
    path = signed.gallery.storage.session_path("cam1", SESSION_PREFIX + event_id)
    # A query of a fresh URL: 308 with nothing committed, and no session appears.
    assert put_range(signed, token, b"", "bytes */100") == ""
    assert signed.uploads.peek("cam1", SESSION_PREFIX + event_id) is None
    assert not path.exists()
    assert put_range(signed, token, b"x" * 10, "bytes 0-9/100") == ""
    # Unacknowledged bytes past the committed size are not counted, and not truncated by status.
    with path.open("ab") as file:
        file.write(b"y" * 5)
    state = signed.status("cam1", token)
    assert (state.committed_size, state.size) == (10, 100)
    assert path.stat().st_size == 15
    # A file removed (by the sweeper, say) is not recreated by a status read.
    path.unlink()
    assert signed.status("cam1", token).committed_size == 0
    assert not path.exists()
