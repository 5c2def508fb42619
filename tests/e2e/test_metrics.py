"""What a replica tells its operator, on the real stack: its Prometheus metrics
(GALLERY_METRICS_ADDRESS), REST calls through Envoy counted as the gRPC calls they become and what
the server bounds read as it stands, and the shares of its threads, logged at start."""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
import os
import pathlib
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gallery.v1 import device_pb2 as dpb
from gallery.v1 import device_pb2_grpc, gallery_pb2_grpc
from gallery.v1 import gallery_pb2 as pb
from gallery_server import auth
from gallery_server.local_stack import Stack, free_ports

from ..conftest import JWT_SECRET, new_device, wait_until
from .conftest import log_entries, running_stack

SERVICE = "gallery.v1.GalleryService"


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, str]]:
    root = tmp_path_factory.mktemp("metrics")
    [port] = free_ports(1)
    with running_stack(root, {
        "GALLERY_METRICS_ADDRESS": f"127.0.0.1:{port}", "GALLERY_MAKE_THUMBNAILS": "false",
    }) as stack:
        yield stack, f"http://127.0.0.1:{port}/metrics"


def scrape(url: str) -> Callable[..., float]:
    """The scraped samples, as value(name, **labels) (0 for a series not there yet)."""
    r = httpx.get(url, timeout=10)
    assert r.status_code == 200, r.text
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(r.text) for sample in family.samples
    }
    return lambda name, **labels: samples.get((name, tuple(sorted(labels.items()))), 0.0)


def bearer(device: str, scope: str = f"{auth.READ} {auth.WRITE}") -> str:
    return auth.mint(JWT_SECRET, subject="ops", devices=[device], scope=scope)


def test_rest_calls_are_counted_by_method_and_code(measured: tuple[Stack, str]) -> None:
    stack, url = measured
    stats = {"grpc_type": "unary", "grpc_service": SERVICE, "grpc_method": "GetStats"}
    before = scrape(url)
    device = new_device()
    with httpx.Client(base_url=stack.base_url, timeout=30) as http:
        for _ in range(3):
            assert http.get(f"/api/gallery/{device}/stats",
                            headers={"Authorization": f"Bearer {bearer(device)}"}).status_code == 200
        assert http.get(f"/api/gallery/{device}/stats").status_code == 401
    after = scrape(url)
    for name, labels, more in (
        ("grpc_server_started_total", stats, 4),
        ("grpc_server_handled_total", {**stats, "grpc_code": "OK"}, 3),
        ("grpc_server_handled_total", {**stats, "grpc_code": "Unauthenticated"}, 1),
        ("grpc_server_handling_seconds_count", stats, 4),
        ("gallery_refused_total", {"grpc_service": SERVICE, "grpc_method": "GetStats", "reason": "TOKEN_MISSING"}, 1),
    ):
        assert after(name, **labels) - before(name, **labels) == more, (name, labels)
    assert after("gallery_data_free_bytes") > 0
    assert after("gallery_uploads_limit") == 48  # GALLERY_MAX_UPLOADS_TOTAL's default


def test_uploads_and_device_channels_are_read_as_they_stand(measured: tuple[Stack, str]) -> None:
    stack, url = measured
    device, release = new_device(), threading.Event()

    def upload() -> Iterator[pb.UploadEventRequest]:
        yield pb.UploadEventRequest(header=pb.UploadHeader(device=device, name="clip.mp4", size=6))
        yield pb.UploadEventRequest(media_chunk=b"abc")
        release.wait(30)  # in flight until the test has looked
        yield pb.UploadEventRequest(media_chunk=b"def")
        yield pb.UploadEventRequest(finish=pb.UploadFinish())

    def hello() -> Iterator[dpb.ConnectRequest]:
        yield dpb.ConnectRequest(hello=dpb.DeviceHello(device=device))
        release.wait(30)

    def silent() -> Iterator[pb.UploadEventRequest]:
        release.wait(30)  # no first message yet: the limit counts it all the same
        yield from ()

    with grpc.insecure_channel(stack.envoy_grpc_address) as channel:
        uploading = gallery_pb2_grpc.GalleryServiceStub(channel).UploadEvent.future(
            upload(), metadata=[("authorization", f"Bearer {bearer(device)}")], timeout=60)
        connected = device_pb2_grpc.DeviceServiceStub(channel).Connect(
            hello(), metadata=[("authorization", f"Bearer {bearer(device, auth.DEVICE)}")], timeout=60)
        waiting = gallery_pb2_grpc.GalleryServiceStub(channel).UploadEvent.future(
            silent(), metadata=[("authorization", f"Bearer {bearer(device)}")], timeout=60)
        try:
            assert wait_until(lambda: scrape(url)("gallery_uploads_in_flight") == 1, seconds=15)
            assert wait_until(lambda: scrape(url)("gallery_uploads_awaiting_first_message") == 1, seconds=15)
            assert scrape(url)("gallery_uploads_counted_by_token") == 2  # the device's token: both
            assert wait_until(lambda: scrape(url)("gallery_device_channels_open") == 1, seconds=15)
            assert scrape(url)("gallery_device_channels_limit") > 0
        finally:
            release.set()
            connected.cancel()
        assert uploading.result().success is True
        with pytest.raises(grpc.RpcError):
            waiting.result()  # it ended without a message
    assert wait_until(lambda: scrape(url)("gallery_uploads_in_flight") == 0, seconds=15)
    assert wait_until(lambda: scrape(url)("gallery_uploads_awaiting_first_message") == 0, seconds=15)
    assert wait_until(lambda: scrape(url)("gallery_uploads_counted_by_token") == 0, seconds=15)
    permits = scrape(url)("gallery_upload_receive_permits")
    assert permits == 16  # GALLERY_UPLOAD_MESSAGES_IN_FLIGHT's default
    assert wait_until(lambda: scrape(url)("gallery_upload_receive_permits_free") == permits, seconds=15)
    assert scrape(url)("gallery_upload_streams_waiting_for_a_permit") == 0
    assert wait_until(lambda: scrape(url)("gallery_device_channels_open") == 0, seconds=15)
    handled = scrape(url)("grpc_server_handled_total", grpc_type="client_stream", grpc_service=SERVICE,
                          grpc_method="UploadEvent", grpc_code="OK")
    assert handled == 1
    # The channel its device left counts as Canceled, not as a success, and the log says it went.
    connect = {"grpc_type": "bidi_stream", "grpc_service": "gallery.v1.DeviceService", "grpc_method": "Connect"}
    assert wait_until(lambda: scrape(url)("grpc_server_handled_total", **connect, grpc_code="Canceled") == 1)
    assert scrape(url)("grpc_server_handled_total", **connect, grpc_code="OK") == 0
    [gone] = [e for e in log_entries(stack) if e.get("message") == "device disconnected" and e.get("device") == device]
    [line] = [e for e in log_entries(stack) if e.get("message") == "rpc" and e.get("request_id") == gone["request_id"]]
    assert (line["method"], line["code"], line["device"]) == ("/gallery.v1.DeviceService/Connect", "CANCELLED", device)
    assert isinstance(gone["connected_seconds"], float)


def test_listing_pages_are_counted_as_kept_read_or_not_modified(measured: tuple[Stack, str]) -> None:
    stack, url = measured
    device = new_device()
    before = scrape(url)
    with httpx.Client(base_url=stack.base_url, timeout=30,
                      headers={"Authorization": f"Bearer {bearer(device)}"}) as http:
        for _ in range(3):
            tag = http.get(f"/api/gallery/{device}/events").headers["etag"]
        assert http.get(f"/api/gallery/{device}/events", headers={"If-None-Match": tag}).status_code == 304
    after = scrape(url)
    assert after("gallery_listing_pages_served_kept_total") - before("gallery_listing_pages_served_kept_total") == 2
    assert after("gallery_listing_pages_read_total") - before("gallery_listing_pages_read_total") == 1
    assert after("gallery_listing_pages_not_modified_total") - before("gallery_listing_pages_not_modified_total") == 1
    assert after("gallery_listing_kept_bytes") > 0
    assert after("gallery_listing_kept_bytes_limit") == 8 << 20  # GALLERY_LIST_CACHE_BYTES' default


def test_an_answer_past_its_clients_deadline_counts_as_deadline_exceeded(measured: tuple[Stack, str]) -> None:
    """A pull that waits longer than its caller's deadline: the wait ends when the client goes,
    and the call is recorded as the client saw it, not as OK."""
    stack, url = measured
    device = new_device()
    with grpc.insecure_channel(stack.envoy_grpc_address) as channel:
        [announced] = device_pb2_grpc.DeviceServiceStub(channel).AnnounceEvents(
            dpb.AnnounceEventsRequest(device=device, events=[
                dpb.AnnouncedEvent(device_key="k1", name="a.jpg", size=5)]),
            metadata=[("authorization", f"Bearer {bearer(device, auth.DEVICE)}")], timeout=30).results
        with pytest.raises(grpc.RpcError) as late:
            gallery_pb2_grpc.GalleryServiceStub(channel).PullEvent(
                pb.PullEventRequest(device=device, event_id=announced.event_id, wait=30),
                metadata=[("authorization", f"Bearer {bearer(device)}")], timeout=1)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    pull = {"grpc_type": "unary", "grpc_service": SERVICE, "grpc_method": "PullEvent"}
    assert wait_until(lambda: scrape(url)("grpc_server_handled_total", **pull, grpc_code="DeadlineExceeded") == 1)
    assert scrape(url)("grpc_server_handled_total", **pull, grpc_code="OK") == 0


def test_what_an_operator_is_paged_for_is_scraped(measured: tuple[Stack, str]) -> None:
    """The process (memory against README's budget), the version, the headroom and quota an
    alert compares with, the database, and what the start-up reconciliation found."""
    stack, url = measured
    assert wait_until(lambda: scrape(url)("gallery_reconcile_last_finished_timestamp_seconds") > 0, seconds=30)
    value = scrape(url)
    assert 20 * 2 ** 20 < value("process_resident_memory_bytes") < 1024 * 2 ** 20
    assert value("process_open_fds") > 0 and value("process_start_time_seconds") > 0
    assert value("gallery_build_info", version=importlib.metadata.version("gallery")) == 1
    assert value("gallery_data_min_free_bytes") == 1 << 30  # GALLERY_MIN_FREE_BYTES's default
    assert value("gallery_device_quota_bytes") == 0  # no quota set
    assert value("gallery_database_up") == 1
    assert value("gallery_thumbnails_pending") >= 0 and value("gallery_pulls_open") >= 0  # NaN fails
    assert value("gallery_reconcile_missing_media") == value("gallery_reconcile_size_mismatch") == 0
    assert time.time() - 600 < value("gallery_reconcile_last_finished_timestamp_seconds") <= time.time()


def test_the_shared_backlogs_are_scraped(measured: tuple[Stack, str]) -> None:
    """Thumbnails to make (this stack makes none: its queue only grows) and pulls devices still
    owe, as the admin status counts them."""
    stack, url = measured
    device = new_device()
    before = scrape(url)
    with httpx.Client(base_url=stack.base_url, timeout=30) as http:
        r = http.post(f"/api/gallery/{device}/upload", headers={"Authorization": f"Bearer {bearer(device)}"},
                      files={"event": ("a.png", b"\x89PNG\r\n\x1a\n" + bytes(64), "image/png")},
                      data={"name": "a.png"})
        assert r.status_code == 200, r.text
    with grpc.insecure_channel(stack.envoy_grpc_address) as channel:
        [announced] = device_pb2_grpc.DeviceServiceStub(channel).AnnounceEvents(
            dpb.AnnounceEventsRequest(device=device, events=[
                dpb.AnnouncedEvent(device_key="k1", name="b.jpg", size=5)]),
            metadata=[("authorization", f"Bearer {bearer(device, auth.DEVICE)}")], timeout=30).results
        gallery_pb2_grpc.GalleryServiceStub(channel).PullEvent(
            pb.PullEventRequest(device=device, event_id=announced.event_id),
            metadata=[("authorization", f"Bearer {bearer(device)}")], timeout=30)
    for name in ("gallery_thumbnails_pending", "gallery_pulls_open"):
        assert wait_until(lambda name=name: scrape(url)(name) - before(name) == 1), name
    after = scrape(url)
    status = httpx.get(f"{stack.base_url}/api/admin/status", timeout=30, headers={
        "Authorization": f"Bearer {auth.mint(JWT_SECRET, subject='ops', devices=['*'], scope=auth.ADMIN)}"})
    counts = status.json()["counts"]
    assert (counts["thumbnails_pending"], counts["pulls_open"]) == (
        after("gallery_thumbnails_pending"), after("gallery_pulls_open"))


def test_what_the_drop_folders_hold_back_is_scraped_and_in_the_status(measured: tuple[Stack, str]) -> None:
    """Files a scan leaves in the drop folders (an empty file is never imported; a thumbnail waits
    for media of its stem), with the oldest one's time: what an alert on stuck imports reads."""
    stack, url = measured
    device, admin = new_device(), auth.mint(JWT_SECRET, subject="ops", devices=["*"], scope=auth.ADMIN)
    inbox = stack.data_dir / "gallery" / device / "incoming"
    thumbs = inbox.with_name("thumbnails")
    inbox.mkdir(parents=True)
    thumbs.mkdir()
    (inbox / "placeholder.mp4").touch()
    (thumbs / "later.jpg").write_bytes(b"jpeg")
    os.utime(thumbs / "later.jpg", (1_700_000_000, 1_700_000_000))  # copied with its dates: it arrived now

    def status() -> dict:  # type: ignore[type-arg]
        r = httpx.get(f"{stack.base_url}/api/admin/status", timeout=30, headers={"Authorization": f"Bearer {admin}"})
        assert r.status_code == 200, r.text
        return r.json()["incoming"]  # type: ignore[no-any-return]

    assert wait_until(lambda: scrape(url)("gallery_incoming_files_waiting") == 2, seconds=15)
    value = scrape(url)
    assert value("gallery_incoming_bytes_waiting") == 4
    assert time.time() - 120 < value("gallery_incoming_oldest_waiting_timestamp_seconds") <= time.time()
    assert time.time() - 120 < value("gallery_incoming_last_scan_timestamp_seconds") <= time.time()
    backlog = status()
    assert backlog.keys() == {"files", "bytes", "oldest", "scanned"}
    assert (backlog["files"], backlog["bytes"]) == (2, 4)
    assert backlog["oldest"].endswith("Z") and not backlog["oldest"].startswith("2023")
    assert isinstance(backlog["scanned"], str) and backlog["scanned"].endswith("Z")

    (inbox / "placeholder.mp4").unlink()
    (thumbs / "later.jpg").unlink()
    assert wait_until(lambda: scrape(url)("gallery_incoming_files_waiting") == 0, seconds=15)
    assert math.isnan(scrape(url)("gallery_incoming_oldest_waiting_timestamp_seconds"))
    assert status() | {"scanned": ""} == {"files": 0, "bytes": 0, "oldest": "", "scanned": ""}


def test_each_server_logs_what_it_admits_at_once(stack: Stack) -> None:
    """By default (256 workers, 48 uploads): half of the 208 threads left for device channels,
    an eighth each for pull waits, downloads and hellos (threads.py)."""
    [shares] = [entry for entry in log_entries(stack) if entry.get("message") == "thread shares"]
    assert {key: shares[key] for key in ("uploads", "channels", "pull_waits", "downloads", "hellos")} == {
        "uploads": 48, "channels": 104, "pull_waits": 26, "downloads": 26, "hellos": 26,
    }


def test_without_the_setting_no_metrics_port_is_opened(stack: Stack) -> None:
    """The shared stack sets no GALLERY_METRICS_ADDRESS: its server listens on its gRPC port only."""
    assert _listening_ports_of(stack.server_pid) == {stack.grpc_port}


def _listening_ports_of(pid: int) -> set[int]:
    """The TCP ports process `pid` listens on (its sockets' inodes found in /proc/net/tcp{,6})."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[len("socket:["):-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in pathlib.Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports
