"""Renders envoy/envoy.yaml for a given listener, admin port and set of gRPC backends."""

from __future__ import annotations

import json
import os
import pathlib
import string

ROOT = pathlib.Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "envoy" / "envoy.yaml"
DESCRIPTOR = ROOT / "generated" / "gallery_descriptor.pb"


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


def render(
    *, listen: str, admin_port: int, backends: list[str], media_root: pathlib.Path | None = None
) -> str:
    """The configuration; with `media_root` (the servers' <data>/media, as Envoy's host sees it)
    Envoy sends REST downloads itself (rpc/file_handoff.py)."""
    listen_host, listen_port = split_address(listen)
    endpoints = []
    for backend in backends:
        host, port = split_address(backend)
        endpoints.append(
            {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
        )
    return string.Template(TEMPLATE.read_text()).substitute(
        ADMIN_PORT=admin_port,
        LISTEN_HOST=listen_host,
        LISTEN_PORT=listen_port,
        DESCRIPTOR=str(DESCRIPTOR),
        BACKENDS=json.dumps(endpoints),  # JSON is YAML: a flow sequence
        FILE_HANDOFF_OFF="false" if media_root else "true",
        MEDIA_ROOT=_quoted_text(str(media_root or "/nonexistent")),
    )


def _quoted_text(text: str) -> str:
    """The path `text` escaped for the inside of a YAML double-quoted string (JSON's escapes are
    YAML's); Envoy reads the file as UTF-8, so the path's bytes on disk must be UTF-8 too."""
    try:
        valid = os.fsencode(text).decode("utf-8") == text
    except UnicodeDecodeError:
        valid = False
    if not valid:
        raise ValueError(
            f"{text!r} is not valid UTF-8, which Envoy's configuration must be: move the data "
            "directory or set GALLERY_ENVOY_SENDS_FILES=false"
        ) from None
    # Not ASCII-only: JSON would write a character outside the BMP as a surrogate pair of \u
    # escapes, which YAML refuses.
    return json.dumps(text, ensure_ascii=False)[1:-1]
