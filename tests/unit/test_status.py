"""The one mapping of domain errors to gRPC status (rpc/status.py): the trailers a client acts on,
which Envoy makes headers of the REST answer."""

from __future__ import annotations

import pytest

from gallery_server import errors
from gallery_server.quota import QUOTA_EXCEEDED
from gallery_server.rpc import status


def _trailers(error: errors.GalleryError) -> dict[str, str]:
    return {key: value for key, value in status.to_status(error).trailing_metadata if key != "grpc-status-details-bin"}


@pytest.mark.parametrize(("error", "expected"), [
    (errors.Busy("TOO_MANY_UPLOADS", "full"), {"retry-after": "1"}),  # places free as calls end
    (errors.DatabaseUnavailable(), {"retry-after": "1"}),
    # When the server fetches the key set again, in whole seconds, rounded up and at least one.
    (errors.Unavailable("JWKS_UNAVAILABLE", "down", retry_after=4.2), {"retry-after": "5"}),
    (errors.Unavailable("JWKS_UNAVAILABLE", "down", retry_after=0.01), {"retry-after": "1"}),
    # Waiting alone mends none of these: no Retry-After.
    (errors.Exhausted(QUOTA_EXCEEDED, "at quota"), {"x-http-status": "507"}),
    (errors.Exhausted("TOO_MANY_UPLOAD_URLS", "use some first"), {}),
    (errors.TooLarge("UPLOAD_TOO_LARGE", "too large"), {"x-http-status": "413"}),
    (errors.Unauthenticated("TOKEN_MISSING", "no token"), {"www-authenticate": 'Bearer realm="gallery"'}),
], ids=["busy", "database", "jwks-later", "jwks-soon", "quota", "urls", "too-large", "token"])
def test_retry_after_is_told_where_waiting_helps_and_only_there(
    error: errors.GalleryError, expected: dict[str, str],
) -> None:
    assert _trailers(error) == expected
