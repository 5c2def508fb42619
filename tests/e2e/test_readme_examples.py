"""README's code, run as written against a real server: what users copy has to work as the text
around it says. Its Python on the gRPC port; its shell examples (curl) through Envoy, each answer
held to the comment or the text that shows it. The resumable upload's example goes on through its server's
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
from gallery_server.local_stack import Stack, free_ports

from ..conftest import JWT_SECRET, random_bytes, wait_until
from .conftest import running_stack
from .test_resumable_cuts import Server

REPO = pathlib.Path(__file__).resolve().parents[2]
README = REPO / "README.md"
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
REST_EXAMPLES = 'curl "http://localhost:8001/api/gallery/device123/paths"'  # its first command
ELIDED = '".../'  # README's shorthand for the device's URL
EVENT_ID = "evt_Xq3b..."
CONTENT_ETAG = "9f86d081884c7d65..."
INPUTS = ("/path/to/capture.jpg", "/path/to/video.mp4", "/path/to/thumb.jpg")


@dataclasses.dataclass
class Example:
    command: str  # as written, its continuation lines joined
    said: str  # its own trailing comment and the comment lines after it, without "#", a line each


def sh_examples(containing: str) -> list[Example]:
    """The commands of the one ```sh block of README.md that holds `containing` (one in a list
    item is indented as the item is)."""
    blocks = re.findall(r"^( *)```sh\n(.*?)^\1```", README.read_text(encoding="utf-8"), re.DOTALL | re.MULTILINE)
    [block] = [textwrap.dedent(block) for indent, block in blocks if containing in block]
    found: list[Example] = []
    lines = iter(block.splitlines())
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
def metrics_address() -> str:
    """Where the module's stack serves its metrics: the metrics example's, on a free port."""
    [port] = free_ports(1)
    return f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def make_run_stack(tmp_path_factory: pytest.TempPathFactory, metrics_address: str) -> Iterator[Stack]:
    """A stack with `make run`'s own settings, and the metrics example's GALLERY_METRICS_ADDRESS."""
    with running_stack(tmp_path_factory.mktemp("readme"), {"GALLERY_METRICS_ADDRESS": metrics_address}) as stack:
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
    examples = sh_examples("x-committed-size")
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


def bash(script: str, *, cwd: pathlib.Path, env: dict[str, str]) -> bytes:
    """What `script` prints, run by bash with `set -euo pipefail` (a failing command fails the test)."""
    ran = subprocess.run(["bash", "-c", f"set -euo pipefail\n{script}"], cwd=cwd, env={**os.environ, **env},
                         capture_output=True, timeout=60)
    assert ran.returncode == 0, (script, ran.stderr.decode())
    return ran.stdout


def test_the_admin_status_example_runs_as_written(make_run_stack: Stack) -> None:
    """`gallery token` mints the admin's token as written, from the repo (.venv/bin/gallery), and
    the status answers with every key the paragraph above the example names, and none it does not
    (after a whole `gallery verify`, which `last_verify` waits for)."""
    stack = make_run_stack
    env = {"GALLERY_DATA_DIR": str(stack.data_dir), "GALLERY_JWT_SECRET": JWT_SECRET}  # what `make run` had
    bash(".venv/bin/gallery verify > /dev/null", cwd=REPO, env=env)
    examples = sh_examples("ADMIN_TOKEN=")
    assert [example.command.split()[0] for example in examples] == ["ADMIN_TOKEN=$(.venv/bin/gallery", "curl"]
    out = bash("\n".join(example.command.replace("http://localhost:8001", stack.base_url) for example in examples),
               cwd=REPO, env=env)
    status = json.loads(out)
    paragraph = README.read_text(encoding="utf-8").split("**Admin status.**", 1)[1].split("```sh", 1)[0]
    named = set(re.findall(r"`([a-z]+(?:_[a-z]+)*)`", paragraph)) - {"devices", "thumbnails"}  # a claim, a folder
    # Every key but those inside last_reconcile and its examples, which the paragraph sums up in words.
    answered = set(status) | {key for name, value in status.items() if name != "last_reconcile" for key in keys(value)}
    assert status["database_up"] is True and "last_verify" in status and "last_reconcile" in status
    of_the_pass = {"rows_checked", "missing_media", "size_mismatch", "examples"}  # those it names
    assert of_the_pass <= set(status["last_reconcile"])
    assert named == answered | of_the_pass, (named - answered - of_the_pass, answered - named)


def test_the_metrics_example_answers_as_written(make_run_stack: Stack, metrics_address: str,
                                                mint: Callable[..., str]) -> None:
    """The module's stack is its first command (on a free port); its scrape prints each count of
    calls handled, one answered through Envoy among them."""
    start, scrape = sh_examples("grpc_server_handled_total")
    assert start.command == "GALLERY_METRICS_ADDRESS=127.0.0.1:9464 make run"
    token = mint(devices=[DEVICE])
    httpx.get(make_run_stack.url(f"/api/gallery/{DEVICE}/paths"), headers={"Authorization": f"Bearer {token}"},
              timeout=30).raise_for_status()
    out = bash(scrape.command.replace("127.0.0.1:9464", metrics_address), cwd=REPO, env={}).decode()
    lines = [line for line in out.splitlines() if not line.startswith(("# HELP ", "# TYPE "))]  # its comments
    assert lines and all(line.startswith("grpc_server_handled_total{") for line in lines), out
    assert any('grpc_method="GetDevicePaths"' in line and 'grpc_code="OK"' in line for line in lines), out


def test_the_page_token_example_runs_as_written(make_run_stack: Stack, mint: Callable[..., str]) -> None:
    """Its first command's `x-next-page-token` goes where the second names it; the two pages hold
    each event since its date once. Last in the module: it gives README's device 101 events more."""
    stack, token = make_run_stack, mint(devices=[DEVICE])
    first, second = sh_examples("page_token=")
    shown = re.search(r"x-next-page-token: (\S+)\.\.\.", first.said)
    assert shown is not None and shown.group(1) + "..." in second.command
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(timeout=30) as http:
        for n in range(101):  # a full page of the example's 100, and one more
            http.post(stack.url(f"/api/gallery/{DEVICE}/upload"), headers=headers,
                      files={"event": (f"note-{n}.txt", b"note %d" % n)},
                      data={"name": f"note-{n}.txt", "media_type": "document"}).raise_for_status()
        total = http.get(stack.url(f"/api/gallery/{DEVICE}/stats"), headers=headers).json()["total_events"]
    env = {"TOKEN": token}
    out = bash(first.command.replace("http://localhost:8001", stack.base_url), cwd=REPO, env=env)
    head, body = out.split(b"\r\n\r\n", 1)
    status, *header_lines = head.decode().split("\r\n")
    page_token = {name.lower(): value for name, value in (line.split(": ", 1) for line in header_lines)}[
        "x-next-page-token"]
    assert status == "HTTP/1.1 200 OK" and page_token.startswith(shown.group(1))  # as README shows its start
    command = second.command.replace("http://localhost:8001", stack.base_url)
    rest = json.loads(bash(command.replace(shown.group(1) + "...", page_token), cwd=REPO, env=env))
    page = json.loads(body)
    assert len(page) == 100 and len(page) + len(rest) == total
    assert len({event["id"] for event in page + rest}) == total
