"""dmsetup for the lab's own (non-LVM) devices: the virtual disk controllers.

No udev in the lab VM, so every change runs with --noudevsync and we make the node ourselves.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from hvlab.sys.run import run


@dataclass(frozen=True)
class DmDevice:
    name: str
    major: int
    minor: int
    open_count: int
    suspended: bool

    @property
    def path(self) -> str:
        return f"/dev/mapper/{self.name}"


def available() -> bool:
    return Path("/dev/mapper/control").exists()


def list_devices() -> list[DmDevice]:
    if not available():
        return []
    res = run(["dmsetup", "info", "-c", "--noheadings", "--separator", "|",
               "-o", "name,major,minor,open,attr"], check=False)
    if res.returncode != 0 or "No devices found" in res.stdout + res.stderr:
        return []
    devs = []
    for line in res.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 5:
            continue
        name, major, minor, opened, attr = parts
        devs.append(DmDevice(name, int(major), int(minor), int(opened), "s" in attr))
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


def create_linear(name: str, target_dev: str, *, uuid: str) -> str:
    run(["dmsetup", "create", name, "--noudevsync", "-u", uuid, "--table",
         linear_table(target_dev)])
    _mknode(name)
    return f"/dev/mapper/{name}"


@contextmanager
def suspended(*names: str) -> Iterator[list[str]]:
    """Hold every named device suspended (--nolockfs: the guest may hold fsfreeze, and a
    lockfs suspend would fail with EBUSY on 6.1); all are resumed, in reverse, however the
    block ends. Yields the devices suspended so far."""
    held: list[str] = []
    try:
        for n in names:
            run(["dmsetup", "suspend", "--nolockfs", "--noudevsync", n])
            held.append(n)
        yield held
    finally:
        for n in reversed(held):
            run_resume(n)


def reload_linear(name: str, target_dev: str) -> None:
    """Load a linear table onto target_dev; it becomes live at the next resume."""
    run(["dmsetup", "reload", name, "--table", linear_table(target_dev)])


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
