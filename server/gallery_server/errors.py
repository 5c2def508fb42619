"""The one tree of domain errors. Domain modules raise these; rpc/status.py maps them to gRPC status.

GalleryError                 base; carries a stable UPPER_SNAKE `reason` and `metadata`
├── InvalidArgument          the request is malformed (400 / INVALID_ARGUMENT)
├── Unauthenticated          no valid bearer token (401 / UNAUTHENTICATED)
├── PermissionDenied         the token or signed URL does not allow this (403 / PERMISSION_DENIED)
├── NotFound                 the event does not exist for this device (404 / NOT_FOUND)
├── AlreadyExists            the resource was created already (409 / ALREADY_EXISTS)
├── FailedPrecondition       not possible in the resource's current state (400 / FAILED_PRECONDITION)
├── Conflict                 lost to another request's state: re-read, then retry (ABORTED, 409)
├── OutOfRange               a read past the end of the content (400 / OUT_OF_RANGE)
├── TooLarge                 a size limit was exceeded (413 through Envoy: rpc/status.py / RESOURCE_EXHAUSTED)
├── Unavailable              a service the request needs is unreachable, e.g. the JWKS (503 / UNAVAILABLE)
│   └── DatabaseUnavailable  the database could not do the work now (db.py says which errors)
│       └── CommitOutcomeUnknown  the connection went during a COMMIT (Database.commit)
├── Exhausted                a capacity limit was hit: too many uploads at once (429) or too little
│   │                        free disk (507 through Envoy; both RESOURCE_EXHAUSTED)
│   └── Busy                 a place the server frees as calls end: the same request, a moment later
└── DataLoss                 a stored event's file is missing or damaged (500 / DATA_LOSS)
"""

from __future__ import annotations

# The ErrorInfo domain of every error the API answers with: the server's (rpc/status.py) and
# Envoy's own (envoy_config.py).
ERROR_DOMAIN = "gallery"
# The header that tells GalleryError.retry_after (rpc/status.py), and Envoy's own (envoy_config.py).
RETRY_AFTER_HEADER = "retry-after"


class GalleryError(Exception):
    # Seconds after which the same request is likely to succeed, where waiting is what helps (a
    # place freed as calls end, a dependency that comes back): Retry-After (rpc/status.py). None
    # where the client must act first (a quota, a full disk, a bad request) or time alone is no
    # answer.
    retry_after: float | None = None

    def __init__(self, reason: str, message: str, *, field: str = "", **metadata: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.field = field  # the request field at fault, for BadRequest details
        self.metadata = {k: str(v) for k, v in metadata.items()}


class InvalidArgument(GalleryError):
    pass


class Unauthenticated(GalleryError):
    pass


class PermissionDenied(GalleryError):
    pass


class NotFound(GalleryError):
    pass


class AlreadyExists(GalleryError):
    pass


class FailedPrecondition(GalleryError):
    pass


class Conflict(GalleryError):
    """The request lost to another request on the same resource, or was based on a state that
    has moved on (a chunk at a stale offset, another writer at work): re-read the resource's
    state, then retry. Raised for pre-signed range uploads (signed_urls.range_conflicts), where
    native resumable writes keep ByteStream's FailedPrecondition for the same reasons."""


class OutOfRange(GalleryError):
    pass


class TooLarge(GalleryError):
    pass


class Unavailable(GalleryError):
    def __init__(self, reason: str, message: str, *, retry_after: float, **metadata: str) -> None:
        super().__init__(reason, message, **metadata)
        self.retry_after = retry_after


class DatabaseUnavailable(Unavailable):
    """The database could not be reached, dropped the connection or stayed busy past the waits:
    the same request may succeed later. Raised by db.py, from the driver's error."""

    def __init__(self) -> None:
        # The database was unreachable or busy just now: a client back a second later finds it
        # again after a restart or a released lock, or gets this answer again.
        super().__init__("DATABASE_UNAVAILABLE", "the database is unavailable; try again later", retry_after=1)


class CommitOutcomeUnknown(DatabaseUnavailable):
    """The connection went while a COMMIT was under way: the work may or may not be written. The
    client sees DATABASE_UNAVAILABLE; the caller keeps what the work, if written, refers to."""


class Exhausted(GalleryError):
    """The server is at a capacity limit; the same request may succeed later."""


class Busy(Exhausted):
    """Every place of a kind the server frees as calls end (uploads, downloads, device channels,
    pull waits, reflection streams) is taken: the same request is likely to succeed a moment
    later. Not a limit on what is stored (a quota, unused URLs, open sessions), which the client
    must change first."""

    # A place frees within milliseconds (a refused call) to minutes (a large upload): a second
    # keeps a retrying client's wait short and its retries cheap (each is refused at once).
    retry_after = 1


class DataLoss(GalleryError):
    """A stored event's media file is gone or not its recorded size: storage lost what the row
    describes (a volume not mounted, a file removed or cut by hand). Not the client's doing, and
    not a deleted event (404): the reconciler reports the same (reconcile.py)."""
