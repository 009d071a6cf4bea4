"""Which LV each virtual disk's controller maps: B, or the run's checkpoint C after step 5.

The record is written (fsync'd) before a controller is resumed onto a new LV, so whatever
stops the lab - a kill, a power loss of the lab VM - the next `hvlab up` maps the LV the
guest last wrote to. Mapping B again after a C went live would send the guest back to T0
and lose every transaction it committed since.
"""

from __future__ import annotations

import os
from pathlib import Path

from hvlab.lab.paths import Names
from hvlab.sys import dirfd


def _file(names: Names, vm: str, disk: str) -> Path:
    return names.dir / "live" / f"{vm}_{disk}"


def recorded(names: Names, vm: str, disk: str) -> str | None:
    """The LV recorded as live, or None (then B is)."""
    try:
        return _file(names, vm, disk).read_text().strip() or None
    except FileNotFoundError:
        return None


def record(names: Names, vm: str, disk: str, lv: str) -> None:
    """Durably record lv as the disk's live LV (B clears the record)."""
    path = _file(names, vm, disk)
    dirfd.make_dirs(path.parent)
    if lv == names.lv(vm, disk):
        dirfd.unlink(path, missing_ok=True)
    else:
        tmp = path.with_name(f".{path.name}.tmp")
        fd = dirfd.open_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        with os.fdopen(fd, "w") as f:
            f.write(lv + "\n")
            f.flush()
            os.fsync(f.fileno())
        dirfd.replace(tmp, path)
    dirfd.fsync_dir(path.parent)


def lv_to_map(names: Names, vm: str, disk: str, existing: set[str]) -> str:
    """What a (re)started controller must map: the recorded LV while LVM has it, else B.
    A recorded C that is gone was renamed to B by the merge (C is never removed while live)."""
    lv = recorded(names, vm, disk)
    return lv if lv and lv in existing else names.lv(vm, disk)
