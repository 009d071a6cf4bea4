"""Folders held open for a run: what the run writes below one is opened relative to its fd,
one part at a time, never following a symlink.

A command checks its paths when it starts (`refuse_links`); a run then lasts seconds to
hours. A folder swapped for a symlink after that check (the runs folder, `live`, the metadata
snapshot's lock, the backup directory) must change nothing: below a held folder a planted
link is refused where it is met (ELOOP, ENOTDIR), and the held folder itself stays the one
that was checked even if its path is made to point elsewhere. Outside a held folder these
functions open as before (O_NOFOLLOW on the last part).

    with dirfd.hold(names.dir):           # for the run
        fd = dirfd.open_file(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

# Held folders, by absolute path as given: a stack each (holds nest, a resume inside a run).
_held: dict[Path, list[int]] = {}
# A forked copy (the step-5 hold guard) closes what it inherited: its numbers may name other
# files there, so it forgets the holds and opens by path, as outside a run.
os.register_at_fork(after_in_child=_held.clear)


class PlantedLink(OSError):
    """A symlink (or a file) where the run's own folder was: planted after the check."""


@contextmanager
def hold(path: Path) -> Iterator[int]:
    """Hold `path` (a folder, made 0700 if missing) open while the block runs."""
    path = Path(os.path.abspath(path))
    _make_plain(path)
    fd = os.open(path, _DIR_FLAGS)
    _held.setdefault(path, []).append(fd)
    try:
        yield fd
    finally:
        stack = _held[path]
        stack.remove(fd)
        if not stack:
            del _held[path]
        os.close(fd)


def held_fd(path: Path) -> int | None:
    """The fd of `path` if it is held itself (the off-host proxy is handed it)."""
    stack = _held.get(Path(os.path.abspath(path)))
    return stack[-1] if stack else None


def _root_of(path: Path) -> tuple[int, tuple[str, ...]] | None:
    """The innermost held folder containing `path`, and the parts below it."""
    best: tuple[int, tuple[str, ...]] | None = None
    for root, stack in _held.items():
        if path == root or root in path.parents:
            rel = path.relative_to(root).parts
            if best is None or len(rel) < len(best[1]):
                best = (stack[-1], rel)
    return best


def _walk(root: int, parts: tuple[str, ...], make: bool, shown: Path) -> int:
    """A new fd of the folder `parts` below `root`, each part opened without following;
    `shown` names the folder in an error."""
    fd = os.dup(root)
    try:
        for part in parts:
            if part in ("", ".", ".."):
                raise ValueError(f"not a plain path part: {part!r}")
            if make:
                with suppress(FileExistsError):
                    os.mkdir(part, DIR_MODE, dir_fd=fd)
            try:
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise PlantedLink(exc.errno, f"{shown}: {part} is no longer a plain "
                                      f"folder (a symlink planted during the run?); hvlab "
                                      f"never writes through one") from None
                raise
            os.close(fd)
            fd = nxt
        return fd
    except BaseException:
        os.close(fd)
        raise


@contextmanager
def parent(path: Path, *, make: bool = False) -> Iterator[tuple[int | None, str]]:
    """(fd of path's folder or None when not below a held one, the last part): the folder
    reached part by part from the held folder."""
    path = Path(os.path.abspath(path))
    found = _root_of(path.parent)
    if found is None:
        if make:
            _make_plain(path.parent)
        yield None, str(path)
        return
    fd = _walk(*found, make, path.parent)
    try:
        yield fd, path.name
    finally:
        os.close(fd)


def _make_plain(path: Path) -> None:
    """`mkdir -p` (0700 for what it makes) of a folder outside any held one, or below one."""
    found = _root_of(path)
    if found is not None:
        os.close(_walk(*found, True, path))
        return
    missing: list[Path] = []
    p = path
    while not p.is_dir():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, DIR_MODE)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(d).st_mode):  # a symlink planted meanwhile: not ours
                raise


def make_dirs(path: Path) -> None:
    _make_plain(Path(os.path.abspath(path)))


def open_file(path: Path, flags: int, mode: int = FILE_MODE) -> int:
    """os.open of a file (never through a symlink at its last part, nor below a held folder)."""
    with parent(path) as (dfd, name):
        try:
            return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dfd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise PlantedLink(exc.errno, f"{path} is a symlink (planted during the "
                                  f"run?); hvlab never writes through one") from None
            raise


def replace(src: Path, dst: Path) -> None:
    """os.replace within one folder (a tmp file onto its final name)."""
    with parent(dst) as (dfd, name):
        os.replace(src.name if dfd is not None else src, name, src_dir_fd=dfd, dst_dir_fd=dfd)


def unlink(path: Path, *, missing_ok: bool = False) -> None:
    with parent(path) as (dfd, name):
        try:
            os.unlink(name, dir_fd=dfd)
        except FileNotFoundError:
            if not missing_ok:
                raise


def fsync_dir(path: Path) -> None:
    """fsync a folder (a rename in it durable)."""
    found = _root_of(Path(os.path.abspath(path)))
    fd = _walk(*found, False, path) if found else os.open(path, _DIR_FLAGS)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
