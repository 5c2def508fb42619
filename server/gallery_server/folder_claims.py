"""A folder that one `gallery backup` or `gallery restore` fills: made for it, or taken empty,
and marked with the process that claims it (a second one is refused; a folder a `kill -9` left
stays marked, for the operator to remove). A run that fails removes what it wrote, and never a
folder it did not make."""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import socket
from collections.abc import Callable


def claim(folder: pathlib.Path, marker: str, *, mode: int, refused: Callable[[], Exception]) -> bool:
    """Make `folder` (mode `mode`), or take it empty, and write `marker` in it naming this process;
    whether the folder was made here. Raises `refused()` when another process claims it, or when
    it was filled meanwhile."""
    try:
        folder.mkdir(mode=mode, parents=True)
        made = True
    except FileExistsError:
        made = False
    try:
        fd = os.open(folder / marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise refused() from None
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()} on {socket.gethostname()}\n")
    if not made and any(p.name != marker for p in folder.iterdir()):  # filled meanwhile
        (folder / marker).unlink()
        raise refused()
    return made


def claimed_by(folder: pathlib.Path, marker: str) -> str | None:
    """The process a marker names ("?" when it cannot be read), or None without one."""
    try:
        return (folder / marker).read_text().strip() or "?"
    except FileNotFoundError:
        return None
    except OSError:
        return "?"


def remove_what_was_made(folder: pathlib.Path, made: bool, *, marker: str) -> None:
    """The folder if this run made it, else what it put in it (it was taken empty); its marker
    last, so that a folder half removed (a crash meanwhile) is still marked."""
    for entry in folder.iterdir():
        if entry.name == marker:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    (folder / marker).unlink(missing_ok=True)
    if made:
        with contextlib.suppress(OSError):
            folder.rmdir()
