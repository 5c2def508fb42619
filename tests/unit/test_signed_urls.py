"""Pre-signed upload URLs: HMAC tokens, single-use grants, and media/thumbnail meeting at one event."""

from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import string
import threading
import time
import types
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlmodel import select

from gallery_server import auth, signed_urls
from gallery_server.db import Database
from gallery_server.errors import (
    CommitOutcomeUnknown,
    DatabaseUnavailable,
    Exhausted,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    TooLarge,
)
from gallery_server.models import UploadGrant
from gallery_server.service import Gallery
from gallery_server.signed_urls import MEDIA, THUMBNAIL, SignedTarget, SignedUploads
from gallery_server.storage import Storage
from gallery_server.uploads import Uploader

from ..conftest import event_commit_fails, make_settings, stored_files

PNG = b"\x89PNG\r\n\x1a\n" + b"\x01" * 200
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x02" * 50


@pytest.fixture
def keyed(tmp_path) -> SignedUploads:  # type: ignore[no-untyped-def]
    """SignedUploads for token-only checks (sign/verify never touch the database or the disk)."""
    return SignedUploads(Gallery(make_settings(tmp_path), None, None))  # type: ignore[arg-type]


@pytest.fixture
def local(tmp_path) -> Iterator[SignedUploads]:  # type: ignore[no-untyped-def]
    """SignedUploads on SQLite only, for checks of the tokens themselves (the database is incidental)."""
    settings = make_settings(tmp_path)
    db = Database(settings.database_url, pool_size=2)
    db.create_tables()
    yield SignedUploads(Gallery(settings, db, Storage(tmp_path)))
    db.dispose()


def token_of(url: str) -> str:
    return url.rsplit("/", 1)[1]


def put(signed: SignedUploads, target: SignedTarget, data: bytes) -> str:
    """What PutSignedUpload does: refuse a used URL, receive, complete."""
    signed.require_unused(target)
    settings = signed.gallery.settings
    limit = settings.max_thumbnail_bytes if target.purpose == THUMBNAIL else None
    with signed.gallery.open_upload(target.device, max_media_bytes=limit) as upload:
        upload.write_media(data)
        return signed.complete(target, upload)


def targets(signed: SignedUploads, principal: auth.Principal, device: str = "cam1",
            filename: str = "photo.png") -> tuple[SignedTarget, SignedTarget]:
    urls = signed.create_urls(principal, device, filename, thumbnail=True)
    assert urls.thumbnail_url is not None
    return signed.verify(device, token_of(urls.media_url)), signed.verify(device, token_of(urls.thumbnail_url))


def denied(reason: str, func, *args) -> PermissionDenied:  # type: ignore[no-untyped-def]
    with pytest.raises(PermissionDenied) as info:
        func(*args)
    assert info.value.reason == reason
    return info.value


_B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def flip(text: str, index: int) -> str:
    """Change one base64url character in its most significant bit, which always carries data
    (the low bits of a last character may be padding that decoders ignore)."""
    replacement = _B64URL[_B64URL.index(text[index]) ^ 0b100000]
    return text[:index] + replacement + text[index + 1 :]


# -- create and verify ----------------------------------------------------------------------------


def test_create_urls_and_verify_roundtrip(signed: SignedUploads, principal: auth.Principal) -> None:
    before = int(time.time())
    urls = signed.create_urls(principal, "cam1", "photo.png", thumbnail=True)
    assert urls.event_id.startswith("evt_") and len(urls.event_id) == 26
    prefix = f"{signed.gallery.settings.public_url}/api/gallery/cam1/upload/"
    assert urls.media_url.startswith(prefix)
    assert urls.thumbnail_url is not None and urls.thumbnail_url.startswith(prefix)
    assert urls.media_url != urls.thumbnail_url
    ttl = signed.gallery.settings.upload_url_ttl
    assert before + ttl <= urls.expires_at.timestamp() <= time.time() + ttl + 1
    assert urls.expires_at.tzinfo is not None
    assert signed.verify("cam1", token_of(urls.media_url)) == SignedTarget("cam1", urls.event_id, MEDIA, "photo.png")
    assert signed.verify("cam1", token_of(urls.thumbnail_url)) == SignedTarget(
        "cam1", urls.event_id, THUMBNAIL, "photo.png"
    )


def test_a_url_names_the_token_that_asked_for_it(signed: SignedUploads) -> None:
    """Its PUTs take that token's part of the uploads in flight (uploads.UploadSlots); a URL of
    version 1, issued before URLs named it, is still taken until it expires, as no token's."""
    for devices in ({"cam1", "cam2"}, {"*"}):
        asker = auth.Principal("t", frozenset(devices), frozenset({auth.WRITE}), token_id="ab" * 16)
        urls = signed.create_urls(asker, "cam1", "a.png", thumbnail=True)
        assert urls.thumbnail_url is not None
        for url in (urls.media_url, urls.thumbnail_url):  # one event's: their PUTs counted together
            uploader = signed.verify("cam1", token_of(url)).uploader
            assert uploader == dataclasses.replace(Uploader.of(asker), url=("cam1", urls.event_id))
            assert uploader is not None and uploader.granted == (None if "*" in devices else 2)
            assert asker.token_id not in url  # a digest of it, not the server's own key
            assert Uploader.of(asker).key not in base64.urlsafe_b64decode(token_of(url).split(".")[0] + "==").decode()
        other = dataclasses.replace(asker, token_id="cd" * 16)
        assert signed.verify("cam1", token_of(signed.create_urls(other, "cam1", "a.png", thumbnail=False).media_url)
                             ).uploader != uploader
    old = signed._sign([1, "cam1", urls.event_id, MEDIA, int(time.time()) + 60, "a.png"])
    assert signed.verify("cam1", old) == SignedTarget("cam1", urls.event_id, MEDIA, "a.png")
    assert signed.verify("cam1", old).uploader is None


def test_create_urls_without_thumbnail(signed: SignedUploads, principal: auth.Principal) -> None:
    urls = signed.create_urls(principal, "cam1", "a.png", thumbnail=False)
    assert urls.thumbnail_url is None
    # A thumbnail token for this grant (forged with the key) finds no open thumbnail slot.
    forged = signed._sign([1, "cam1", urls.event_id, THUMBNAIL, int(time.time()) + 60, "a.png"])
    denied("URL_ALREADY_USED", signed.require_unused, signed.verify("cam1", forged))
    denied("URL_ALREADY_USED", put, signed, signed.verify("cam1", forged), JPEG)


def test_urls_not_issued_record_nothing_and_are_refused(signed: SignedUploads, principal: auth.Principal) -> None:
    """What a HEAD of upload-url answers: URLs like a GET's, for a grant that does not exist."""
    urls = signed.create_urls(principal, "cam1", "a.png", thumbnail=True, issue=False)
    with signed.gallery.db.session() as session:
        assert session.exec(select(UploadGrant)).all() == []
    for url in (urls.media_url, urls.thumbnail_url):
        assert url is not None
        denied("URL_SIGNATURE_INVALID", put, signed, signed.verify("cam1", token_of(url)), PNG)
    assert signed.gallery.list_events(principal, "cam1") == []


def test_each_grant_has_its_own_event_id(local: SignedUploads, principal: auth.Principal) -> None:
    ids = {local.create_urls(principal, "cam1", "a.png", thumbnail=False).event_id for _ in range(20)}
    assert len(ids) == 20


def test_create_urls_authorization_and_validation(local: SignedUploads) -> None:
    outsider = auth.Principal("o", frozenset({"cam2"}), frozenset({auth.READ, auth.WRITE}))
    reader = auth.Principal("r", frozenset({"*"}), frozenset({auth.READ}))
    with pytest.raises(PermissionDenied) as info:
        local.create_urls(outsider, "cam1", "a.png", thumbnail=False)
    assert info.value.reason == "DEVICE_NOT_ALLOWED"
    with pytest.raises(PermissionDenied) as info:
        local.create_urls(reader, "cam1", "a.png", thumbnail=False)
    assert info.value.reason == "SCOPE_MISSING"
    writer = auth.Principal("w", frozenset({"*"}), frozenset({auth.WRITE}))
    for device, filename, reason in [
        ("../x", "a.png", "INVALID_DEVICE_ID"),
        ("cam1", "", "NAME_REQUIRED"),
        ("cam1", "evil\u202egnp.exe", "NAME_INVALID"),
        ("cam1", "x" * 256, "NAME_TOO_LONG"),
    ]:
        with pytest.raises(InvalidArgument) as err:
            local.create_urls(writer, device, filename, thumbnail=False)
        assert err.value.reason == reason
    assert err.value.field == "filename"


def test_filename_is_normalised_and_bound(signed: SignedUploads, principal: auth.Principal) -> None:
    urls = signed.create_urls(principal, "cam1", "cafe\u0301 ü.png", thumbnail=False)
    target = signed.verify("cam1", token_of(urls.media_url))
    assert target.filename == "caf\u00e9 ü.png"
    put(signed, target, PNG)
    assert signed.gallery.get_event(principal, "cam1", urls.event_id).name == "caf\u00e9 ü.png"


# -- tampering ------------------------------------------------------------------------------------


def test_tampered_payload(local: SignedUploads, principal: auth.Principal) -> None:
    token = token_of(local.create_urls(principal, "cam1", "a.png", thumbnail=False).media_url)
    payload, signature = token.split(".")
    for index in range(0, len(payload), 3):
        denied("URL_SIGNATURE_INVALID", local.verify, "cam1", f"{flip(payload, index)}.{signature}")


def test_tampered_signature(local: SignedUploads, principal: auth.Principal) -> None:
    token = token_of(local.create_urls(principal, "cam1", "a.png", thumbnail=False).media_url)
    payload, signature = token.split(".")
    for index in range(len(signature)):
        denied("URL_SIGNATURE_INVALID", local.verify, "cam1", f"{payload}.{flip(signature, index)}")
    for bad in ("", signature[:-1], signature + "A", signature[:-4], "!" * len(signature)):
        denied("URL_SIGNATURE_INVALID", local.verify, "cam1", f"{payload}.{bad}")


def test_a_signed_payload_of_the_wrong_shape_is_invalid(local: SignedUploads) -> None:
    """Signed with the right key, but not as this server signs: refused, never a 500."""
    event_id = "evt_" + "A" * 22
    for payload in (
        [1, "cam1", event_id, MEDIA, str(int(time.time()) + 60), "a.png"],  # the expiry a string
        [1, "cam1", event_id, MEDIA, float(int(time.time()) + 60), "a.png"],
        [1, "cam1", event_id, MEDIA, True, "a.png"],
        [1, "cam1", 7, MEDIA, int(time.time()) + 60, "a.png"],
        [1, "cam1", event_id, MEDIA, int(time.time()) + 60, ["a.png"]],
        [1, "cam1", event_id, MEDIA, int(time.time()) + 60],  # a field short
    ):
        denied("URL_SIGNATURE_INVALID", local.verify, "cam1", local._sign(payload))


def test_only_the_canonical_spelling_of_a_token_verifies(local: SignedUploads, principal: auth.Principal) -> None:
    token = token_of(local.create_urls(principal, "cam1", "a.png", thumbnail=False).media_url)
    payload, signature = token.split(".")
    alphabet = string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_"
    # A 32-byte signature is 43 characters whose last has 2 spare bits: flipping the lowest one
    # spells the same bytes, which a lax decoder would accept as a second URL.
    spare = signature[:-1] + alphabet[alphabet.index(signature[-1]) ^ 1]
    assert base64.urlsafe_b64decode(spare + "=") == base64.urlsafe_b64decode(signature + "=")
    denied("URL_SIGNATURE_INVALID", local.verify, "cam1", f"{payload}.{spare}")
    assert local.verify("cam1", token).event_id  # the canonical one still does


def test_payload_swapped_between_urls(local: SignedUploads, principal: auth.Principal) -> None:
    urls = local.create_urls(principal, "cam1", "a.png", thumbnail=True)
    assert urls.thumbnail_url is not None
    media_payload, media_sig = token_of(urls.media_url).split(".")
    thumb_payload, thumb_sig = token_of(urls.thumbnail_url).split(".")
    denied("URL_SIGNATURE_INVALID", local.verify, "cam1", f"{thumb_payload}.{media_sig}")
    denied("URL_SIGNATURE_INVALID", local.verify, "cam1", f"{media_payload}.{thumb_sig}")


@pytest.mark.parametrize("token", ["", ".", "abc", "abc.", ".abc", "a.b.c", "é.é", "\x00.\x00", "%%%.###"])
def test_garbage_tokens(keyed: SignedUploads, token: str) -> None:
    denied("URL_SIGNATURE_INVALID", keyed.verify, "cam1", token)


def test_token_from_another_secret(local: SignedUploads, principal: auth.Principal) -> None:
    gallery = local.gallery
    other_settings = dataclasses.replace(gallery.settings, jwt_secret="another-secret-" + "z" * 40)
    other = SignedUploads(Gallery(other_settings, gallery.db, gallery.storage))
    token = token_of(other.create_urls(principal, "cam1", "a.png", thumbnail=False).media_url)
    denied("URL_SIGNATURE_INVALID", local.verify, "cam1", token)


def test_bearer_jwt_is_not_an_upload_token(keyed: SignedUploads, mint) -> None:  # type: ignore[no-untyped-def]
    denied("URL_SIGNATURE_INVALID", keyed.verify, "cam1", mint())


KEY = "ab" * 12  # a key as URLs carry one (hex): each payload below is refused for its own fault


@pytest.mark.parametrize(
    "payload",
    [
        [3, "cam1", "evt_" + "a" * 22, MEDIA, 2**40, "a.png", [KEY, 1]],  # unknown version
        [2, "cam1", "evt_" + "a" * 22, MEDIA, 2**40, "a.png"],  # its token missing
        [2, "cam1", "evt_" + "a" * 22, MEDIA, 2**40, "a.png", [KEY, 0]],
        [2, "cam1", "evt_" + "a" * 22, MEDIA, 2**40, "a.png", [KEY, True]],
        [2, "cam1", "evt_" + "a" * 22, MEDIA, 2**40, "a.png", [KEY, "1"]],
        [2, "cam1", "evt_" + "a" * 22, MEDIA, 2**40, "a.png", [7, 1]],  # the key not a string
        [2, "cam1", "evt_" + "a" * 22, MEDIA, 2**40, "a.png", ["not hex", 1]],
        [2, "cam1", "evt_" + "a" * 22, MEDIA, 2**40, "a.png", [KEY, 1, 2]],
        [2, "cam1", "evt_" + "a" * 22, MEDIA, 2**40, "a.png", [KEY, 1], "extra"],
        [1, "cam1", "evt_" + "a" * 22, "other", 2**40, "a.png"],  # unknown purpose
        [1, "cam1", "evt_" + "a" * 22, MEDIA, 2**40],  # too short
        [1, "cam1", "evt_" + "a" * 22, MEDIA, 2**40, "a.png", "extra"],
        {"v": 1},
        "just a string",
    ],
)
def test_signed_but_malformed_payloads(keyed: SignedUploads, payload: object) -> None:
    assert keyed.verify("cam1", keyed._sign([2, "cam1", "evt_" + "a" * 22, MEDIA, 2**40, "a.png", [KEY, 1]]))
    denied("URL_SIGNATURE_INVALID", keyed.verify, "cam1", keyed._sign(payload))  # type: ignore[arg-type]


def test_other_device(local: SignedUploads, principal: auth.Principal) -> None:
    token = token_of(local.create_urls(principal, "cam1", "a.png", thumbnail=False).media_url)
    for device in ("cam2", "CAM1", "cam1 ", "cam10"):
        denied("URL_DEVICE_MISMATCH", local.verify, device, token)


def test_expired(local: SignedUploads, principal: auth.Principal) -> None:
    gallery = local.gallery
    expired = SignedUploads(Gallery(dataclasses.replace(gallery.settings, upload_url_ttl=-1), gallery.db,
                                    gallery.storage))
    urls = expired.create_urls(principal, "cam1", "a.png", thumbnail=True)
    assert urls.expires_at < datetime.datetime.now(datetime.UTC)
    assert urls.thumbnail_url is not None
    denied("URL_EXPIRED", expired.verify, "cam1", token_of(urls.media_url))
    denied("URL_EXPIRED", expired.verify, "cam1", token_of(urls.thumbnail_url))
    # Verified by the normal instance (same secret): still expired.
    denied("URL_EXPIRED", SignedUploads(gallery).verify, "cam1", token_of(urls.media_url))


def test_expiry_is_checked_at_verify_time(local: SignedUploads, principal: auth.Principal,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    urls = local.create_urls(principal, "cam1", "a.png", thumbnail=False)
    token = token_of(urls.media_url)
    assert local.verify("cam1", token).event_id == urls.event_id
    later = urls.expires_at.timestamp() + 1
    monkeypatch.setattr(signed_urls, "time", types.SimpleNamespace(time=lambda: later))
    denied("URL_EXPIRED", local.verify, "cam1", token)


# -- single use -----------------------------------------------------------------------------------


def test_a_used_url_is_refused(signed: SignedUploads, principal: auth.Principal) -> None:
    media, thumb = targets(signed, principal)
    signed.require_unused(media)  # nothing is taken by asking
    assert put(signed, media, PNG) == media.event_id
    error = denied("URL_ALREADY_USED", signed.require_unused, media)
    assert error.metadata == {"event_id": media.event_id}
    signed.require_unused(thumb)  # the thumbnail URL is independent
    assert put(signed, thumb, JPEG) == media.event_id
    for target in (media, thumb):
        denied("URL_ALREADY_USED", put, signed, target, b"again")
    assert signed.gallery.storage.media_path("cam1", media.event_id).read_bytes() == PNG


def test_puts_completing_at_once_store_exactly_once(signed: SignedUploads, principal: auth.Principal) -> None:
    """The grant's row lock orders completions: one stores its bytes, the other is refused and
    leaves nothing behind."""
    for round_ in range(10):
        media, _ = targets(signed, principal)
        barrier = threading.Barrier(2)
        outcomes: dict[bytes, str] = {}

        def complete(data: bytes, barrier: threading.Barrier = barrier, media: SignedTarget = media,
                     outcomes: dict[bytes, str] = outcomes) -> None:
            with signed.gallery.open_upload("cam1") as upload:
                upload.write_media(data)
                barrier.wait(timeout=10)
                try:
                    outcomes[data] = signed.complete(media, upload)
                except PermissionDenied as exc:
                    outcomes[data] = exc.reason

        threads = [threading.Thread(target=complete, args=(data,)) for data in (b"first", b"second")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert sorted(outcomes.values()) == sorted([media.event_id, "URL_ALREADY_USED"]), f"round {round_}"
        [winner] = [data for data, outcome in outcomes.items() if outcome == media.event_id]
        assert signed.gallery.storage.media_path("cam1", media.event_id).read_bytes() == winner
        assert list(signed.gallery.storage.staging_root.rglob("*.*")) == []


def test_a_put_in_progress_does_not_hold_its_url(signed: SignedUploads, principal: auth.Principal) -> None:
    """Nothing is taken while a PUT streams, so a PUT cut short (a dropped link, a server killed
    mid-PUT) leaves the URL free for its retry; of two PUTs, the first to complete stores."""
    media, _ = targets(signed, principal)
    with signed.gallery.open_upload("cam1") as slow:
        slow.write_media(b"the slow one")
        assert put(signed, media, PNG) == media.event_id  # a retry while the first still streams
        denied("URL_ALREADY_USED", signed.complete, media, slow)
    assert signed.gallery.storage.media_path("cam1", media.event_id).read_bytes() == PNG


def test_a_put_failing_at_its_end_for_an_outage_leaves_the_url_for_a_retry(
    closed_database, principal: auth.Principal, tmp_path,  # type: ignore[no-untyped-def]
) -> None:
    """PostgreSQL refuses connections as the PUT completes: 503, then the same URL stores once
    the database is back (an older server left the URL taken for good: URL_ALREADY_USED)."""
    db, closed = closed_database
    gallery = Gallery(make_settings(tmp_path, db.engine.url.render_as_string(hide_password=False)), db,
                      Storage(tmp_path))
    signed = SignedUploads(gallery)
    media, _ = targets(signed, principal)
    signed.require_unused(media)
    with gallery.open_upload("cam1") as upload:
        upload.write_media(PNG)
        with closed, pytest.raises(DatabaseUnavailable):
            signed.complete(media, upload)
    assert put(signed, media, PNG) == media.event_id
    assert gallery.storage.media_path("cam1", media.event_id).read_bytes() == PNG


def test_a_url_an_older_server_left_uploading_can_complete(signed: SignedUploads, principal: auth.Principal) -> None:
    """`uploading`: an older server's PUT in progress, for good if that server died mid-PUT."""
    media, _ = targets(signed, principal)
    with signed.gallery.db.session() as session:
        session.exec(sa.update(UploadGrant).where(UploadGrant.event_id == media.event_id)  # type: ignore[call-overload, arg-type]
                     .values(media_state="uploading"))
        session.commit()
    assert put(signed, media, PNG) == media.event_id
    denied("URL_ALREADY_USED", signed.require_unused, media)


def test_a_failed_put_leaves_the_url_for_a_retry(gallery: Gallery, principal: auth.Principal) -> None:
    small = SignedUploads(Gallery(dataclasses.replace(gallery.settings, max_thumbnail_bytes=10), gallery.db,
                                  gallery.storage))
    media, thumb = targets(small, principal)
    with pytest.raises(TooLarge):
        put(small, thumb, b"t" * 11)
    assert stored_files(gallery.settings.data_dir) == []
    assert put(small, thumb, b"t" * 10) == thumb.event_id
    assert put(small, media, PNG) == media.event_id
    assert gallery.get_event(principal, "cam1", media.event_id).has_thumbnail is True


# -- media and thumbnail meet at one event --------------------------------------------------------


def test_media_then_thumbnail(signed: SignedUploads, principal: auth.Principal) -> None:
    gallery = signed.gallery
    media, thumb = targets(signed, principal, filename="holiday.png")
    assert put(signed, media, PNG) == media.event_id
    event = gallery.get_event(principal, "cam1", media.event_id)
    assert event.has_thumbnail is False
    assert event.name == "holiday.png"
    assert event.sha256 == hashlib.sha256(PNG).hexdigest()
    assert event.media_type == "image"
    assert put(signed, thumb, JPEG) == media.event_id
    assert gallery.get_event(principal, "cam1", media.event_id).has_thumbnail is True
    assert gallery.storage.media_path("cam1", media.event_id).read_bytes() == PNG
    assert gallery.storage.thumbnail_path("cam1", media.event_id).read_bytes() == JPEG
    assert list(gallery.storage.staging_root.iterdir()) == []


def test_an_empty_thumbnail_put_is_refused_and_leaves_the_url_unused(
    signed: SignedUploads, principal: auth.Principal
) -> None:
    gallery = signed.gallery
    media, thumb = targets(signed, principal)
    assert put(signed, media, PNG) == media.event_id
    with pytest.raises(InvalidArgument) as empty:
        put(signed, thumb, b"")
    assert empty.value.reason == "THUMBNAIL_MISSING"
    assert gallery.get_event(principal, "cam1", media.event_id).has_thumbnail is False
    assert not gallery.storage.thumbnail_path("cam1", media.event_id).exists()
    signed.require_unused(thumb)
    assert put(signed, thumb, JPEG) == media.event_id
    assert gallery.storage.thumbnail_path("cam1", media.event_id).read_bytes() == JPEG


def test_a_thumbnail_whose_commit_outcome_is_unknown_stays(signed: SignedUploads, principal: auth.Principal) -> None:
    """The event may now say it has this thumbnail: the file stays (Database.commit)."""
    gallery = signed.gallery
    if gallery.db.engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL's backend ends the connection during the COMMIT")
    media, thumb = targets(signed, principal)
    assert put(signed, media, PNG) == media.event_id
    with event_commit_fails(gallery.db), pytest.raises(CommitOutcomeUnknown):
        put(signed, thumb, JPEG)
    assert gallery.storage.thumbnail_path("cam1", media.event_id).read_bytes() == JPEG
    assert gallery.get_event(principal, "cam1", media.event_id).has_thumbnail is False  # this time not written


@pytest.mark.parametrize("purpose", [MEDIA, THUMBNAIL])
def test_a_put_whose_commit_is_refused_leaves_the_url_for_its_retry(
    signed: SignedUploads, principal: auth.Principal, purpose: str,
) -> None:
    """The COMMIT is refused (a deadlock) after the PUT's file moved into place: nothing was
    written, the URL is unused, and its retry stores. Media is taken back (it replaced nothing); a
    thumbnail stays (it replaced what was there, and is this event's as its device sent it)."""
    gallery = signed.gallery
    if gallery.db.engine.dialect.name != "postgresql":
        pytest.skip("a COMMIT refused by PostgreSQL (a deferred trigger)")
    media, thumb = targets(signed, principal)
    if purpose == THUMBNAIL:
        assert put(signed, media, PNG) == media.event_id
    target = media if purpose == MEDIA else thumb
    path = gallery.storage.media_path("cam1", media.event_id) if purpose == MEDIA else \
        gallery.storage.thumbnail_path("cam1", media.event_id)
    with event_commit_fails(gallery.db, sqlstate="40P01"), pytest.raises(DatabaseUnavailable):
        put(signed, target, JPEG)
    assert path.exists() is (purpose == THUMBNAIL)
    signed.require_unused(target)
    assert put(signed, target, JPEG) == media.event_id
    assert path.read_bytes() == JPEG
    assert list(gallery.storage.staging_root.rglob("*.*")) == []


def test_thumbnail_then_media(signed: SignedUploads, principal: auth.Principal) -> None:
    gallery = signed.gallery
    media, thumb = targets(signed, principal)
    assert put(signed, thumb, JPEG) == thumb.event_id
    assert gallery.list_events(principal, "cam1") == []  # no event before its media
    assert put(signed, media, PNG) == media.event_id
    event = gallery.get_event(principal, "cam1", media.event_id)
    assert event.has_thumbnail is True
    assert event.size == len(PNG)
    assert gallery.storage.thumbnail_path("cam1", media.event_id).read_bytes() == JPEG
    assert list(gallery.storage.staging_root.iterdir()) == []


def test_thumbnail_after_the_event_was_deleted(signed: SignedUploads, principal: auth.Principal) -> None:
    gallery = signed.gallery
    media, thumb = targets(signed, principal)
    put(signed, media, PNG)
    gallery.delete_event(principal, "cam1", media.event_id)
    with pytest.raises(NotFound) as info:
        put(signed, thumb, JPEG)
    assert info.value.reason == "EVENT_NOT_FOUND"
    assert stored_files(gallery.settings.data_dir) == []  # no orphaned thumbnail


def test_media_only_grant(signed: SignedUploads, principal: auth.Principal) -> None:
    urls = signed.create_urls(principal, "cam1", "a.png", thumbnail=False)
    put(signed, signed.verify("cam1", token_of(urls.media_url)), PNG)
    assert signed.gallery.get_event(principal, "cam1", urls.event_id).has_thumbnail is False


def test_concurrent_media_and_thumbnail(signed: SignedUploads, principal: auth.Principal) -> None:
    gallery = signed.gallery
    for round_ in range(20):
        media, thumb = targets(signed, principal)
        barrier = threading.Barrier(2)
        errors: list[BaseException] = []

        def run(target: SignedTarget, data: bytes, barrier: threading.Barrier = barrier,
                errors: list[BaseException] = errors) -> None:
            try:
                barrier.wait(timeout=10)
                put(signed, target, data)
            except BaseException as exc:  # noqa: BLE001 (reported below)
                errors.append(exc)

        threads = [
            threading.Thread(target=run, args=(media, PNG)),
            threading.Thread(target=run, args=(thumb, JPEG)),
        ]
        if round_ % 2:
            threads.reverse()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert errors == [], f"round {round_}: {errors!r}"
        event = gallery.get_event(principal, "cam1", media.event_id)
        assert event.has_thumbnail is True, f"round {round_}"
        assert gallery.storage.thumbnail_path("cam1", media.event_id).read_bytes() == JPEG
    assert list(gallery.storage.staging_root.iterdir()) == []


def test_expired_unused_urls_no_longer_count(signed: SignedUploads, principal: auth.Principal) -> None:
    signed.gallery.settings = dataclasses.replace(signed.gallery.settings, max_upload_urls_per_device=1)
    signed.create_urls(principal, "cam1", "a.png", thumbnail=False)
    with pytest.raises(Exhausted):
        signed.create_urls(principal, "cam1", "b.png", thumbnail=False)
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=1)
    with signed.gallery.db.session() as session:
        session.execute(sa.update(UploadGrant).values(expires_at=past))
        session.commit()
    signed.create_urls(principal, "cam1", "b.png", thumbnail=False)


def test_a_device_keeps_a_bounded_number_of_unused_urls(signed: SignedUploads, principal: auth.Principal) -> None:
    """Each URL is a row kept a day past its expiry if never used: one token must not pile them up."""
    signed.gallery.settings = dataclasses.replace(signed.gallery.settings, max_upload_urls_per_device=2)
    first, _ = targets(signed, principal)
    targets(signed, principal)
    with pytest.raises(Exhausted) as full:
        signed.create_urls(principal, "cam1", "c.png", thumbnail=False)
    assert full.value.reason == "TOO_MANY_UPLOAD_URLS"
    signed.create_urls(principal, "cam2", "c.png", thumbnail=False)  # another device's own count
    put(signed, first, PNG)  # a used URL no longer counts
    signed.create_urls(principal, "cam1", "c.png", thumbnail=False)
    with signed.gallery.db.session() as session:
        assert len(session.exec(select(UploadGrant).where(UploadGrant.device == "cam1")).all()) == 3
