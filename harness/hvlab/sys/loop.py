"""Loop devices: attach atomically (`losetup -f --show`), list from sysfs, detach and verify.

Listing reads /sys/block/loopN/loop/ (where `losetup -l` itself reads it): a lab's down lists
them a dozen times, and one `losetup` exec costs ~0.07 s in the lab VM.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from hvlab.errors import LeakError
from hvlab.sys import uevents
from hvlab.sys.run import run

SYS_BLOCK = Path("/sys/block")
DELETED = " (deleted)"  # the kernel's d_path suffix for a backing file since unlinked


@dataclass(frozen=True)
class Loop:
    name: str  # /dev/loopN
    back_file: str
    read_only: bool


def backing_path(sysfs_text: str) -> str:
    """A loop's backing_file attribute -> the path: the kernel's newline and the
    ' (deleted)' of an unlinked file dropped (ownership is by path even then)."""
    return sysfs_text.removesuffix("\n").removesuffix(DELETED)


def read_loop(sysdir: Path) -> Loop | None:
    """The loop at /sys/block/loopN, or None when nothing is attached to it (no loop/ there,
    or it was detached while we read)."""
    try:
        back = (sysdir / "loop" / "backing_file").read_text()
        ro = (sysdir / "ro").read_text().strip() == "1"
    except OSError:
        return None
    return Loop(f"/dev/{sysdir.name}", backing_path(back), ro)


def list_loops() -> list[Loop]:
    """Every attached loop with its backing file, in loop number order (as `losetup -l`)."""
    try:
        names = [n for n in os.listdir(SYS_BLOCK) if n.startswith("loop") and n[4:].isdigit()]
    except OSError:
        return []
    loops = [read_loop(SYS_BLOCK / n) for n in sorted(names, key=lambda n: int(n[4:]))]
    return [lo for lo in loops if lo is not None]


def loops_under(directory: Path) -> list[Loop]:
    """Loops whose backing file lies inside `directory` (ownership by path)."""
    prefix = str(directory.resolve()).rstrip("/") + "/"
    return [lo for lo in list_loops() if lo.back_file.startswith(prefix)]


def attached(dev: str) -> bool:
    return read_loop(SYS_BLOCK / Path(dev).name) is not None


def attach(path: Path, *, read_only: bool = False) -> str:
    """Attach `path`; --find and --show in one call, so no race with another attacher."""
    argv = ["losetup", "--find", "--show", "--direct-io=off"]
    if read_only:
        argv.append("--read-only")
    argv.append(str(path))
    return run(argv).stdout.strip()


def detach(dev: str, *, timeout: float = 10.0) -> None:
    """Detach and verify: `losetup -d` on a busy loop exits 0 and only sets autoclear."""
    if not attached(dev):
        return
    run(["losetup", "-d", dev], check=False)
    try:  # the loop's "change" uevent wakes us; no blind sleeps
        uevents.wait_for(lambda: not attached(dev), timeout, dev)
    except TimeoutError:
        raise LeakError(f"loop device {dev} is still attached (busy?) after losetup -d") from None
