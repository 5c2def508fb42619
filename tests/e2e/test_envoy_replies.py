"""Envoy's own answers: a REST client gets the server's error shape, a native client a gRPC status.

The REST requests Envoy refuses before the server sees them are in test_bad_input.py; here, the
answers when no server is up, and that native gRPC calls keep Envoy's gRPC form
(server/gallery_server/envoy_config.py, LOCAL_REPLIES).
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import time
from collections.abc import Callable, Iterator

import grpc
import httpx
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from gallery.v1 import gallery_pb2 as pb
from gallery.v1 import gallery_pb2_grpc
from gallery_server import envoy_config, supervisor
from gallery_server.local_stack import Stack, free_ports


def _assert_status_json(r: httpx.Response, code: int, reason: str) -> None:
    assert r.headers["content-type"] == "application/json", (r.headers, r.content)
    body = r.json()
    assert set(body) == {"code", "message", "details"}, body
    assert (body["code"], type(body["message"])) == (code, str), body
    [info] = body["details"]
    assert info == {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason,
                    "domain": "gallery", "metadata": {}}


@pytest.fixture(scope="module")
def envoy_without_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, str, int, pathlib.Path]]:
    """The real Envoy with the gallery's configuration, its two backends ports nothing listens on;
    (REST base URL, gRPC address, admin port, its output)."""
    root = tmp_path_factory.mktemp("no-server")
    listen, admin, *nothing = free_ports(4)
    config = root / "envoy.yaml"
    config.write_text(envoy_config.render(
        listen=f"127.0.0.1:{listen}", admin_port=admin, backends=[f"127.0.0.1:{port}" for port in nothing],
    ), encoding="utf-8")
    log = (root / "envoy.log").open("wb")
    envoy = subprocess.Popen(
        # Its access log lines every second, as `gallery run`'s (supervisor.envoy_command).
        [supervisor.envoy_binary(), "-c", str(config), "--disable-hot-restart", "--log-level", "warn",
         "--file-flush-interval-msec", "1000"],
        stdout=log, stderr=log,
    )
    try:
        supervisor.wait_envoy_ready(admin, process=envoy)
        yield f"http://127.0.0.1:{listen}", f"127.0.0.1:{listen}", admin, root / "envoy.log"
    finally:
        envoy.terminate()
        envoy.wait(timeout=30)
        log.close()


def test_rest_without_a_server_is_a_503_in_the_servers_error_shape(
    envoy_without_server: tuple[str, str, int, pathlib.Path],
) -> None:
    base_url, _, _, _ = envoy_without_server
    with httpx.Client(base_url=base_url, timeout=30) as http:
        for method, path in (("GET", "/api/gallery/cam1/stats"), ("GET", "/api/gallery/cam1/events"),
                             ("POST", "/api/gallery/cam1/upload")):
            r = http.request(method, path, headers={"Authorization": "Bearer x"})
            assert r.status_code == 503, (path, r.status_code, r.text)
            _assert_status_json(r, 14, "SERVER_UNAVAILABLE")  # UNAVAILABLE: try again later
            assert r.json()["message"], r.text  # Envoy's words on what failed
            assert r.headers["retry-after"] == "1"  # Envoy checks the servers every second
        # HEAD: the same status and headers, no body.
        r = http.head("/api/gallery/cam1/stats")
        assert (r.status_code, r.headers["content-type"], r.content) == (503, "application/json", b"")
        assert r.headers["retry-after"] == "1"


def test_a_503_without_a_server_is_logged_by_envoy(envoy_without_server: tuple[str, str, int, pathlib.Path]) -> None:
    """No server answered it, so only Envoy's line (envoy.yaml, access_log) names its request id."""
    base_url, _, _, output = envoy_without_server
    r = httpx.get(f"{base_url}/api/gallery/cam1/stats", headers={"Authorization": "Bearer x"}, timeout=30)
    assert r.status_code == 503, r.text
    deadline = time.monotonic() + 10  # Envoy writes its lines every second
    while not (found := [line for line in output.read_text().split("\n")[:-1]
                         if line.startswith("{") and r.headers["x-request-id"] in line]):
        assert time.monotonic() < deadline, output.read_text()[-3000:]
        time.sleep(0.05)
    [line] = [json.loads(text) for text in found]
    assert (line["message"], line["http_method"], line["http_status"]) == ("envoy reply", "GET", 503), line
    # No connection yet, or no healthy server once the health checks have failed.
    assert line["details"].startswith(("upstream_reset_before_response_started", "no_healthy_upstream")), line


def test_native_grpc_without_a_server_keeps_a_grpc_status(
    envoy_without_server: tuple[str, str, int, pathlib.Path],
) -> None:
    _, address, _, _ = envoy_without_server
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as caught:
        gallery_pb2_grpc.GalleryServiceStub(channel).GetStats(pb.GetStatsRequest(device="cam1"), timeout=30)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    details = caught.value.details() or ""
    assert not details.startswith("{"), details  # Envoy's words, not a JSON body in grpc-message


def test_a_native_call_envoy_refuses_keeps_a_grpc_status(stack: Stack) -> None:
    """Check is Envoy's question to the server: a client's call of it is answered by Envoy (404,
    which gRPC reads as UNIMPLEMENTED), never in the REST shape."""
    with grpc.insecure_channel(stack.envoy_grpc_address) as channel, pytest.raises(grpc.RpcError) as caught:
        channel.unary_unary("/envoy.service.auth.v3.Authorization/Check")(b"", timeout=30)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with pytest.raises(json.JSONDecodeError):
        json.loads(caught.value.details() or "")


def test_a_native_call_too_large_for_envoy_is_resource_exhausted_with_its_reason(
    stack: Stack, mint: Callable[..., str]
) -> None:
    """Envoy refuses a unary request over its buffer (413): gRPC would read that as UNKNOWN, a
    code no client acts on. It is RESOURCE_EXHAUSTED with the server's error details instead."""
    # Over the buffer's 3 MiB + 64 KiB. Its token is checked first (rpc/token_check.py): while Check
    # ran, Envoy stopped reading at 1 MiB, and under a limit of 1 MiB + 64 KiB a 2 MiB request then
    # waited for its deadline, never refused.
    request = pb.CreateUploadUrlRequest(device="cam1", filename="x" * (4 << 20))
    with grpc.insecure_channel(stack.envoy_grpc_address) as channel, pytest.raises(grpc.RpcError) as caught:
        gallery_pb2_grpc.GalleryServiceStub(channel).CreateUploadUrl(
            request, metadata=[("authorization", f"Bearer {mint(scope='gallery:write')}")], timeout=30)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rpc_status.from_call(caught.value)  # its message agrees with grpc-message
    assert status is not None and status.code == 8
    [detail] = status.details
    info = error_details_pb2.ErrorInfo()
    assert detail.Unpack(info)
    assert (info.reason, info.domain) == ("BODY_TOO_LARGE", "gallery")
    assert status.message == "the request is larger than Envoy takes for this call"
    # Under the limit, past the 1 MiB Envoy reads while Check runs: it reaches the server (its own
    # refusal of a name that long), not the deadline.
    request = pb.CreateUploadUrlRequest(device="cam1", filename="x" * (2 << 20))
    with grpc.insecure_channel(stack.envoy_grpc_address) as channel, pytest.raises(grpc.RpcError) as caught:
        gallery_pb2_grpc.GalleryServiceStub(channel).CreateUploadUrl(
            request, metadata=[("authorization", f"Bearer {mint(scope='gallery:write')}")], timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value


def test_envoys_request_limit_grows_with_the_replicas(
    envoy_without_server: tuple[str, str, int, pathlib.Path],
) -> None:
    """Envoy's default of 1,024 requests in flight is shared by every replica: open streams past
    it (health Watch streams, device channels of a fleet) made Envoy answer 503 to everyone; and
    its default of 3 retries at once left the other calls of a killed replica unretried. Both
    are REQUESTS_PER_BACKEND per replica in all, as Envoy applies them."""
    _, _, admin, _ = envoy_without_server
    clusters = httpx.get(f"http://127.0.0.1:{admin}/clusters", timeout=10).text
    expected = 2 * envoy_config.REQUESTS_PER_BACKEND
    assert f"gallery_grpc::default_priority::max_requests::{expected}" in clusters, clusters[:2000]
    assert f"gallery_grpc::default_priority::max_pending_requests::{expected}" in clusters
    assert f"gallery_grpc::default_priority::max_retries::{expected}" in clusters
