"""The JSON files in <data>/run/ that say how a periodic or on-demand job last ended (the
reconciler's reconcile.json, the scrub's verify.json), for the admin status and the metrics of
every replica.

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

Result = TypeVar("Result")


def write(path: pathlib.Path, result: Any) -> None:
    """Write a dataclass as `path`'s JSON object."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    try:
        temporary.write_text(json.dumps(dataclasses.asdict(result)))
        os.replace(temporary, path)
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
