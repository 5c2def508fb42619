"""Authorization on every RPC, walked from the service descriptors: a new RPC without an entry in
REQUESTS fails this suite.

For every method of GalleryService and DeviceService, natively through Envoy and, when it has a
REST route, over REST through Envoy:
- no token: UNAUTHENTICATED / 401 TOKEN_MISSING;
- a token for another device: PERMISSION_DENIED / 403 DEVICE_NOT_ALLOWED, and the very same answer
  whether or not the event (or upload session) named exists: no existence oracle across devices;
- a token for the device without the method's scope: PERMISSION_DENIED / 403 SCOPE_MISSING.
PutSignedUpload and GetSignedUploadStatus carry their own proof (the signed URL) and are checked for
that instead.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable, Iterator

import grpc
import httpx
import pytest
from google.api import annotations_pb2
from google.api.httpbody_pb2 import HttpBody
from google.protobuf import descriptor, message_factory

from gallery.v1 import admin_pb2, device_pb2, gallery_pb2, gallery_pb2_grpc
from gallery.v1 import device_pb2 as dpb
from gallery.v1 import gallery_pb2 as pb
from gallery_server import auth, cli, validation

from ..conftest import JWT_SECRET, rich_error
from .conftest import Stack, running_stack

TIMEOUT = 20
SERVICES = (
    *gallery_pb2.DESCRIPTOR.services_by_name.values(),
    *device_pb2.DESCRIPTOR.services_by_name.values(),
    *admin_pb2.DESCRIPTOR.services_by_name.values(),
)
# Operators' service: not about a device, so it is walked for its scope alone.
ADMIN_SERVICE = "GalleryAdminService"
ADMIN_REQUESTS: dict[str, Callable[[], list]] = {
    "GetAdminStatus": lambda: [admin_pb2.GetAdminStatusRequest()],
}
ALL_SCOPES = {auth.READ, auth.WRITE, auth.DEVICE}
PUBLIC = {"PutSignedUpload", "GetSignedUploadStatus"}
BOUNDARY = "authz-boundary"
FORM = (
    f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\na.txt\r\n"
    f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"event\"; filename=\"a.txt\"\r\n\r\n"
    f"hello\r\n--{BOUNDARY}--\r\n"
).encode()

# method -> (scope it needs, requests for (device, event_id, upload_id)). A streaming method gets
# the whole list; a unary one the single message. A method that ALSO_TAKES other scopes is
# refused, naming its first, to a token with none of them.
Build = Callable[[str, str, str], list]
ALSO_TAKES = {"GetDevicePaths": {auth.WRITE, auth.DEVICE}}  # where to write, for a token that may store
REQUESTS: dict[str, tuple[str, Build]] = {
    "GetDevicePaths": (auth.READ, lambda d, e, u: [pb.GetDevicePathsRequest(device=d)]),
    "ListEvents": (auth.READ, lambda d, e, u: [pb.ListEventsRequest(device=d)]),
    "ListEventsJson": (auth.READ, lambda d, e, u: [pb.ListEventsRequest(device=d)]),
    "GetEvent": (auth.READ, lambda d, e, u: [pb.GetEventRequest(device=d, event_id=e)]),
    "UploadEvent": (auth.WRITE, lambda d, e, u: [
        pb.UploadEventRequest(header=pb.UploadHeader(device=d, name="a.txt")),
        pb.UploadEventRequest(media_chunk=b"hello"),
        pb.UploadEventRequest(finish=pb.UploadFinish()),
    ]),
    "UploadEventForm": (auth.WRITE, lambda d, e, u: [pb.UploadEventFormRequest(
        device=d, http_body=HttpBody(content_type=f"multipart/form-data; boundary={BOUNDARY}",
                                     data=FORM))]),
    "CreateUploadUrl": (auth.WRITE, lambda d, e, u: [pb.CreateUploadUrlRequest(device=d, filename="a.jpg")]),
    "GetStats": (auth.READ, lambda d, e, u: [pb.GetStatsRequest(device=d)]),
    "PullEvent": (auth.WRITE, lambda d, e, u: [pb.PullEventRequest(device=d, event_id=e)]),
    "GetEventContent": (auth.READ, lambda d, e, u: [pb.GetEventContentRequest(device=d, event_id=e)]),
    "GetEventThumbnail": (auth.READ, lambda d, e, u: [pb.GetEventThumbnailRequest(device=d, event_id=e)]),
    "ReadEventContent": (auth.READ, lambda d, e, u: [pb.ReadEventContentRequest(device=d, event_id=e)]),
    "DeleteEvent": (auth.WRITE, lambda d, e, u: [pb.DeleteEventRequest(device=d, event_id=e)]),
    "StartUpload": (auth.WRITE, lambda d, e, u: [pb.StartUploadRequest(
        device=d, name="a.bin", size=5, upload_id=u)]),
    "WriteUpload": (auth.WRITE, lambda d, e, u: [pb.WriteUploadRequest(
        device=d, upload_id=u, write_offset=0, data=b"hello", finish_write=True)]),
    "QueryUpload": (auth.WRITE, lambda d, e, u: [pb.QueryUploadRequest(device=d, upload_id=u)]),
    "FindExistingChecksums": (auth.READ, lambda d, e, u: [pb.FindExistingChecksumsRequest(
        device=d, sha256s=[hashlib.sha256(b"hello").hexdigest()])]),
    "Connect": (auth.DEVICE, lambda d, e, u: [dpb.ConnectRequest(hello=dpb.DeviceHello(device=d))]),
    "AnnounceEvents": (auth.DEVICE, lambda d, e, u: [dpb.AnnounceEventsRequest(
        device=d, events=[dpb.AnnouncedEvent(device_key="k1", name="a.jpg", size=5)])]),
}
METHODS = [(s, m) for s in SERVICES if s.name != ADMIN_SERVICE for m in s.methods]
ADMIN_METHODS = [(s, m) for s in SERVICES if s.name == ADMIN_SERVICE for m in s.methods]
REST_METHODS = [
    (s, m) for s, m in METHODS
    if m.GetOptions().HasExtension(annotations_pb2.http) and m.name not in PUBLIC
]


def _id(item: tuple[descriptor.ServiceDescriptor, descriptor.MethodDescriptor]) -> str:
    return item[1].name


def test_every_rpc_has_an_authorization_case() -> None:
    assert {s.name for s in SERVICES} == {"GalleryService", "DeviceService", ADMIN_SERVICE}
    assert {m.name for _, m in METHODS} == set(REQUESTS) | PUBLIC
    assert {m.name for _, m in ADMIN_METHODS} == set(ADMIN_REQUESTS)


@pytest.fixture(scope="module")
def authz_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # Its own stack: the upload session made below would stay in the shared stack's staging/,
    # which other tests expect empty.
    root = tmp_path_factory.mktemp("authz")
    with running_stack(root, {"GALLERY_MAKE_THUMBNAILS": "false"}) as stack:
        yield stack


@pytest.fixture
def http(authz_stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=authz_stack.base_url, timeout=TIMEOUT) as client:
        yield client


@pytest.fixture
def envoy_channel(authz_stack: Stack) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(authz_stack.envoy_grpc_address) as channel:
        yield channel


@pytest.fixture(scope="module")
def target(authz_stack: Stack) -> dict[str, str]:
    """A device with a real event and a real upload session, named by the other tests."""
    device = f"authz-{uuid.uuid4().hex[:8]}"
    owner = auth.mint(JWT_SECRET, subject="owner", devices=[device], scope=" ".join(ALL_SCOPES))
    headers = {"Authorization": f"Bearer {owner}"}
    with httpx.Client(base_url=authz_stack.base_url, timeout=TIMEOUT) as client:
        r = client.post(f"/api/gallery/{device}/upload", headers=headers,
                        files={"event": ("a.txt", b"hello")}, data={"name": "a.txt"})
        assert r.status_code == 200, r.text
        event_id = r.json()["eventId"]
    upload_id = "authz-" + uuid.uuid4().hex
    with grpc.insecure_channel(authz_stack.envoy_grpc_address) as channel:
        call = _multicallable(channel, gallery_pb2.DESCRIPTOR.services_by_name["GalleryService"]
                              .methods_by_name["StartUpload"])
        call(pb.StartUploadRequest(device=device, name="b.bin", size=5, upload_id=upload_id),
             metadata=[("authorization", f"Bearer {owner}")], timeout=TIMEOUT)
    return {"device": device, "event_id": event_id, "upload_id": upload_id}


def _token(devices: list[str], scopes: set[str]) -> str:
    return auth.mint(JWT_SECRET, subject="someone", devices=devices, scope=" ".join(sorted(scopes)))


def _lacking(device: str, method: str) -> str:
    """A token for `device` with every scope but those `method` takes (none left: the admin's)."""
    scope, _ = REQUESTS[method]
    return _token([device], ALL_SCOPES - {scope} - ALSO_TAKES.get(method, set()) or {auth.ADMIN})


def _multicallable(channel: grpc.Channel, method: descriptor.MethodDescriptor) -> Callable:
    path = f"/{method.containing_service.full_name}/{method.name}"
    serializer = message_factory.GetMessageClass(method.input_type).SerializeToString
    kind = {
        (False, False): channel.unary_unary, (False, True): channel.unary_stream,
        (True, False): channel.stream_unary, (True, True): channel.stream_stream,
    }[(method.client_streaming, method.server_streaming)]
    return kind(path, request_serializer=serializer, response_deserializer=None)


def _native_error(
    channel: grpc.Channel, method: descriptor.MethodDescriptor, requests: list, token: str | None
) -> tuple[grpc.StatusCode, str, str, dict[str, str]]:
    """(code, message, ErrorInfo reason, ErrorInfo metadata) of a call that must fail."""
    call = _multicallable(channel, method)
    request = iter(requests) if method.client_streaming else requests[0]
    metadata = [("authorization", f"Bearer {token}")] if token else []
    with pytest.raises(grpc.RpcError) as info:
        answer = call(request, metadata=metadata, timeout=TIMEOUT)
        if method.server_streaming:
            list(answer)
    info_, _ = rich_error(info.value)
    return info.value.code(), info.value.details(), info_.reason, dict(info_.metadata)


@pytest.mark.parametrize("item", METHODS, ids=_id)
def test_native_rpc_authorization(item, target, envoy_channel) -> None:  # type: ignore[no-untyped-def]
    _, method = item
    if method.name in PUBLIC:
        pytest.skip("authorized by its signed URL: see test_signed_upload_authorization")
    scope, build = REQUESTS[method.name]
    device, event_id, upload_id = target["device"], target["event_id"], target["upload_id"]
    code, _, reason, _ = _native_error(envoy_channel, method, build(device, event_id, upload_id), None)
    assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_MISSING")

    other = _token(["someone-else"], ALL_SCOPES)
    existing = _native_error(envoy_channel, method, build(device, event_id, upload_id), other)
    missing = _native_error(
        envoy_channel, method, build(device, validation.new_event_id(), "authz-" + uuid.uuid4().hex),
        other,
    )
    assert existing[:3] == (grpc.StatusCode.PERMISSION_DENIED, existing[1], "DEVICE_NOT_ALLOWED")
    assert existing == missing  # code, message, reason and metadata: nothing tells them apart

    lacking = _lacking(device, method.name)
    code, _, reason, metadata = _native_error(envoy_channel, method, build(device, event_id, upload_id), lacking)
    assert (code, reason, metadata) == (grpc.StatusCode.PERMISSION_DENIED, "SCOPE_MISSING", {"scope": scope})


def _rest_request(method: descriptor.MethodDescriptor, device: str, event_id: str) -> tuple[str, str, dict]:
    rule = method.GetOptions().Extensions[annotations_pb2.http]
    verb = rule.WhichOneof("pattern")
    path = getattr(rule, verb).replace("{device}", device).replace("{event_id}", event_id)
    kwargs: dict = {}
    if rule.body == "http_body":
        kwargs = {"content": FORM, "headers": {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}}
    elif rule.body == "*":
        kwargs = {"json": {"sha256s": [hashlib.sha256(b"hello").hexdigest()]}}
    if method.name == "CreateUploadUrl":
        path += "?filename=a.jpg"
    return verb.upper(), path, kwargs


def _rest_error(http: httpx.Client, method, device: str, event_id: str, token: str | None):  # type: ignore[no-untyped-def]
    verb, path, kwargs = _rest_request(method, device, event_id)
    headers = {**kwargs.pop("headers", {})}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    r = http.request(verb, path, headers=headers, **kwargs)
    assert r.headers["content-type"].startswith("application/json"), (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"code", "message", "details"}
    return r.status_code, body


@pytest.mark.parametrize("item", REST_METHODS, ids=_id)
def test_rest_route_authorization(item, target, http) -> None:  # type: ignore[no-untyped-def]
    _, method = item
    scope, _ = REQUESTS[method.name]
    device, event_id = target["device"], target["event_id"]
    status, body = _rest_error(http, method, device, event_id, None)
    assert (status, body["details"][0]["reason"]) == (401, "TOKEN_MISSING")

    other = _token(["someone-else"], ALL_SCOPES)
    existing = _rest_error(http, method, device, event_id, other)
    missing = _rest_error(http, method, device, validation.new_event_id(), other)
    assert (existing[0], existing[1]["details"][0]["reason"]) == (403, "DEVICE_NOT_ALLOWED")
    assert existing == missing

    status, body = _rest_error(http, method, device, event_id, _lacking(device, method.name))
    assert (status, body["details"][0]["reason"], body["details"][0]["metadata"]) == (
        403, "SCOPE_MISSING", {"scope": scope}
    )


@pytest.mark.parametrize("item", ADMIN_METHODS, ids=_id)
def test_admin_rpc_authorization(item, envoy_channel, http) -> None:  # type: ignore[no-untyped-def]
    """Only gallery:admin opens the admin service, natively and over REST: every other scope on
    every device is refused."""
    _, method = item
    requests = ADMIN_REQUESTS[method.name]()
    code, _, reason, _ = _native_error(envoy_channel, method, requests, None)
    assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_MISSING")
    everything_else = _token(["*"], ALL_SCOPES)
    code, _, reason, metadata = _native_error(envoy_channel, method, requests, everything_else)
    assert (code, reason, metadata) == (grpc.StatusCode.PERMISSION_DENIED, "SCOPE_MISSING", {"scope": auth.ADMIN})
    verb, path, _ = _rest_request(method, "", "")
    r = http.request(verb, path)
    assert (r.status_code, r.json()["details"][0]["reason"]) == (401, "TOKEN_MISSING")
    r = http.request(verb, path, headers={"Authorization": f"Bearer {everything_else}"})
    assert (r.status_code, r.json()["details"][0]["reason"]) == (403, "SCOPE_MISSING")
    # The status covers every device: admin with a token for some devices only is refused.
    some = _token(["cam1"], {auth.ADMIN})
    r = http.request(verb, path, headers={"Authorization": f"Bearer {some}"})
    assert (r.status_code, r.json()["details"][0]["reason"]) == (403, "DEVICE_NOT_ALLOWED")
    admin = _token(["*"], {auth.ADMIN})
    r = http.request(verb, path, headers={"Authorization": f"Bearer {admin}"})
    assert r.status_code == 200, r.text


def test_signed_upload_authorization(target, http) -> None:  # type: ignore[no-untyped-def]
    device = target["device"]
    owner = _token([device], ALL_SCOPES)
    r = http.get(f"/api/gallery/{device}/upload-url?filename=x.jpg",
                 headers={"Authorization": f"Bearer {owner}"})
    assert r.status_code == 200, r.text
    token = r.json()["upload_url"].rsplit("/", 1)[1]
    # Another device's path with this device's URL token: refused, whatever bearer is sent.
    r = http.put(f"/api/gallery/someone-else/upload/{token}", content=b"x",
                 headers={"Authorization": f"Bearer {_token(['someone-else'], ALL_SCOPES)}"})
    assert (r.status_code, r.json()["details"][0]["reason"]) == (403, "URL_DEVICE_MISMATCH")
    # A bearer token is no substitute for the URL's signature.
    # One character of the signature, away from its last (whose spare bits a lax decoder ignores).
    forged = token[:-5] + ("B" if token[-5] == "A" else "A") + token[-4:]
    r = http.put(f"/api/gallery/{device}/upload/{forged}", content=b"x",
                 headers={"Authorization": f"Bearer {owner}"})
    assert (r.status_code, r.json()["details"][0]["reason"]) == (403, "URL_SIGNATURE_INVALID")
    # Its status is the URL's too: another device's path, or a forged token, learn nothing.
    r = http.get(f"/api/gallery/someone-else/upload/{token}")
    assert (r.status_code, r.json()["details"][0]["reason"]) == (403, "URL_DEVICE_MISMATCH")
    r = http.get(f"/api/gallery/{device}/upload/{forged}", headers={"Authorization": f"Bearer {owner}"})
    assert (r.status_code, r.json()["details"][0]["reason"]) == (403, "URL_SIGNATURE_INVALID")
    data = json.loads(http.get(f"/api/gallery/{device}/events",
                               headers={"Authorization": f"Bearer {owner}"}).text)
    assert [e["id"] for e in data] == [target["event_id"]]  # nothing stored by either PUT


def test_a_token_naming_a_fleet_is_accepted_every_time(stack: Stack, envoy_channel) -> None:  # type: ignore[no-untyped-def]
    """The largest token `gallery token` mints (cli.MAX_TOKEN_BYTES, ~580 devices here), and a
    client may add a large header of its own: below Envoy's 32 KiB every request is answered (grpc's
    own 8 KiB soft and 16 KiB hard limits answered some, then all, with RESOURCE_EXHAUSTED: a 429
    clients retry for ever)."""
    fleet = ["cam1"]
    while len(token := auth.mint(JWT_SECRET, subject="ops", devices=[*fleet, "fleet-device-next"],
                                 scope=auth.READ, ttl_seconds=600)) <= cli.MAX_TOKEN_BYTES:
        fleet.append(f"fleet-device-{len(fleet):05d}")
    token = auth.mint(JWT_SECRET, subject="ops", devices=fleet, scope=auth.READ, ttl_seconds=600)
    assert cli.MAX_TOKEN_BYTES - 100 < len(token) <= cli.MAX_TOKEN_BYTES
    headers = {"Authorization": f"Bearer {token}"}
    note = "n" * 12_000  # with the token, ~28 KiB of headers
    with httpx.Client(base_url=stack.base_url, timeout=30) as http:
        codes = [http.get("/api/gallery/cam1/stats", headers=headers).status_code for _ in range(20)]
        assert codes == [200] * 20
        r = http.get("/api/gallery/cam1/stats", headers={**headers, "x-client-note": note})
        assert r.status_code == 200, r.text
    metadata = [("authorization", f"Bearer {token}"), ("x-client-note", note)]
    with grpc.insecure_channel(stack.grpc_address) as direct:
        for channel in (envoy_channel, direct):
            stats = gallery_pb2_grpc.GalleryServiceStub(channel).GetStats(
                pb.GetStatsRequest(device="cam1"), metadata=metadata, timeout=30)
            assert stats.total_events >= 0
