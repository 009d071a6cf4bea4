"""The backup directory: made when the run starts, marked with its run id, so a second run (or
a paused one) can never write into or remove a directory that is not its own."""

from __future__ import annotations

import os
from pathlib import Path

from hvlab.errors import BadInput
from hvlab.lab.paths import backups_root, below_home, home, refuse_links
from hvlab.sys import private

MARK = ".hvlab-run"
NEW = "give the path of a folder that does not exist yet"


def _run_of(folder: Path) -> str | None:
    """The run whose backup `folder` is (its mark), or None."""
    try:
        return (folder / MARK).read_text().strip() or "?"
    except OSError:
        return None


def check(dest: Path) -> None:
    """Before anything is made: a new folder (not a file, a symlink or another run's backup,
    nor inside one), whose nearest existing parent is a writable folder; inside HVLAB_HOME
    only below its backups folder, and never through a symlink planted there."""
    refuse_links(dest, "backup directory")
    if os.path.lexists(dest):
        if dest.is_symlink():
            raise BadInput(f"backup directory {dest} is a symlink (to {os.readlink(dest)}): "
                           f"{NEW}")
        if not dest.is_dir():
            raise BadInput(f"backup directory {dest} already exists as a file: {NEW}")
        run = _run_of(dest)
        raise BadInput(f"backup directory {dest} already exists"
                       + (f" (the backup of run {run})" if run else "") + f": {NEW}")
    if below_home(dest) and backups_root() not in Path(os.path.realpath(dest)).parents:
        raise BadInput(f"backup directory {dest} is inside HVLAB_HOME {home()} but not below "
                       f"{backups_root()}: a lab's folder goes with the lab; give a folder "
                       f"below {backups_root()} or outside {home()}")
    parent = dest.parent
    while not os.path.lexists(parent):
        parent = parent.parent
    for p in (parent, *parent.parents):
        run = _run_of(p)
        if run:
            raise BadInput(f"backup directory {dest} is inside {p}, the backup of run {run}: "
                           f"a backup never goes inside another")
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise BadInput(f"backup directory {dest} is not writable ({parent})")


def claim(dest: Path, run_id: str) -> None:
    """Make the directory (0700, and 0700 parents where it makes them: backups are root's
    only) and mark it (0600)."""
    refuse_links(dest, "backup directory")  # again: a link planted since the check
    try:
        private.make_dir(dest)
    except FileExistsError:
        raise BadInput(f"backup directory {dest} already exists: {NEW}") from None
    except OSError as exc:
        raise BadInput(f"cannot make backup directory {dest}: {exc.strerror}") from None
    try:
        private.write_text(dest / MARK, run_id + "\n")
    except OSError as exc:  # a destination already full (ENOSPC): leave nothing behind
        (dest / MARK).unlink(missing_ok=True)
        dest.rmdir()
        raise BadInput(f"cannot write to backup directory {dest}: {exc.strerror}") from None


def owns(dest: Path, run_id: str) -> bool:
    """Whether `dest` is this run's backup directory: a real folder (a symlink swapped in
    for it is not) holding this run's mark."""
    if dest.is_symlink() or (dest / MARK).is_symlink():
        return False
    try:
        return (dest / MARK).read_text().strip() == run_id
    except OSError:
        return False
