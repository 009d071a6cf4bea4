"""fsfreeze through FIFREEZE/FITHAW ioctls, as Linux's hv_vss_daemon does.

A marker file `<run_dir>/frozen` lists the mountpoints while any is frozen, so the host can thaw
after the guest died (`recover_after_crash`): a lab never stays frozen.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from hvlab.errors import HvlabError

FIFREEZE = 0xC0045877
FITHAW = 0xC0045878
MARKER = "frozen"


class FreezeError(HvlabError):
    """A filesystem could not be frozen; everything frozen before it was thawed again."""


def _ioctl(mountpoint: Path | str, req: int) -> None:
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, req, 0)
    finally:
        os.close(fd)


def _fs_ioctl(mountpoint: Path | str, req: int, benign: int) -> bool:
    """One freeze/thaw ioctl; False when the kernel says it was already in that state."""
    try:
        _ioctl(mountpoint, req)
    except OSError as exc:
        if exc.errno == benign:
            return False
        raise
    return True


def freeze_fs(mountpoint: Path | str) -> bool:
    """Freeze one filesystem. False if it was already frozen (EBUSY counts as success)."""
    return _fs_ioctl(mountpoint, FIFREEZE, errno.EBUSY)


def thaw_fs(mountpoint: Path | str) -> bool:
    """Thaw one filesystem. False if it was not frozen (EINVAL)."""
    return _fs_ioctl(mountpoint, FITHAW, errno.EINVAL)


def freeze_all(mountpoints: Sequence[Path | str]) -> list[str]:
    """Freeze in the given (disk) order; on any failure thaw what was frozen and raise."""
    done: list[str] = []
    for mnt in mountpoints:
        try:
            freeze_fs(mnt)
        except OSError as exc:
            thaw_all(list(reversed(done)))
            raise FreezeError(f"freeze of {mnt} failed: {exc.strerror}; thawed {done}") from exc
        done.append(str(mnt))
    return done


def thaw_all(mountpoints: Sequence[Path | str]) -> list[str]:
    """Thaw every mountpoint, carrying on past errors; returns those actually thawed."""
    thawed: list[str] = []
    errors: list[str] = []
    for mnt in mountpoints:
        try:
            if thaw_fs(mnt):
                thawed.append(str(mnt))
        except OSError as exc:
            errors.append(f"{mnt}: {exc.strerror}")
    if errors:
        raise FreezeError("thaw failed: " + "; ".join(errors))
    return thawed


def write_marker(run_dir: Path, mountpoints: Sequence[Path | str]) -> None:
    """Written before the first FIFREEZE, so a crash at any point after it is recoverable."""
    tmp = run_dir / (MARKER + ".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "mountpoints": [str(m) for m in mountpoints]}))
    tmp.replace(run_dir / MARKER)


def remove_marker(run_dir: Path) -> None:
    (run_dir / MARKER).unlink(missing_ok=True)


def recover_after_crash(run_dir: Path | str) -> dict[str, Any]:
    """Thaw what a dead guest's marker lists and remove the marker. Safe to call any time."""
    marker = Path(run_dir) / MARKER
    if not marker.exists():
        return {"marker": False, "thawed": []}
    try:
        mounts = [str(m) for m in json.loads(marker.read_text())["mountpoints"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise HvlabError(f"unreadable freeze marker {marker}: {exc}") from exc
    thawed = thaw_all([m for m in mounts if os.path.isdir(m)])
    marker.unlink(missing_ok=True)
    return {"marker": True, "listed": mounts, "thawed": thawed}


class Freezer(Protocol):
    def freeze(self, mountpoints: Sequence[Path]) -> list[str]: ...
    def thaw(self, mountpoints: Sequence[Path]) -> list[str]: ...


class FsFreezer:
    """The real thing."""

    def freeze(self, mountpoints: Sequence[Path]) -> list[str]:
        return freeze_all(mountpoints)

    def thaw(self, mountpoints: Sequence[Path]) -> list[str]:
        return thaw_all(mountpoints)
