"""host:port addresses ([host]:port for IPv6), as GALLERY_GRPC_ADDRESS and GALLERY_HTTP_ADDRESS
give them: the one parser, for the settings' checks and for whatever binds or connects to one.
It imports nothing of the package, so that both settings.py and envoy_config.py may use it."""

from __future__ import annotations

MAX_PORT = 65535
# An address that names no host (":8001") binds every interface, as Envoy binds its listener.
ANY_HOST = "0.0.0.0"


def split_address(address: str, default_host: str) -> tuple[str, int]:
    """(host, port) of host:port or [host]:port: the host without its brackets, or `default_host`
    when the address names none (":8001"). ValueError unless the last colon is followed by a port
    from 0 (any free one, for binding) to MAX_PORT in ASCII digits and an IPv6 host is bracketed."""
    host, colon, port = address.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if (
        not colon or not (port.isascii() and port.isdigit()) or int(port) > MAX_PORT
        or (":" in host and not bracketed)
    ):
        raise ValueError(f"{address!r} is not host:port ([host]:port for IPv6)")
    return host.strip("[]") or default_host, int(port)
