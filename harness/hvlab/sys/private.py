"""Folders and files only root may read (folders 0700, files 0600), right from creation: a
backup image, a manifest or a backing file holds the VMs' data. `Path.mkdir(parents=True)`
makes the parents with the default mode and `open()` makes files 0666 & ~umask, so neither
is used for them."""

from __future__ import annotations

import fcntl
import os
import stat
import time
from pathlib import Path

from hvlab.sys import dirfd

DIR_MODE = 0o700
FILE_MODE = 0o600


def make_dirs(path: Path) -> None:
    """`mkdir -p` where every folder it makes is 0700; folders already there are left alone
    (below a folder held for a run, reached without following links: sys/dirfd.py)."""
    dirfd.make_dirs(path)


def make_dir(path: Path) -> None:
    """One new folder, 0700 (its parents made 0700 as needed); FileExistsError if it is there."""
    with dirfd.parent(path, make=True) as (dfd, name):
        os.mkdir(name, DIR_MODE, dir_fd=dfd)


def open_file(path: Path, flags: int) -> int:
    """os.open for writing a file only root may read: created 0600, and an existing file
    opened with it is made 0600 too. Never through a symlink (sys/dirfd.py)."""
    fd = dirfd.open_file(path, flags | os.O_CREAT, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_text(path: Path, text: str) -> None:
    """A small file (a mark, a report), 0600 from its creation."""
    fd = open_file(path, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def flock_within(fd: int, wait: float, poll: float = 0.05) -> bool:
    """An exclusive flock on fd, waiting at most `wait` seconds (TimeoutError after); returns
    whether another holder made it wait."""
    deadline = time.monotonic() + wait
    waited = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return waited
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"lock held for over {wait:g} s") from None
            waited = True
            time.sleep(poll)


def tighten(path: Path, mode: int) -> None:
    """An object we made earlier with a looser mode (an older hvlab): take the others' bits."""
    st = path.lstat()
    if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o077:
        os.chmod(path, st.st_mode & mode & 0o7777)
