"""Envoy's question before it holds a request's body: does its bearer token verify?

Envoy holds a unary request's body whole before the server sees it (the buffer filter in
envoy/envoy.yaml: grpcio's sync server would give a thread to a client that sends its body
slowly). Without this check a client with no token at all could have Envoy hold up to a MiB per
request, an HTTP/2 connection a hundred of them, and send the last byte never: a thousand such
connections took Envoy past its overload limit, and every other request got 503 (black-box review,
2026-12-02). The routes that buffer ask Check first, with the context extension CHECK_KEY set to
TOKEN (envoy/envoy.yaml), before the body: a token that does not verify is answered as the server
answers it (401, the same reason, details and www-authenticate; natively UNAUTHENTICATED with the
same details), and nothing of the body is held. A token that verifies goes on: what it may do is
the server's to say, as always. So is anything Check cannot tell (failure_mode_allow).
"""

from __future__ import annotations

import base64
import json

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2 as authz_pb2
from envoy.type.v3 import http_status_pb2
from google.protobuf import json_format
from google.rpc import status_pb2
from grpc_status import rpc_status

from .. import auth, logs
from ..errors import Unauthenticated
from .status import to_status

CHECK_KEY = "gallery_check"  # the context extension that says which check a route asks for
TOKEN = "token"
PASSED = "token_passed"  # noted on the access line of a Check that let a token through

# Check's "go on unchanged", for either question (file_handoff.py's too).
GO_ON = authz_pb2.CheckResponse(status=status_pb2.Status(code=0), ok_response=authz_pb2.OkHttpResponse())


def _native(content_type: str) -> bool:
    """gRPC as the transcoder tells it (envoy.yaml's Lua filter too): grpc-web is answered as REST."""
    return content_type == "application/grpc" or content_type.startswith("application/grpc+")


def check_token(verifier: auth.Verifier, headers: dict[str, str]) -> authz_pb2.CheckResponse:
    try:
        verifier.verify(auth.bearer_token(headers.get("authorization")))
    except Unauthenticated as exc:
        logs.note(token_refused=exc.reason)  # on Check's access line, whose own call went well
        return _refusal(exc, native=_native(headers.get("content-type", "")))
    logs.note(**{PASSED: "1"})
    return GO_ON


def _refusal(error: Unauthenticated, *, native: bool) -> authz_pb2.CheckResponse:
    """The server's own answer to the token, as Envoy sends a refusal: a REST client's JSON body
    (what the transcoder prints of the server's status), a native client's gRPC status and details."""
    status = to_status(error)
    trailers = dict(status.trailing_metadata)
    details = rpc_status.GRPC_DETAILS_METADATA_KEY
    headers = [("www-authenticate", trailers["www-authenticate"])]
    if native:  # Envoy makes grpc-status and grpc-message of the code and the body
        headers.append((details, base64.b64encode(trailers[details]).decode().rstrip("=")))
        body = error.message
    else:
        headers.append(("content-type", "application/json"))
        printed = json_format.MessageToDict(status_pb2.Status.FromString(trailers[details]))
        body = json.dumps({"code": printed["code"], "message": printed["message"], "details": [
            {**detail, "metadata": detail.get("metadata", {})} for detail in printed["details"]
        ]}, separators=(",", ":"))
    return authz_pb2.CheckResponse(
        status=status_pb2.Status(code=status.code.value[0]),
        denied_response=authz_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=http_status_pb2.Unauthorized),
            headers=[base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, value=v)) for k, v in headers],
            body=body,
        ),
    )
