"""gallery: the media service devices stream their captures into."""

import importlib.metadata


def version() -> str:
    """The installed gallery's version ("unknown" when run from a source tree, not installed)."""
    try:
        return importlib.metadata.version("gallery")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
