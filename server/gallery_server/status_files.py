"""The JSON files that say how a periodic or on-demand job ended: in <data>/run/, the reconciler's
reconcile.json and the scrub's verify.json, for the admin status and the metrics of every
replica; a backup's backup.json, in the backup.

Written whole and renamed into place, so that a reader never sees half a file; each writer uses a
private temporary name, since replicas (and threads) may write the same file at once. Read back
forgivingly: a file cut short, or one someone else wrote, reads as no result rather than failing
the status or the scrape that reads it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import secrets
from typing import Any, TypeVar

from .storage import fsync_dir, make_folders

Result = TypeVar("Result")


def write(path: pathlib.Path, result: Any, *, durable: bool = False) -> None:
    """Write a dataclass as `path`'s JSON object (mode 0640, as the data folder's files). With
    `durable`, the file is synced before it replaces the old one and the folder after, for a file
    whose presence says something (a backup's manifest says the backup is whole)."""
    make_folders(path.parent)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(dataclasses.asdict(result)))
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(temporary, path)
        if durable:
            fsync_dir(path.parent)
    finally:  # a full disk must not leave temporaries behind
        temporary.unlink(missing_ok=True)


def read(path: pathlib.Path, kind: type[Result]) -> Result | None:
    """`path`'s object as a `kind` dataclass (fields it does not know are dropped); None when there
    is none to read: no file yet, a file cut short, or not the object `write` writes."""
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            return None
        known = {field.name for field in dataclasses.fields(kind)}  # type: ignore[arg-type]
        return kind(**{k: v for k, v in data.items() if k in known})
    except (OSError, ValueError, TypeError):
        return None
