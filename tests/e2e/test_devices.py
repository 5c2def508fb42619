"""Devices in the loop, end to end: a real `gallery agent` process against the real stack.

The agent announces the files of its folder; a REST client pulls one; the agent receives the
command on its channel and uploads the content; the REST client downloads it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import pathlib
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import httpx
import pytest
from PIL import Image

from gallery.v1 import device_pb2 as dpb
from gallery.v1 import device_pb2_grpc, gallery_pb2_grpc
from gallery.v1 import gallery_pb2 as gpb
from gallery_server import agent as agent_module
from gallery_server import auth

from ..conftest import new_device
from ..silent_network import SilentNetworkProxy
from .conftest import Stack, start_stack, stop_stack

DOCUMENTED_FIELDS = {"id", "name", "media_type", "size", "has_thumbnail", "created", "mime_type", "sha256"}


@dataclasses.dataclass
class AgentProcess:
    process: subprocess.Popen[bytes]
    log_path: pathlib.Path
    token: str

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(timeout=15) == 0, self.log()
        assert self.token not in self.log()


@pytest.fixture
def run_agent(mint: Callable[..., str], tmp_path: pathlib.Path) -> Iterator[Callable[..., AgentProcess]]:
    """run_agent(stack, device, folder, *extra_args) -> a running `gallery agent` subprocess."""
    started: list[AgentProcess] = []

    def _run(stack: Stack, device: str, folder: pathlib.Path, *extra: str) -> AgentProcess:
        token = mint(devices=[device], scope=auth.DEVICE, sub=f"device-{device}")
        log_path = tmp_path / f"agent-{len(started)}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "gallery_server", "agent", "--device", device,
                 "--dir", str(folder), "--server", stack.base_url, "--scan-interval", "0.3", *extra],
                env={**os.environ, "GALLERY_AGENT_TOKEN": token}, stdout=log, stderr=log,
            )
        assert token not in " ".join(process.args)  # type: ignore[arg-type]  (not visible in ps)
        started.append(AgentProcess(process, log_path, token))
        return started[-1]

    yield _run
    for agent in started:
        if agent.process.poll() is None:
            agent.process.kill()
            agent.process.wait()


def wait_for(check: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def list_events(http: httpx.Client, headers: dict[str, str], device: str) -> list[dict]:
    r = http.get(f"/api/gallery/{device}/events", headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def wait_announced(http, headers, device: str, count: int, agent: AgentProcess) -> dict[str, dict]:
    def announced() -> list[dict] | None:
        events = list_events(http, headers, device)
        return events if len(events) == count else None

    try:
        events = wait_for(announced, 15, f"{count} announced events")
    except AssertionError:
        raise AssertionError(agent.log()) from None
    return {e["name"]: e for e in events}  # type: ignore[union-attr]


def get_event(http: httpx.Client, headers: dict[str, str], device: str, event_id: str) -> dict:
    r = http.get(f"/api/gallery/{device}/events/{event_id}", headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def wait_stored(http, headers, device: str, event_id: str, timeout: float, agent: AgentProcess) -> dict:
    try:
        return wait_for(  # type: ignore[return-value]
            lambda: (e := get_event(http, headers, device, event_id))["state"] == "stored" and e,
            timeout, f"{event_id} stored",
        )
    except AssertionError:
        raise AssertionError(agent.log()) from None


def command_count(data_dir: pathlib.Path, event_id: str) -> int:
    with sqlite3.connect(data_dir / "gallery.db") as db:
        return db.execute("SELECT count(*) FROM device_commands WHERE event_id = ?", (event_id,)).fetchone()[0]


def content(http: httpx.Client, headers: dict[str, str], device: str, event_id: str) -> bytes:
    r = http.get(f"/api/gallery/{device}/events/{event_id}/content", headers=headers)
    assert r.status_code == 200, r.text
    return r.content


def test_announce_pull_and_download(stack, http, auth_headers, run_agent, tmp_path, envoy_channel):
    device, folder, headers = new_device(), tmp_path / "dcim", auth_headers()
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (800, 600), "teal").save(folder / "photo.jpg")
    clip = os.urandom(3 * (1 << 20) + 123)
    (folder / "sub" / "clip.mp4").write_bytes(clip)
    (folder / ".hidden.jpg").write_bytes(b"not announced")
    (folder / "half.mp4.part").write_bytes(b"not announced")
    agent = run_agent(stack, device, folder)

    events = wait_announced(http, headers, device, 2, agent)
    for event in events.values():
        assert DOCUMENTED_FIELDS <= set(event), event
        assert event["state"] == "on_device"
    photo, video = events["photo.jpg"], events["clip.mp4"]
    assert (photo["media_type"], photo["has_thumbnail"]) == ("image", True)
    assert (video["media_type"], video["has_thumbnail"], video["size"]) == ("video", False, len(clip))
    assert video["sha256"] == hashlib.sha256(clip).hexdigest()
    assert get_event(http, headers, device, video["id"])["state"] == "on_device"
    with Image.open(stack.data_dir / "media" / device / f"{photo['id']}.thumb") as thumbnail:
        assert thumbnail.format == "JPEG" and max(thumbnail.size) == 320
    r = http.get(f"/api/gallery/{device}/events/{video['id']}/content", headers=headers)
    assert r.status_code == 400 and "pull" in r.text

    # Pull over REST: the pull is recorded, the agent uploads, the content is there.
    r = http.post(f"/api/gallery/{device}/pull/{video['id']}", headers=headers)
    assert r.status_code == 200, r.text
    assert (r.json()["success"], r.json()["eventId"]) == (True, video["id"])
    stored = wait_stored(http, headers, device, video["id"], 20, agent)
    assert stored["pull"]["state"] == "completed" and stored["sha256"] == video["sha256"]
    assert content(http, headers, device, video["id"]) == clip
    assert command_count(stack.data_dir, video["id"]) == 1
    # Pulling it again asks the device for nothing: the answer names the pull that brought it.
    again = http.post(f"/api/gallery/{device}/pull/{video['id']}", headers=headers).json()
    assert (again["success"], again["state"], again["pull"]["state"]) == (True, "stored", "completed")
    assert command_count(stack.data_dir, video["id"]) == 1

    # A stored event: success at once, no new command.
    r = http.post(f"/api/gallery/{device}/pull/{video['id']}", headers=headers)
    assert r.status_code == 200 and r.json()["success"] is True and r.json()["state"] == "stored"
    assert command_count(stack.data_dir, video["id"]) == 1

    # ?wait answers once the content is there.
    r = http.post(f"/api/gallery/{device}/pull/{photo['id']}?wait=20", headers=headers)
    assert r.status_code == 200, r.text
    assert (r.json()["success"], r.json()["state"]) == (True, "stored"), agent.log()
    assert content(http, headers, device, photo["id"]) == (folder / "photo.jpg").read_bytes()
    assert [e["state"] for e in list_events(http, headers, device)] == ["stored", "stored"]
    agent.stop()

    # Uploading a stored event again is refused with the reason the agent takes as "done".
    def upload_again() -> Iterator[gpb.UploadEventRequest]:
        yield gpb.UploadEventRequest(header=gpb.UploadHeader(device=device, event_id=photo["id"]))
        yield gpb.UploadEventRequest(media_chunk=b"x")

    with pytest.raises(grpc.RpcError) as failed:
        gallery_pb2_grpc.GalleryServiceStub(envoy_channel).UploadEvent(
            upload_again(), metadata=[("authorization", f"Bearer {agent.token}")], timeout=10)
    assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert agent_module.error_reason(failed.value) == "EVENT_ALREADY_STORED"


def test_pull_waits_for_an_offline_device(stack, http, auth_headers, run_agent, tmp_path):
    device, folder, headers = new_device(), tmp_path / "dcim", auth_headers()
    folder.mkdir()
    # 3 chunks at one a second: the agent reports progress after each, the first 2 s before the
    # end (a report racing the upload's completion is not recorded: the pull is over).
    data = os.urandom(3 << 20)
    (folder / "late.mov").write_bytes(data)
    agent = run_agent(stack, device, folder, "--max-rate", str(1 << 20))
    event = wait_announced(http, headers, device, 1, agent)["late.mov"]
    agent.stop()

    for _ in range(3):
        r = http.post(f"/api/gallery/{device}/pull/{event['id']}", headers=headers)
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["success"], body["state"], body["pull"]["state"]) == (True, "on_device", "pending")
    assert get_event(http, headers, device, event["id"])["pull"]["state"] == "pending"
    assert command_count(stack.data_dir, event["id"]) == 1

    agent = run_agent(stack, device, folder, "--max-rate", str(1 << 20))
    wait_stored(http, headers, device, event["id"], 20, agent)
    assert content(http, headers, device, event["id"]) == data
    with sqlite3.connect(stack.data_dir / "gallery.db") as db:
        [(bytes_sent,)] = db.execute("SELECT bytes_sent FROM device_commands WHERE event_id = ?",
                                     (event["id"],)).fetchall()
    assert bytes_sent > 0
    agent.stop()


def test_pulls_racing_the_upload_leave_no_open_command(stack, http, auth_headers, run_agent, tmp_path):
    device, folder, headers = new_device(), tmp_path / "dcim", auth_headers()
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.mp4").write_bytes(os.urandom(2 << 20))
    agent = run_agent(stack, device, folder)
    events = wait_announced(http, headers, device, 4, agent).values()

    def pull_until_stored(event_id: str) -> None:
        with httpx.Client(base_url=stack.base_url, headers=headers, timeout=30) as client:
            deadline = time.monotonic() + 20
            while client.post(f"/api/gallery/{device}/pull/{event_id}").json()["state"] != "stored":
                assert time.monotonic() < deadline

    pullers = [threading.Thread(target=pull_until_stored, args=(e["id"],)) for e in events for _ in range(3)]
    for thread in pullers:
        thread.start()
    for thread in pullers:
        thread.join()
    time.sleep(0.5)  # let a command that slipped in reach the agent
    for event in events:
        assert get_event(http, headers, device, event["id"])["pull"]["state"] == "completed"
        assert command_count(stack.data_dir, event["id"]) == 1
    agent.stop()


def test_device_failure_is_reported(stack, http, auth_headers, run_agent, tmp_path):
    device, folder, headers = new_device(), tmp_path / "dcim", auth_headers()
    folder.mkdir()
    (folder / "gone.jpg").write_bytes(b"\xff\xd8 soon deleted")
    agent = run_agent(stack, device, folder)
    event = wait_announced(http, headers, device, 1, agent)["gone.jpg"]
    (folder / "gone.jpg").unlink()

    r = http.post(f"/api/gallery/{device}/pull/{event['id']}?wait=5", headers=headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["success"], body["state"], body["pull"]["state"]) == (False, "on_device", "failed"), agent.log()
    assert "no longer on device" in body["pull"]["error"]
    shown = get_event(http, headers, device, event["id"])
    assert (shown["state"], shown["pull"]["state"]) == ("on_device", "failed")
    assert shown["pull"]["error"] == body["pull"]["error"]
    agent.stop()


def test_devices_cannot_reach_each_others_events(stack, http, auth_headers, mint, envoy_channel):
    dev_a, dev_b = new_device(), new_device()
    token_a = [("authorization", f"Bearer {mint(devices=[dev_a], scope=auth.DEVICE)}")]
    token_b = [("authorization", f"Bearer {mint(devices=[dev_b], scope=auth.DEVICE)}")]
    devices = device_pb2_grpc.DeviceServiceStub(envoy_channel)
    gallery = gallery_pb2_grpc.GalleryServiceStub(envoy_channel)
    announced = devices.AnnounceEvents(dpb.AnnounceEventsRequest(device=dev_b, events=[
        dpb.AnnouncedEvent(device_key="b/1.jpg", name="1.jpg", size=3)]), metadata=token_b)
    event_b = announced.results[0].event_id

    # REST: the event is not devA's; a token for devA only does not open devB.
    r = http.post(f"/api/gallery/{dev_a}/pull/{event_b}", headers=auth_headers())
    assert r.status_code == 404, r.text
    r = http.post(f"/api/gallery/{dev_b}/pull/{event_b}", headers=auth_headers(devices=[dev_a]))
    assert r.status_code == 403, r.text
    r = http.post(f"/api/gallery/{dev_b}/pull/{event_b}", headers=auth_headers(devices=[dev_b], scope=auth.DEVICE))
    assert r.status_code == 403, r.text  # a device token cannot pull

    # gRPC: devA's device token can neither open devB's channel, nor announce or upload for it.
    def hello_b() -> Iterator[dpb.ConnectRequest]:
        yield dpb.ConnectRequest(hello=dpb.DeviceHello(device=dev_b))

    with pytest.raises(grpc.RpcError) as failed:
        next(iter(devices.Connect(hello_b(), metadata=token_a, timeout=10)))
    assert failed.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as failed:
        devices.AnnounceEvents(dpb.AnnounceEventsRequest(device=dev_b, events=[
            dpb.AnnouncedEvent(device_key="x", name="x.jpg")]), metadata=token_a, timeout=10)
    assert failed.value.code() == grpc.StatusCode.PERMISSION_DENIED

    def upload(device: str) -> Iterator[gpb.UploadEventRequest]:
        yield gpb.UploadEventRequest(header=gpb.UploadHeader(device=device, event_id=event_b, name="1.jpg"))
        yield gpb.UploadEventRequest(media_chunk=b"abc")

    for device, code, reason in ((dev_b, grpc.StatusCode.PERMISSION_DENIED, "DEVICE_NOT_ALLOWED"),
                                 (dev_a, grpc.StatusCode.NOT_FOUND, "EVENT_NOT_FOUND")):
        with pytest.raises(grpc.RpcError) as failed:
            gallery.UploadEvent(upload(device), metadata=token_a, timeout=10)
        assert (failed.value.code(), agent_module.error_reason(failed.value)) == (code, reason)
    assert get_event(http, auth_headers(), dev_b, event_b)["state"] == "on_device"


def test_upload_survives_a_server_restart(auth_headers, run_agent, tmp_path):
    """The stack dies mid-upload and comes back on the same address with the same data: the
    still-running agent reconnects, uploads again and the pull completes, once."""
    root = tmp_path / "restart"
    root.mkdir()
    stack = start_stack(root / "data", root / "gallery-1.log")
    try:
        device, folder, headers = new_device(), tmp_path / "dcim", auth_headers()
        folder.mkdir()
        block = os.urandom(1 << 20)
        big = folder / "big.mp4"
        with big.open("wb") as f:
            for i in range(64):  # 64 MiB, every MiB different
                f.write(i.to_bytes(8, "big") + block[8:])
        digest = hashlib.sha256(big.read_bytes()).hexdigest()
        # Capped at 16 MiB/s so that the upload is surely in flight when the stack goes down.
        agent = run_agent(stack, device, folder, "--max-rate", str(16 << 20))
        with httpx.Client(base_url=stack.base_url, timeout=30) as client:
            event = wait_announced(client, headers, device, 1, agent)["big.mp4"]
            r = client.post(f"/api/gallery/{device}/pull/{event['id']}", headers=headers)
            assert r.status_code == 200 and r.json()["success"] is True, r.text

        def staged_bytes() -> int:
            return sum(p.stat().st_size for p in (root / "data" / "staging").iterdir() if p.is_file())

        wait_for(lambda: staged_bytes() > (4 << 20), 15, "the upload to be under way")
        ports = stack.ports
        stop_stack(stack)
        assert stack.process.returncode == 0, stack.log()
        stack = start_stack(root / "data", root / "gallery-2.log", ports=ports)

        with httpx.Client(base_url=stack.base_url, timeout=30) as client:
            stored = wait_stored(client, headers, device, event["id"], 45, agent)
            assert stored["sha256"] == digest and stored["size"] == 64 << 20
            assert hashlib.sha256(content(client, headers, device, event["id"])).hexdigest() == digest
            assert [e["id"] for e in list_events(client, headers, device)] == [event["id"]]
        assert command_count(root / "data", event["id"]) == 1
        assert staged_bytes() == 0  # the interrupted upload left nothing behind
        assert "retrying" in agent.log() or "reconnecting" in agent.log()
        agent.stop()
    finally:
        stop_stack(stack)


def test_a_command_held_by_a_device_gone_silent_reaches_its_next_connection(auth_headers, mint, tmp_path):
    """Through Envoy: a device's network goes away without a FIN while its channel holds a
    command. Envoy's unanswered PING (GALLERY_KEEPALIVE_SECONDS) ends that stream, and with it the
    server's call, whose connection to Envoy is alive and well; the device's next connection gets
    the command."""
    stack = start_stack(tmp_path / "data", tmp_path / "gallery.log",
                        extra_env={"GALLERY_KEEPALIVE_SECONDS": "2"})
    proxy = SilentNetworkProxy(stack.http_port)
    device, stop = new_device(), threading.Event()
    token = [("authorization", f"Bearer {mint(devices=[device], scope='gallery:device')}")]

    def requests() -> Iterator[dpb.ConnectRequest]:
        yield dpb.ConnectRequest(hello=dpb.DeviceHello(device=device))
        stop.wait(60)

    silent_channel = grpc.insecure_channel(f"127.0.0.1:{proxy.port}")
    channel = grpc.insecure_channel(stack.envoy_grpc_address)
    try:
        [announced] = device_pb2_grpc.DeviceServiceStub(channel).AnnounceEvents(
            dpb.AnnounceEventsRequest(device=device, events=[
                dpb.AnnouncedEvent(device_key="a.mp4", name="a.mp4", size=3)]), metadata=token).results
        old = device_pb2_grpc.DeviceServiceStub(silent_channel).Connect(requests(), metadata=token)
        assert next(old).HasField("heartbeat")
        proxy.go_silent()
        with httpx.Client(base_url=stack.base_url, timeout=30) as http:
            r = http.post(f"/api/gallery/{device}/pull/{announced.event_id}", headers=auth_headers())
            assert r.status_code == 200, r.text
            wait_for(lambda: get_event(http, auth_headers(), device, announced.event_id)["pull"]["state"]
                     == "delivered", 10, "the silent connection to take the command")
        fresh = device_pb2_grpc.DeviceServiceStub(channel).Connect(requests(), metadata=token)
        got: list[dpb.Command] = []

        def read() -> None:
            with contextlib.suppress(grpc.RpcError):
                for message in fresh:
                    if message.HasField("command"):
                        got.append(message.command)
                        return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(20)
        assert [c.upload_event.event_id for c in got] == [announced.event_id], stack.log()[-3000:]
    finally:
        stop.set()
        silent_channel.close()
        channel.close()
        proxy.close()
        stop_stack(stack)


def test_rest_requests_may_stay_quiet_past_30_seconds(stack, auth_headers, mint):
    """REST requests first match Envoy's catch-all route, whose 30 s idle timeout then stayed with
    them after the transcoder re-routed them: a pull waiting ?wait=32 answered 504, and a REST
    upload whose client paused 32 s (well within GALLERY_UPLOAD_IDLE_SECONDS) 408. Both run
    together here, so the test takes ~33 s, not 65."""
    device = new_device()
    token = [("authorization", f"Bearer {mint(devices=[device], scope='gallery:device')}")]
    with grpc.insecure_channel(stack.envoy_grpc_address) as channel:
        [announced] = device_pb2_grpc.DeviceServiceStub(channel).AnnounceEvents(
            dpb.AnnounceEventsRequest(device=device, events=[
                dpb.AnnouncedEvent(device_key="a.mp4", name="a.mp4", size=3)]), metadata=token).results
    headers = auth_headers()
    boundary = "quiet-client"
    content = os.urandom(200_000)
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nslow.mp4\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"event\"; filename=\"slow.mp4\"\r\n"
            f"Content-Type: video/mp4\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()

    def quiet_body() -> Iterator[bytes]:
        yield body[:100_000]
        time.sleep(32)
        yield body[100_000:]

    answers: dict[str, httpx.Response] = {}

    def pull() -> None:
        with httpx.Client(base_url=stack.base_url, timeout=60) as http:
            answers["pull"] = http.post(f"/api/gallery/{device}/pull/{announced.event_id}?wait=32",
                                        headers=headers)

    puller = threading.Thread(target=pull)
    puller.start()
    with httpx.Client(base_url=stack.base_url, timeout=60) as http:
        answers["upload"] = http.post(
            f"/api/gallery/{device}/upload", content=quiet_body(),
            headers={**headers, "Content-Type": f"multipart/form-data; boundary={boundary}",
                     "Content-Length": str(len(body))})
        puller.join(60)
        assert answers["upload"].status_code == 200, answers["upload"].text
        stored = get_event(http, headers, device, answers["upload"].json()["eventId"])
        assert stored["sha256"] == hashlib.sha256(content).hexdigest()
    assert answers["pull"].status_code == 200, answers["pull"].text
    assert answers["pull"].json()["pull"]["state"] == "pending"


def test_a_capture_deleted_over_rest_is_answered_deleted_and_new_content_is_a_new_event(
    stack, http, auth_headers, mint, envoy_channel
):
    """Through Envoy: a device's file announced, its event deleted by a REST client, the same
    file announced again (as the agent does after every reconnect), then new content under the
    same name (a reused file name)."""
    device = new_device()
    token = [("authorization", f"Bearer {mint(devices=[device], scope='gallery:device')}")]
    devices = device_pb2_grpc.DeviceServiceStub(envoy_channel)

    def announce(content: bytes) -> dpb.AnnouncedEventResult:
        [result] = devices.AnnounceEvents(dpb.AnnounceEventsRequest(device=device, events=[
            dpb.AnnouncedEvent(device_key="DCIM/IMG_0001.JPG", name="IMG_0001.JPG", size=len(content),
                               sha256=hashlib.sha256(content).hexdigest())]), metadata=token).results
        return result

    first = announce(b"the first photo")
    r = http.delete(f"/api/gallery/{device}/events/{first.event_id}", headers=auth_headers())
    assert r.status_code == 200, r.text
    again = announce(b"the first photo")
    assert (again.event_id, again.state) == (first.event_id, "deleted")
    assert list_events(http, auth_headers(), device) == []
    second = announce(b"a new photo under the same name")
    assert second.state == "on_device" and second.event_id != first.event_id
    listed = list_events(http, auth_headers(), device)
    assert [(e["id"], e["size"]) for e in listed] == [(second.event_id, len(b"a new photo under the same name"))]


def test_an_announcement_as_large_as_the_agents_batches_passes_envoy(stack, http, auth_headers, mint, envoy_channel):
    """Envoy passes whole requests on only (its buffer filter, 3 MiB + 64 KiB by default): a
    device's AnnounceEvents has a route of its own, up to the gRPC server's 8 MiB, and the agent's
    batches (agent.py: 4 MiB) pass."""
    device = new_device()
    token = [("authorization", f"Bearer {mint(devices=[device], scope=auth.DEVICE)}")]
    thumbnail = b"\xff\xd8\xff" + os.urandom(20 << 10)
    events = [dpb.AnnouncedEvent(device_key=f"dcim/{i:04}.jpg", name=f"{i:04}.jpg", size=1000, thumbnail=thumbnail)
              for i in range(200)]
    request = dpb.AnnounceEventsRequest(device=device, events=events)
    assert request.ByteSize() > 4_000_000  # the agent's 4 MiB and some
    results = device_pb2_grpc.DeviceServiceStub(envoy_channel).AnnounceEvents(
        request, metadata=token, timeout=60).results
    assert [r.state for r in results] == ["on_device"] * 200
    r = http.get(f"/api/gallery/{device}/stats", headers=auth_headers())
    assert r.json()["total_events"] == 200
