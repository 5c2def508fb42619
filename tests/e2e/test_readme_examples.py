"""README's code, run as written against a real server: what users copy has to work as the text
around it says. The resumable upload's example goes on through its server's restart (before,
its QueryUpload sat outside the retry, so a server still down raised at once)."""

from __future__ import annotations

import hashlib
import pathlib
import re
import textwrap
import threading
from collections.abc import Callable, Iterator

import grpc
import pytest

from gallery.v1 import gallery_pb2 as pb
from gallery.v1 import gallery_pb2_grpc

from ..conftest import random_bytes
from .test_resumable_cuts import Server

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"
DEVICE = "device123"  # the README's


def python_block(containing: str) -> str:
    """The one ```python block of README.md that holds `containing`, as written (a block that goes
    on from the one before it is indented as its continuation)."""
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.DOTALL | re.MULTILINE)
    [block] = [block for block in blocks if containing in block]
    return block


class RestartingStub:
    """The real stub, but the first WriteUpload stream's server is killed after `after` messages
    and started again `down_seconds` later, on the same port."""

    def __init__(self, stub: gallery_pb2_grpc.GalleryServiceStub, server: Server, *, after: int,
                 down_seconds: float) -> None:
        self._stub, self._server, self._after, self._down = stub, server, after, down_seconds
        self.restarted: threading.Thread | None = None

    def __getattr__(self, name: str) -> object:
        return getattr(self._stub, name)

    def WriteUpload(self, requests: Iterator[pb.WriteUploadRequest], **kwargs: object) -> pb.UploadSession:  # noqa: N802
        return self._stub.WriteUpload(self._cut(requests), **kwargs)

    def _cut(self, requests: Iterator[pb.WriteUploadRequest]) -> Iterator[pb.WriteUploadRequest]:
        for sent, request in enumerate(requests):
            if sent == self._after and self.restarted is None:
                self._server.kill()
                self.restarted = threading.Timer(self._down, self._server.start)
                self.restarted.start()
            yield request


def test_the_resumable_upload_goes_on_through_a_server_restart(
    server: Server, mint: Callable[..., str], tmp_path: pathlib.Path,
) -> None:
    namespace: dict[str, object] = {"grpc": grpc, "pb": pb}  # the imports of README's first example
    exec(textwrap.dedent(python_block("def upload_resumable(")), namespace)  # noqa: S102 - README's own code
    upload_resumable = namespace["upload_resumable"]
    data = random_bytes(12 << 20)
    path = tmp_path / "clip.bin"
    path.write_bytes(data)
    auth = [("authorization", f"Bearer {mint(devices=[DEVICE])}")]
    with grpc.insecure_channel(server.address) as channel:
        stub = RestartingStub(gallery_pb2_grpc.GalleryServiceStub(channel), server, after=4, down_seconds=2)
        try:
            event_id = upload_resumable(stub, str(path), "readme-restart-01", auth)  # type: ignore[operator]
        finally:
            if stub.restarted is not None:  # the server is back before the fixture stops it
                stub.restarted.join()
        assert stub.restarted is not None  # it did lose its server midway
        [event] = list(gallery_pb2_grpc.GalleryServiceStub(channel).ListEvents(
            pb.ListEventsRequest(device=DEVICE), metadata=auth, timeout=10))
    assert (event.id, int(event.size), event.sha256) == (event_id, len(data), hashlib.sha256(data).hexdigest())
    assert (server.data_dir / "media" / DEVICE / event_id).read_bytes() == data


def test_the_first_native_example_uploads_lists_and_reads_back(
    server: Server, mint: Callable[..., str], tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """README's native upload and its continuation (ReadEventContent), on the gRPC port its
    comment names instead of Envoy's."""
    code = python_block("stub.UploadEvent(parts(") + python_block("stub.ReadEventContent(request")
    assert '"localhost:8001"' in code
    data = random_bytes(3 << 20)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "capture.jpg").write_bytes(data)
    exec(code.replace('"localhost:8001"', repr(server.address)), {"token": mint(devices=[DEVICE])})  # noqa: S102
    assert (tmp_path / "copy.jpg").read_bytes() == data
    [line] = capsys.readouterr().out.splitlines()  # the listing's print
    event_id, name, size = line.split()
    assert (name, size) == ("capture.jpg", f"{float(len(data))}")
    assert (server.data_dir / "media" / DEVICE / event_id).read_bytes() == data
