"""dmsetup for the lab's own (non-LVM) devices: the virtual disk controllers.

No udev in the lab VM, so every change runs with --noudevsync and we make the node ourselves.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from hvlab.errors import CommandError, HvlabError
from hvlab.sys.run import run


@dataclass(frozen=True)
class DmDevice:
    name: str
    major: int
    minor: int
    open_count: int
    suspended: bool
    uuid: str = ""

    @property
    def path(self) -> str:
        return f"/dev/mapper/{self.name}"


def available() -> bool:
    return Path("/dev/mapper/control").exists()


def list_devices() -> list[DmDevice]:
    if not available():
        return []
    res = run(["dmsetup", "info", "-c", "--noheadings", "--separator", "|",
               "-o", "name,major,minor,open,attr,uuid"], check=False)
    if res.returncode != 0 or "No devices found" in res.stdout + res.stderr:
        return []
    devs = []
    for line in res.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 6:
            continue
        name, major, minor, opened, attr, uuid = parts
        devs.append(DmDevice(name, int(major), int(minor), int(opened), "s" in attr, uuid))
    return devs


def devices_with_prefix(prefix: str) -> list[DmDevice]:
    return [d for d in list_devices() if d.name.startswith(prefix)]


def block_size_sectors(dev: str) -> int:
    return int(run(["blockdev", "--getsz", dev]).stdout.strip())


def majmin(dev: str) -> str:
    st = os.stat(dev)
    if not stat.S_ISBLK(st.st_mode):
        raise ValueError(f"{dev} is not a block device")
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def linear_table(target_dev: str) -> str:
    return f"0 {block_size_sectors(target_dev)} linear {majmin(target_dev)} 0"


def _mknode(name: str) -> None:
    run(["dmsetup", "mknodes", name], check=False)


def create(name: str, table: str, *, uuid: str) -> str:
    run(["dmsetup", "create", name, "--noudevsync", "-u", uuid, "--table", table])
    _mknode(name)
    return f"/dev/mapper/{name}"


def create_linear(name: str, target_dev: str, *, uuid: str) -> str:
    return create(name, linear_table(target_dev), uuid=uuid)


class SuspendTimeout(HvlabError):
    """A suspend waits for the I/O in flight below the device; it did not complete in time."""


def suspend(name: str, *, timeout: float = 120.0) -> None:
    """Suspend (--nolockfs: the guest may hold fsfreeze, and a lockfs suspend would fail with
    EBUSY on 6.1). The kernel waits interruptibly for in-flight I/O: killing dmsetup at the
    timeout makes it give up and leave the device running, so a device below that never
    completes its I/O costs at most `timeout`, not a hang."""
    try:
        run(["dmsetup", "suspend", "--nolockfs", "--noudevsync", name], timeout=timeout)
    except CommandError as exc:
        if exc.returncode != -1:
            raise
        raise SuspendTimeout(f"suspend of {name} did not return within {timeout:.1f} s: "
                             f"I/O below it does not complete; left running") from None


def reload(name: str, table: str) -> None:
    """Load a table; it becomes live at the next resume."""
    run(["dmsetup", "reload", name, "--table", table])


def message(name: str, *words: str) -> str:
    return run(["dmsetup", "message", name, "0", *words]).stdout


def status(name: str) -> str:
    return run(["dmsetup", "status", name]).stdout


def _slaves_of(majmin_: str) -> list[str]:
    try:
        return sorted(os.listdir(f"/sys/dev/block/{majmin_}/slaves"))
    except OSError:
        return []


def leaves(dev: DmDevice) -> set[str]:
    """The non-dm devices (loop0, ...) at the bottom of dev's stack, from sysfs."""
    out: set[str] = set()
    todo = _slaves_of(f"{dev.major}:{dev.minor}")
    seen: set[str] = set()
    while todo:
        k = todo.pop()
        if k in seen:
            continue
        seen.add(k)
        if k.startswith("dm-"):
            try:
                todo += os.listdir(f"/sys/class/block/{k}/slaves")
            except OSError:
                continue
        else:
            out.add(k)
    return out


def slave_name(name: str) -> str | None:
    """The dm name of the one device a stacked dm device maps, from sysfs (no exec: cheap
    enough to ask after every step). None when not exactly one dm device lies below."""
    try:
        # /dev/mapper nodes are real nodes here (no udev symlinks): go by major:minor
        rdev = os.stat(f"/dev/mapper/{name}").st_rdev
        sysdir = f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}"
        slaves = os.listdir(f"{sysdir}/slaves")
        if len(slaves) != 1:
            return None
        return Path(f"/sys/class/block/{slaves[0]}/dm/name").read_text().strip()
    except OSError:
        return None


def target_of(name: str) -> str:
    """major:minor the linear device currently maps to."""
    table = run(["dmsetup", "table", name]).stdout.split()
    return table[3]


def remove(name: str) -> None:
    if not any(d.name == name for d in list_devices()):
        return
    run(["dmsetup", "remove", "--noudevsync", "--retry", name])
    node = Path("/dev/mapper") / name
    if node.exists() or node.is_symlink():
        node.unlink()


def run_resume(name: str) -> None:
    run(["dmsetup", "resume", "--noudevsync", name], check=False)
