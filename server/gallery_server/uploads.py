"""An upload in flight: staged media and thumbnail plus the fields that describe them.

Nothing here touches the database; Gallery.store() turns a finished Upload into an event.
"""

from __future__ import annotations

import dataclasses
import unicodedata

from .errors import InvalidArgument
from .storage import StagedFile, Storage

MAX_DEVICE_EVENT_ID_CHARS = 128


@dataclasses.dataclass
class UploadFields:
    """What the client said about the upload; validated by Gallery.store()."""

    name: str = ""
    media_type: str = ""  # empty: infer from content and name
    metadata_json: str = "{}"
    declared_size: int | None = None
    declared_sha256: str = ""
    # REST `has_thumbnail`: when true, a thumbnail part must be present.
    thumbnail_promised: bool = False
    # The device's own id for the capture; an event of the device with it already is the answer
    # instead of a new event (Gallery.store()). Empty: none.
    device_event_id: str = ""

    def declare_size(self, size: int) -> None:
        """Record a declared size; two declarations (header and finish) must agree."""
        if self.declared_size is not None and self.declared_size != size:
            raise InvalidArgument(
                "SIZE_MISMATCH", f"declared sizes disagree: {self.declared_size} and {size}",
                field="size",
            )
        self.declared_size = size

    def declare_sha256(self, sha256: str) -> None:
        if self.declared_sha256 and sha256 and self.declared_sha256 != sha256:
            raise InvalidArgument(
                "SHA256_MISMATCH", "declared sha256 values disagree", field="sha256"
            )
        self.declared_sha256 = self.declared_sha256 or sha256


def check_device_event_id(value: str) -> str:
    """A device's id for a capture: printable, 1..128 characters (empty means none)."""
    if len(value) > MAX_DEVICE_EVENT_ID_CHARS or any(
        unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn") for c in value
    ):
        raise InvalidArgument(
            "INVALID_DEVICE_EVENT_ID",
            f"device_event_id must be at most {MAX_DEVICE_EVENT_ID_CHARS} printable characters",
            field="device_event_id",
        )
    return value


class Upload:
    """Receives bytes into staging; discards them on close() unless Gallery.store() took them."""

    def __init__(
        self, storage: Storage, device: str, *, max_media_bytes: int, max_thumbnail_bytes: int,
        media: StagedFile | None = None,
    ) -> None:
        """`media`: bytes received already (a resumable upload's file), instead of a new file."""
        self.device = device
        self.fields = UploadFields()
        self._storage = storage
        self._max_thumbnail_bytes = max_thumbnail_bytes
        self.media = media or storage.stage(max_bytes=max_media_bytes, what="event")
        self.media_received = media is not None
        self.thumbnail: StagedFile | None = None

    def write_media(self, data: bytes | memoryview) -> None:
        self.media_received = True
        self.media.write(data)
        declared = self.fields.declared_size
        if declared is not None and self.media.size > declared:
            raise InvalidArgument(
                "SIZE_MISMATCH", f"media is larger than the declared size {declared}",
                field="size", declared=str(declared),
            )

    def write_thumbnail(self, data: bytes | memoryview) -> None:
        if self.thumbnail is None:
            self.thumbnail = self._storage.stage(
                max_bytes=self._max_thumbnail_bytes, what="thumbnail"
            )
        self.thumbnail.write(data)

    def close(self) -> None:
        self.media.discard()
        if self.thumbnail is not None:
            self.thumbnail.discard()

    def __enter__(self) -> Upload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
