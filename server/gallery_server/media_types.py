"""What a file is: its MIME type from magic bytes (falling back to the name) and its media type."""

from __future__ import annotations

import mimetypes

import filetype

# Bytes of the file's start kept for content sniffing; filetype needs at most 8 KiB.
SNIFF_BYTES = 8192
OCTET_STREAM = "application/octet-stream"

_DOCUMENT_MIMES = {
    "application/pdf",
    "application/rtf",
    "application/msword",
    "application/vnd.ms-excel",
    "application/vnd.ms-powerpoint",
    "application/epub+zip",
    "application/json",
    "application/xml",
}
_DOCUMENT_PREFIXES = (
    "text/",
    "application/vnd.openxmlformats-officedocument.",
    "application/vnd.oasis.opendocument.",
)


def detect_mime(name: str, head: bytes) -> str:
    """Content wins when its magic bytes are known; otherwise the extension; else octet-stream."""
    sniffed = filetype.guess_mime(head) if head else None
    if sniffed:
        return str(sniffed)
    guessed, _ = mimetypes.guess_type(name, strict=False)
    return guessed or OCTET_STREAM


def classify(mime: str) -> str:
    major = mime.split("/", 1)[0]
    if major in ("image", "video", "audio"):
        return major
    if mime in _DOCUMENT_MIMES or mime.startswith(_DOCUMENT_PREFIXES):
        return "document"
    return "other"
