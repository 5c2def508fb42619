"""The one place where domain errors become gRPC status (and so, through Envoy, HTTP status).

Each error becomes a google.rpc.Status with an ErrorInfo (domain `gallery`, the error's reason and
metadata) and, when a request field is at fault, a BadRequest field violation (AIP-193).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from .. import errors
from ..downloads import PRECONDITION_FAILED_REASON
from ..errors import ERROR_DOMAIN, RETRY_AFTER_HEADER
from ..quota import QUOTA_EXCEEDED
from ..signed_urls import MULTIPART_PUT
from ..storage import INSUFFICIENT_STORAGE

_CODES: dict[type[errors.GalleryError], int] = {
    errors.InvalidArgument: code_pb2.INVALID_ARGUMENT,  # HTTP 400
    errors.Unauthenticated: code_pb2.UNAUTHENTICATED,  # HTTP 401
    errors.PermissionDenied: code_pb2.PERMISSION_DENIED,  # HTTP 403
    errors.NotFound: code_pb2.NOT_FOUND,  # HTTP 404
    errors.AlreadyExists: code_pb2.ALREADY_EXISTS,  # HTTP 409
    errors.FailedPrecondition: code_pb2.FAILED_PRECONDITION,  # HTTP 400
    errors.Conflict: code_pb2.ABORTED,  # HTTP 409
    errors.OutOfRange: code_pb2.OUT_OF_RANGE,  # HTTP 400
    errors.TooLarge: code_pb2.RESOURCE_EXHAUSTED,  # HTTP 413 (_HTTP_STATUS_OF_KIND below)
    errors.Unavailable: code_pb2.UNAVAILABLE,  # HTTP 503
    errors.Exhausted: code_pb2.RESOURCE_EXHAUSTED,  # HTTP 429, or 507 (_HTTP_STATUS below)
    errors.DataLoss: code_pb2.DATA_LOSS,  # HTTP 500
}

# Reasons whose REST status is not Envoy's mapping of their gRPC code. The status travels in the
# `x-http-status` trailer, which the Lua filter of envoy/envoy.yaml turns into the HTTP status of
# a REST response (as it does for downloads); native gRPC clients see the code and the trailer.
# A full disk is 507 Insufficient Storage (RFC 4918): unlike 429, it tells the client that
# slowing down will not help until the operator frees space; so is a device at its quota, whose
# events must be deleted first (RFC 4918 names quotas among its causes). A PUT without a Content-Length is
# 411 Length Required (RFC 9110 15.5.12), which an HTTP client knows how to act on; a form as a
# PUT's body, whose bytes would be stored as the file, 415 Unsupported Media Type (15.5.16); a
# DELETE whose If-Match names other content, 412 Precondition Failed (15.5.13). The REST reads'
# route runs no Lua (envoy.yaml): a method that could answer one of these must first be taken out
# of that route's regex (tests/unit/test_envoy_config.py pins its list).
# A TooLarge (an upload past GALLERY_MAX_UPLOAD_BYTES, a thumbnail past its limit; an announcement
# of too many events, native only) is 413 Content Too Large (RFC 9110 15.5.14): the same request
# will be refused again, where a client that retries on 429 would retry it for ever. A form
# field too long is a bad request (400, InvalidArgument).
_HTTP_STATUS: dict[str, str] = {
    INSUFFICIENT_STORAGE: "507", QUOTA_EXCEEDED: "507", "LENGTH_REQUIRED": "411", MULTIPART_PUT: "415",
    PRECONDITION_FAILED_REASON: "412",
}
_HTTP_STATUS_OF_KIND: dict[type[errors.GalleryError], str] = {errors.TooLarge: "413"}
# The one name of that header, in trailers (errors, here) and initial metadata (servicer.py).
HTTP_STATUS_HEADER = "x-http-status"
# A 401 names the scheme it wants (RFC 9110 11.6.1 says it must; RFC 6750 3 says how for bearer
# tokens): the header travels as a trailer, which Envoy makes a header of the REST answer (a gRPC
# error is trailers only). No error code when no token came at all (RFC 6750 3.1). A malformed
# Authorization header says invalid_request, which RFC 6750 pairs with 400, but keeps its 401:
# the status clients of this API have always had for it.
_REALM = 'Bearer realm="gallery"'
_WWW_AUTHENTICATE: dict[str, str] = {
    "TOKEN_MISSING": _REALM,
    "TOKEN_MALFORMED": f'{_REALM}, error="invalid_request"',
}
_INVALID_TOKEN = f'{_REALM}, error="invalid_token"'


def _code(error: errors.GalleryError) -> int:
    """The code of the error's class, or of the nearest class above it that has one."""
    for kind in type(error).__mro__:
        code = _CODES.get(kind)
        if code is not None:
            return code
    return code_pb2.INTERNAL


def to_status(error: errors.GalleryError, trailing_metadata: Iterable[tuple[str, str]] = ()) -> grpc.Status:
    """The status `error` maps to, with its details and the headers its HTTP answer needs in the
    trailing metadata, and `trailing_metadata` besides."""
    details = [
        error_details_pb2.ErrorInfo(
            reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata
        )
    ]
    if error.field:
        details.append(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(
                field=error.field, description=error.message, reason=error.reason
            )
        ]))
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    mapped = rpc_status.to_status(
        status_pb2.Status(
            code=_code(error),
            message=error.message,
            details=packed,
        )
    )
    extra = list(trailing_metadata)
    if (http_status := _HTTP_STATUS.get(error.reason) or _HTTP_STATUS_OF_KIND.get(type(error))) is not None:
        extra.append((HTTP_STATUS_HEADER, http_status))
    if isinstance(error, errors.Unauthenticated):
        extra.append(("www-authenticate", _WWW_AUTHENTICATE.get(error.reason, _INVALID_TOKEN)))
    if error.retry_after is not None:
        # When to try again, where waiting is what helps: whole seconds, at least one (RFC 9110
        # 10.2.3), in a trailer, which Envoy makes a header of the REST answer as it does
        # www-authenticate; HTTP clients that retry (urllib3's Retry, say) wait that long for a
        # 429 or a 503. Native clients read it from the trailing metadata.
        extra.append((RETRY_AFTER_HEADER, str(max(1, math.ceil(error.retry_after)))))
    if not extra:
        return mapped
    return _Status(mapped.code, mapped.details, (*mapped.trailing_metadata, *extra))


class _Status(grpc.Status):
    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata: tuple) -> None:  # type: ignore[type-arg]
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata


def internal_status(trailing_metadata: Iterable[tuple[str, str]] = ()) -> grpc.Status:
    mapped = rpc_status.to_status(status_pb2.Status(
        code=code_pb2.INTERNAL, message="internal error; the server log has the details"
    ))
    return _Status(mapped.code, mapped.details, (*mapped.trailing_metadata, *trailing_metadata))
