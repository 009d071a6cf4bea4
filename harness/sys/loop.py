"""Loop devices: attach atomically (`losetup -f --show`), list as JSON, detach and verify."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hvlab.errors import LeakError
from hvlab.sys import uevents
from hvlab.sys.run import run


@dataclass(frozen=True)
class Loop:
    name: str  # /dev/loopN
    back_file: str
    read_only: bool


def list_loops() -> list[Loop]:
    out = run(["losetup", "-J", "-l", "-O", "NAME,BACK-FILE,RO"]).stdout.strip()
    if not out:
        return []
    loops = []
    for d in json.loads(out).get("loopdevices", []):
        back = (d.get("back-file") or "").removesuffix(" (deleted)")
        ro = d.get("ro") in (True, 1, "1")
        loops.append(Loop(d["name"], back, ro))
    return loops


def loops_under(directory: Path) -> list[Loop]:
    """Loops whose backing file lies inside `directory` (ownership by path)."""
    prefix = str(directory.resolve()).rstrip("/") + "/"
    return [lo for lo in list_loops() if lo.back_file.startswith(prefix)]


def attach(path: Path, *, read_only: bool = False) -> str:
    """Attach `path`; --find and --show in one call, so no race with another attacher."""
    argv = ["losetup", "--find", "--show", "--direct-io=off"]
    if read_only:
        argv.append("--read-only")
    argv.append(str(path))
    return run(argv).stdout.strip()


def detach(dev: str, *, timeout: float = 10.0) -> None:
    """Detach and verify: `losetup -d` on a busy loop exits 0 and only sets autoclear."""
    if not any(lo.name == dev for lo in list_loops()):
        return
    run(["losetup", "-d", dev], check=False)
    try:  # the loop's "change" uevent wakes us; no blind sleeps
        uevents.wait_for(lambda: not any(lo.name == dev for lo in list_loops()), timeout, dev)
    except TimeoutError:
        raise LeakError(f"loop device {dev} is still attached (busy?) after losetup -d") from None
