"""README's code, run as written against a real server: what users copy has to work as the text
around it says. Its Python on the gRPC port; its shell examples (curl) through Envoy, each answer
held to the comment that shows it. The resumable upload's example goes on through its server's
restart (before, its QueryUpload sat outside the retry, so a server still down raised at once)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pathlib
import re
import subprocess
import textwrap
import threading
from collections.abc import Callable, Iterator

import grpc
import httpx
import pytest
from PIL import Image

from gallery.v1 import gallery_pb2 as pb
from gallery.v1 import gallery_pb2_grpc
from gallery_server.local_stack import Stack

from ..conftest import random_bytes, wait_until
from .conftest import running_stack
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


# README's "REST examples": its first shell block, run command by command with bash and curl
# against a stack started as `make run` starts it (server-made thumbnails on), each placeholder
# replaced by what a reader puts there, and each answer held to the comment that shows it.
REST_EXAMPLES = "## REST examples"
ELIDED = '".../'  # README's shorthand for the device's URL
EVENT_ID = "evt_Xq3b..."
CONTENT_ETAG = "9f86d081884c7d65..."
INPUTS = ("/path/to/capture.jpg", "/path/to/video.mp4", "/path/to/thumb.jpg")


@dataclasses.dataclass
class Example:
    command: str  # as written, its continuation lines joined
    said: str  # its own trailing comment and the comment lines after it, without "#", a line each


def sh_examples(after_heading: str) -> list[Example]:
    """The commands of the first ```sh block of README.md under `after_heading`."""
    section = README.read_text(encoding="utf-8").split(f"\n{after_heading}\n", 1)[1]
    match = re.search(r"^```sh\n(.*?)^```", section, re.DOTALL | re.MULTILINE)
    assert match is not None, after_heading
    found: list[Example] = []
    lines = iter(match.group(1).splitlines())
    for line in lines:
        if line.startswith("#"):
            found[-1].said += "\n" + line[1:].strip()
        elif line.strip():
            while line.endswith("\\"):
                line = line[:-1] + next(lines)
            command, _, comment = line.partition("  # ")
            found.append(Example(command.strip(), comment.strip()))
    return found


def json_shown(said: str) -> list[str]:
    """The JSON texts a comment shows (`...` for what varies), outermost brackets each."""
    shown, depth, start = [], 0, 0
    for i, char in enumerate(said):
        if char in "[{":
            start = i if depth == 0 else start
            depth += 1
        elif char in "]}" and depth:
            depth -= 1
            if depth == 0:
                shown.append(said[start:i + 1])
    return [text for text in shown if '":' in text]  # `{...}` stands for anything


def keys(value: object) -> set[str]:
    if isinstance(value, dict):
        return set(value).union(*map(keys, value.values()))
    if isinstance(value, list):
        return set().union(*map(keys, value))
    return set()


def assert_answer_as_shown(example: Example, out: bytes) -> None:
    """The answer holds the keys of one of the JSON answers the comment shows (a listing's
    events exactly its keys), `"success":true` where shown; a status line and headers where the
    comment shows them (`curl -i`)."""
    if re.search(r"^HTTP/1\.1 ", example.said, re.MULTILINE):
        final = re.sub(rb"^(HTTP/1\.1 1\d\d [^\r]*\r\n\r\n)+", b"", out)  # after curl's 100 Continue
        head = final.split(b"\r\n\r\n", 1)[0].decode()
        status, *header_lines = head.split("\r\n")
        shown_status = re.search(r"HTTP/1\.1 \d{3}(?: [A-Z][a-z]+)+", example.said)
        assert shown_status is not None and status == shown_status.group(), (example.command, status)
        headers = dict(line.lower().split(": ", 1) for line in header_lines)
        shown_headers = [piece.split(": ", 1) for line in example.said.splitlines()
                         for piece in re.split(r"\s{2,}", line) if re.match(r"[a-z][a-z0-9-]*: ", piece)]
        for name, value in shown_headers:
            assert name in headers, (example.command, name, headers)
            if not re.search(r"\d|\.\.\.", value):  # a value that is the same for every file
                assert headers[name] == value, (example.command, name, headers[name])
        if "no body" in example.said:
            assert final.split(b"\r\n\r\n", 1)[1] == b"", example.command
        assert shown_headers or "no body" in example.said
        return
    answer = json.loads(out)
    failures = []
    for shown in json_shown(example.said):
        shown_keys = set(re.findall(r'"(\w+)":', shown))
        if shown.startswith("["):
            ok = bool(answer) and all(set(item) == shown_keys for item in answer)
        else:
            ok = shown_keys <= keys(answer) and ('"success":true' not in shown or answer["success"] is True)
        if ok:
            return
        failures.append(shown)
    raise AssertionError(f"{example.command}\nanswered {answer}\nnone of {failures}")


@pytest.fixture(scope="module")
def make_run_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("readme"), {}) as stack:  # make run's own settings
        yield stack


def test_the_rest_examples_run_as_written(make_run_stack: Stack, mint: Callable[..., str],
                                          tmp_path: pathlib.Path) -> None:
    stack, token = make_run_stack, mint(devices=[DEVICE])
    device_url = stack.url(f"/api/gallery/{DEVICE}")
    capture, thumb = (_jpeg(Image.effect_noise(size, 60).convert("RGB")) for size in ((640, 480), (160, 120)))
    inputs, downloads = tmp_path / "in", tmp_path / "out"
    inputs.mkdir(), downloads.mkdir()
    for placeholder, data in zip(INPUTS, (capture, random_bytes(300_000), thumb), strict=True):
        (inputs / pathlib.Path(placeholder).name).write_bytes(data)
    headers = {"Authorization": f"Bearer {token}"}
    # curl's own configuration (CURL_HOME) has it print each answer's status after it: curl exits 0
    # on a 4xx or 5xx, and the commands are run as written.
    (tmp_path / ".curlrc").write_text('write-out = "\\n@status %{http_code}\\n"\n')
    env = {**os.environ, "TOKEN": token, "CURL_HOME": str(tmp_path)}
    with httpx.Client(timeout=30) as http:
        # What the device already holds: a video (the listing asks for videos), and a capture to delete.
        def upload(name: str, media_type: str, data: bytes) -> str:
            answer = http.post(f"{device_url}/upload", headers=headers, files={"event": (name, data)},
                               data={"name": name, "media_type": media_type})
            return str(answer.raise_for_status().json()["eventId"])

        upload("clip.mp4", "video", random_bytes(1 << 20))
        unwanted = upload("old.jpg", "image", capture)
        given: dict[str, str] = {}  # what the examples' answers gave: the capture's id, the URLs
        examples = sh_examples(REST_EXAMPLES)
        assert len(examples) >= 15
        for example in examples:
            command = example.command.replace("http://localhost:8001", stack.base_url)
            command = command.replace(ELIDED, f'"{device_url}/')
            for placeholder in INPUTS:
                command = command.replace(placeholder, str(inputs / pathlib.Path(placeholder).name))
            for placeholder in ("<upload_url>", "<thumbnail_upload_url>"):
                command = command.replace(placeholder, given.get(placeholder[1:-1], placeholder))
            event_id = unwanted if command.startswith("curl -X DELETE") else given.get("eventId", "")
            command = command.replace(EVENT_ID, event_id).replace(CONTENT_ETAG, hashlib.sha256(capture).hexdigest())
            if "-C -" in command:  # a download cut midway, resumed
                (downloads / "capture.jpg").write_bytes(capture[:1000])
            ran = subprocess.run(["bash", "-c", command], cwd=downloads, env=env, capture_output=True, timeout=60)
            assert ran.returncode == 0, (command, ran.stderr.decode())
            out, status = ran.stdout.rsplit(b"\n@status ", 1)
            shown_status = re.search(r"^HTTP/1\.1 (\d{3})", example.said, re.MULTILINE)
            expected = {int(shown_status.group(1))} if shown_status else {200, 206}  # 206: the resumed one
            assert int(status) in expected, (command, status, out[:500])
            if json_shown(example.said) or shown_status:
                assert_answer_as_shown(example, out)
            if out.startswith(b"{"):
                answer = json.loads(out)
                given = {**{k: v for k, v in answer.items() if isinstance(v, str)}, **given}  # the first id stays
            if " -OJ " in command:  # saved under the name it was uploaded as, and nothing else
                assert [path.name for path in downloads.iterdir()] == ["capture.jpg"]
                assert (downloads / "capture.jpg").read_bytes() == capture
            if "-F \"event=@" in example.command:  # the server makes the capture's thumbnail
                event_url = f"{device_url}/events/{given['eventId']}"
                assert wait_until(lambda url=event_url: http.get(url, headers=headers).json()["has_thumbnail"], 30)
        assert "upload_url" in given and "thumbnail_upload_url" in given
        assert (downloads / "capture.jpg").read_bytes() == capture  # resumed by curl -C -
        assert (downloads / "thumb.jpg").read_bytes()[:3] == b"\xff\xd8\xff"
        listed = http.get(f"{device_url}/events", headers=headers).json()
        names = {event["name"] for event in listed}  # the resumable example's movie.mp4 too, if it ran first
        assert {"capture.jpg", "clip.mp4", "video.mp4"} <= names and "old.jpg" not in names
        [video] = [event for event in listed if event["name"] == "video.mp4"]
        assert video["has_thumbnail"] is True  # its thumbnail PUT, after the media
        assert http.get(f"{device_url}/events/{video['id']}/thumbnail", headers=headers).content == thumb


def _jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def test_the_resumable_rest_example_runs_as_written(make_run_stack: Stack, mint: Callable[..., str],
                                                    tmp_path: pathlib.Path) -> None:
    """Its commands share shell variables: one bash runs them all (`set -e`: a failing command
    fails the test), a marker line after each telling their answers apart."""
    stack, marker = make_run_stack, "@@@ next example @@@"
    movie = random_bytes(12 << 20)
    (tmp_path / "movie.mp4").write_bytes(movie)
    examples = sh_examples("### Resumable uploads over REST (pre-signed URLs)")
    script = "set -euo pipefail\n" + "".join(
        f"{example.command.replace('http://localhost:8001', stack.base_url)}\necho; echo '{marker}'\n"
        for example in examples)
    ran = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, timeout=120,
                         env={**os.environ, "TOKEN": mint(devices=[DEVICE])})
    assert ran.returncode == 0, ran.stderr.decode()
    answers = ran.stdout.split(f"\n{marker}\n".encode())
    assert len(answers) == len(examples) + 1 and len(examples) >= 8
    for example, answer in zip(examples, answers, strict=False):
        if json_shown(example.said) or re.search(r"^HTTP/1\.1 ", example.said, re.MULTILINE):
            assert_answer_as_shown(example, answer)
    event_id = json.loads(answers[-2])["eventId"]
    assert (stack.data_dir / "media" / DEVICE / event_id).read_bytes() == movie
