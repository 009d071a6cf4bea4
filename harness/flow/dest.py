"""The backup directory: made when the run starts, marked with its run id, so a second run (or
a paused one) can never write into or remove a directory that is not its own."""

from __future__ import annotations

import os
from pathlib import Path

from hvlab.errors import BadInput
from hvlab.sys import private

MARK = ".hvlab-run"


def check(dest: Path) -> None:
    """Before anything is made: the directory must not exist and its parent be writable."""
    if dest.exists() or dest.is_symlink():
        raise BadInput(f"backup directory {dest} already exists")
    parent = dest.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise BadInput(f"backup directory {dest} is not writable ({parent})")


def claim(dest: Path, run_id: str) -> None:
    """Make the directory (0700, and 0700 parents where it makes them: backups are root's
    only) and mark it (0600)."""
    try:
        private.make_dir(dest)
    except FileExistsError:
        raise BadInput(f"backup directory {dest} already exists") from None
    private.write_text(dest / MARK, run_id + "\n")


def owns(dest: Path, run_id: str) -> bool:
    try:
        return (dest / MARK).read_text().strip() == run_id
    except OSError:
        return False
