"""The lab state file: its definition and phase. Written atomically (tmp, fsync, rename), 0600."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hvlab.errors import HvlabError
from hvlab.lab.definition import LabDef
from hvlab.lab.paths import Names, refuse_links, refuse_links_in_lab
from hvlab.sys import dirfd, private


def write_json_atomic(path: Path, data: Any, *, durable: bool = True,
                      indent: int | None = 2) -> None:
    """Whole or not at all (tmp, rename). durable: on disk before returning (fsync of file
    and folder); without it, a killed process still leaves it whole, a power loss may not.
    indent=None: one line, by json's C encoder (an indented dump is pure Python, 4x slower)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with os.fdopen(private.open_file(tmp, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW), "w") as f:
        f.write(json.dumps(data, indent=indent, sort_keys=True))
        f.write("\n")
        f.flush()
        if durable:
            os.fsync(f.fileno())
    dirfd.replace(tmp, path)
    if durable:
        dirfd.fsync_dir(path.parent)


@dataclass
class State:
    definition: LabDef
    phase: str = "creating"  # creating | up | stopped | removing

    def to_dict(self) -> dict[str, Any]:
        return {"version": 1, "definition": self.definition.to_dict(), "phase": self.phase}

    def save(self) -> None:
        names = Names(self.definition.name)
        refuse_links(names.dir, "lab folder")
        private.make_dirs(names.dir)
        write_json_atomic(names.state_file, self.to_dict())

    @staticmethod
    def load(lab: str) -> State | None:
        path = Names(lab).state_file
        try:
            d = json.loads(path.read_text())
            # Older files also carry loops/formatted/extra: never read, ignored.
            return State(LabDef.from_dict(d["definition"]), d.get("phase", "up"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError, HvlabError) as exc:
            raise HvlabError(f"lab state file {path} is unreadable ({exc!r}); "
                             f"run `hvlab down --lab-name {lab}` to clean up") from None


@contextmanager
def locked(lab: str) -> Iterator[None]:
    """One lab operation at a time (flock on the lab's lock file). Every command that changes
    a lab passes here: a symlink planted in its folder is refused before anything is done."""
    names = Names(lab)
    refuse_links_in_lab(names)
    private.make_dirs(names.dir)  # 0700: the lab's files are root's only
    private.tighten(names.dir, private.DIR_MODE)  # a lab made by an older hvlab
    fd = dirfd.open_file(names.lock_file, os.O_RDWR | os.O_CREAT)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise HvlabError(f"lab {lab!r} is busy: another hvlab command holds its lock") from None
        yield
    finally:
        os.close(fd)
