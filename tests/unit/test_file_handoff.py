"""The Check Envoy asks before a REST download (rpc/file_handoff.py), called in process.

A handoff rewrites the path to the stored file and names the response headers; every other answer
is "go on unchanged" (no header, no refusal), so that the server's own path answers the request.
tests/e2e/test_file_handoff.py runs the same through the real Envoy.
"""

from __future__ import annotations

import hashlib

import pytest
from envoy.service.auth.v3 import external_auth_pb2

from gallery_server import auth
from gallery_server.rpc.file_handoff import FILES_PREFIX, HANDOFF_THUMBNAIL_BYTES, FileHandoff
from gallery_server.service import Gallery

from ..conftest import JWT_SECRET
from .test_service import PDF, PNG, store


def check(handoff: FileHandoff, path: str, method: str = "GET", **headers: str) -> external_auth_pb2.CheckResponse:
    request = external_auth_pb2.CheckRequest()
    request.attributes.request.http.method = method
    request.attributes.request.http.path = path
    request.attributes.request.http.headers.update(headers)
    response = handoff.Check(request, None)
    assert response.status.code == 0  # never a refusal
    assert response.WhichOneof("http_response") == "ok_response"
    return response


def handed_off(response: external_auth_pb2.CheckResponse) -> dict[str, str] | None:
    """A handoff's request changes (`:path`, `range`, `-range` for a removed one) and response
    headers; None for "go on unchanged"."""
    ok = response.ok_response
    if not ok.headers:
        assert not ok.response_headers_to_add and not ok.headers_to_remove
        return None
    changes = {h.header.key: h.header.value for h in ok.headers}
    assert set(changes) <= {":path", "range"}
    changes |= {f"-{name}": "" for name in ok.headers_to_remove}
    return changes | {h.header.key: h.header.value for h in ok.response_headers_to_add}


def bearer(devices: list[str] | None = None, scope: str = "gallery:read") -> str:
    return "Bearer " + auth.mint(JWT_SECRET, subject="t", devices=devices or ["cam1"], scope=scope)


@pytest.fixture
def handoff(gallery: Gallery) -> FileHandoff:
    return FileHandoff(gallery, auth.Verifier.from_settings(gallery.settings))


def test_a_whole_file_is_handed_off(gallery, principal, handoff):
    event = store(gallery, principal, data=PDF, name="report ü.pdf")
    got = handed_off(check(handoff, f"/api/gallery/cam1/events/{event.id}/content?x=1", authorization=bearer()))
    sha256 = hashlib.sha256(PDF).hexdigest()
    assert got == {
        ":path": f"{FILES_PREFIX}cam1/{event.id}", "-range": "",
        "etag": f'"{sha256}"', "accept-ranges": "bytes", "x-content-length": str(len(PDF)),
        "x-content-sha256": sha256, "content-type": "application/pdf",
        "content-disposition": "attachment; filename=\"report _.pdf\"; filename*=UTF-8''report%20%C3%BC.pdf",
        "x-gallery-handoff": "1",  # Envoy's Lua filter removes it (and the rest from an error)
        "x-content-type-options": "nosniff", "content-security-policy": "sandbox; default-src 'none'",
    }
    # The rewritten path names the stored file under the media folder Envoy maps it to.
    assert (gallery.storage.media_root / got[":path"].removeprefix(FILES_PREFIX)).read_bytes() == PDF


def test_a_thumbnail_is_handed_off_as_its_streaming_path_describes_it(gallery, principal, handoff):
    """Its type detected from its bytes, its ETag their SHA-256, no Content-Disposition, as
    GetEventThumbnail answers (a gallery's page asks for dozens at once)."""
    event = store(gallery, principal, data=PDF, name="report.pdf", thumbnail=PNG)
    got = handed_off(check(handoff, f"/api/gallery/cam1/events/{event.id}/thumbnail", authorization=bearer()))
    sha256 = hashlib.sha256(PNG).hexdigest()
    assert got == {
        ":path": f"{FILES_PREFIX}cam1/{event.id}.thumb", "-range": "",
        "etag": f'"{sha256}"', "accept-ranges": "bytes", "x-content-length": str(len(PNG)),
        "x-content-sha256": sha256, "content-type": "image/png", "x-gallery-handoff": "1",
        "x-content-type-options": "nosniff", "content-security-policy": "sandbox; default-src 'none'",
    }
    assert (gallery.storage.media_root / got[":path"].removeprefix(FILES_PREFIX)).read_bytes() == PNG


@pytest.mark.parametrize("case", ["range", "large", "missing"])
def test_a_thumbnail_envoy_must_not_send_goes_on_unchanged(gallery, principal, handoff, case):
    """A window of a thumbnail replaced since Check could be neither file's; a large one would be
    read and hashed on a quick-read thread; a missing one is the server's 404."""
    event = store(gallery, principal, data=PDF, thumbnail=PNG)
    path, headers = f"/api/gallery/cam1/events/{event.id}/thumbnail", {"authorization": bearer()}
    thumbnail = gallery.storage.thumbnail_path("cam1", event.id)
    match case:
        case "range":
            headers["range"] = "bytes=0-3"
        case "large":
            thumbnail.write_bytes(PNG.ljust(HANDOFF_THUMBNAIL_BYTES + 1, b"\0"))
        case "missing":
            thumbnail.unlink()
    assert handed_off(check(handoff, path, **headers)) is None
    if case == "large":  # the largest it takes
        thumbnail.write_bytes(PNG.ljust(HANDOFF_THUMBNAIL_BYTES, b"\0"))
        assert handed_off(check(handoff, path, authorization=bearer())) is not None


def test_a_thumbnail_swapped_for_a_large_one_after_the_look_goes_on_unchanged(gallery, principal, handoff, monkeypatch):
    """Replaced by rename between Check's look at its size and its open: the open file's size
    decides, so the large one is neither read nor hashed on a quick-read thread."""
    event = store(gallery, principal, data=PDF, thumbnail=PNG)
    thumbnail = gallery.storage.thumbnail_path("cam1", event.id)
    opened = []
    real_open = Gallery.open_thumbnail

    def swapped_then_opened(self, *args, **kwargs):
        large = thumbnail.with_name("large.tmp")
        large.write_bytes(PNG.ljust(HANDOFF_THUMBNAIL_BYTES + 1, b"\0"))
        large.replace(thumbnail)
        opened.append(content := real_open(self, *args, **kwargs))
        return content

    monkeypatch.setattr(Gallery, "open_thumbnail", swapped_then_opened)
    assert handed_off(check(handoff, f"/api/gallery/cam1/events/{event.id}/thumbnail", authorization=bearer())) is None
    assert opened == [None]


def test_a_path_is_read_as_the_transcoder_reads_it(gallery, principal, handoff):
    """A device's `:` as `%3A` (encodeURIComponent writes it so), as the transcoder decodes it."""
    event = store(gallery, principal, device="00:1a:2b:3c:4d:5e", data=PDF)
    got = handed_off(check(handoff, f"/api/gallery/00%3A1a%3a2b:3c:4d:5e/events/{event.id}/content",
                           authorization=bearer(devices=["00:1a:2b:3c:4d:5e"])))
    assert got is not None and got[":path"] == f"{FILES_PREFIX}00:1a:2b:3c:4d:5e/{event.id}"


@pytest.mark.parametrize(("range_header", "window"), [
    ("bytes=10-19", "bytes=10-19"),
    ("bytes=0-", f"bytes=0-{len(PDF) - 1}"),  # file_server reads `0-` as the whole file, 200
    ("bytes=100-", f"bytes=100-{len(PDF) - 1}"),
    ("bytes=-5", f"bytes={len(PDF) - 5}-{len(PDF) - 1}"),  # file_server ignores suffixes
    ("bytes=3-99999", f"bytes=3-{len(PDF) - 1}"),
])
def test_a_range_is_handed_off_in_the_one_form_file_server_reads(gallery, principal, handoff, range_header, window):
    event = store(gallery, principal, data=PDF)
    got = handed_off(check(handoff, f"/api/gallery/cam1/events/{event.id}/content",
                           authorization=bearer(), range=range_header))
    assert got is not None
    first, last = window.removeprefix("bytes=").split("-")
    assert (got["range"], got["content-range"]) == (window, f"bytes {first}-{last}/{len(PDF)}")
    assert "-range" not in got


@pytest.mark.parametrize("range_header", ["bytes=0-1,5-6", "bytes=9-3", "items=0-1", "bytes=x-", "bytes=1-2-3"])
def test_a_range_the_rules_ignore_is_removed(gallery, principal, handoff, range_header):
    event = store(gallery, principal, data=PDF)
    got = handed_off(check(handoff, f"/api/gallery/cam1/events/{event.id}/content",
                           authorization=bearer(), range=range_header))
    assert got is not None
    assert "-range" in got and "range" not in got and "content-range" not in got


@pytest.mark.parametrize("case", [
    "HEAD", "unsatisfiable range", "if-none-match", "if-range", "if-modified-since", "no thumbnail", "no token",
    "bad token", "other device", "write scope only", "unknown event", "event id of another device",
    "encoded device", "deleted file", "file of another size",
])
def test_everything_else_goes_on_unchanged(gallery, principal, handoff, case):
    event = store(gallery, principal, data=PDF)
    path, method = f"/api/gallery/cam1/events/{event.id}/content", "GET"
    headers = {"authorization": bearer()}
    media = gallery.storage.media_path("cam1", event.id)
    match case:
        case "HEAD":
            method = "HEAD"
        case "unsatisfiable range":
            headers["range"] = f"bytes={len(PDF)}-"
        case "if-none-match" | "if-range" | "if-modified-since":
            headers[case] = '"x"'
        case "no thumbnail":  # 404 THUMBNAIL_NOT_FOUND is the server's
            path = path.replace("/content", "/thumbnail")
        case "no token":
            headers = {}
        case "bad token":
            headers["authorization"] = "Bearer nope"
        case "other device":
            headers["authorization"] = bearer(devices=["cam2"])
        case "write scope only":
            headers["authorization"] = bearer(scope="gallery:write")
        case "unknown event":
            path = path.replace(event.id, "evt_" + "Q" * 22)
        case "event id of another device":
            store(gallery, principal, device="cam2")
            path = path.replace("/cam1/", "/cam2/")
            headers["authorization"] = bearer(devices=["*"])
        case "encoded device":  # decoded as the transcoder decodes it: no device
            path = path.replace("/cam1/", "/cam%2F1/")
        case "deleted file":
            media.unlink()
        case "file of another size":
            media.write_bytes(PDF[:10])
    assert handed_off(check(handoff, path, method, **headers)) is None


def test_an_unexpected_error_goes_on_unchanged(gallery, principal, handoff, monkeypatch, caplog):
    event = store(gallery, principal, data=PDF)

    def broken(*_args: object) -> None:
        raise RuntimeError("database gone")

    monkeypatch.setattr(gallery, "stored_media", broken)
    response = check(handoff, f"/api/gallery/cam1/events/{event.id}/content", authorization=bearer())
    assert handed_off(response) is None
    assert "file handoff failed" in caplog.text
