"""The lab's own (non-LVM) dm devices: PVs, virtual disk controllers, attach devices.

Through dmioctl (ioctls on /dev/mapper/control), not the `dmsetup` command: in the lab VM one
dmsetup exec costs ~0.1 s and a lab's up/down ran dozens. Same names, same text shapes as
dmsetup prints (tables, status lines), so callers did not change. No udev in the lab VM:
dmioctl makes and removes the /dev/mapper nodes itself (as `dmsetup mknodes` did).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from hvlab.errors import HvlabError
from hvlab.sys import dmioctl
from hvlab.sys.dmioctl import DmError, SuspendTimeout, Target

__all__ = ["DmDevice", "DmError", "SuspendTimeout", "available", "block_size_sectors",
           "create", "create_linear", "devices_with_prefix", "leaves", "linear_table",
           "list_devices", "majmin", "message", "parse_table", "remove",
           "run_resume", "slave_name", "status", "table", "table_text",
           "target_of"]

BLKGETSIZE64 = 0x80081272  # _IOR(0x12, 114, size_t)
REMOVE_RETRIES = 100  # x 50 ms: the 5 s `dmsetup remove --retry` waited for a closing opener


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
    """Every dm device; [] where there is no device-mapper (a control node without the kernel
    part behind it too, as `dmsetup info` said nothing there)."""
    if not available():
        return []
    try:
        infos = dmioctl.list_devices()
    except DmError as exc:
        if exc.op != "open":
            raise
        return []
    return [DmDevice(i.name, i.major, i.minor, i.open_count, i.suspended, i.uuid)
            for i in infos]


def devices_with_prefix(prefix: str) -> list[DmDevice]:
    return [d for d in list_devices() if d.name.startswith(prefix)]


def block_size_sectors(dev: str) -> int:
    """Size in 512-byte sectors (`blockdev --getsz`), from sysfs: no open of the device."""
    rdev = _rdev(dev)
    try:
        return int(Path(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}/size").read_text())
    except (OSError, ValueError):
        pass
    fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
    try:
        raw = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
    finally:
        os.close(fd)
    return int(struct.unpack("=Q", raw)[0]) // 512


def _rdev(dev: str) -> int:
    st = os.stat(dev)
    if not stat.S_ISBLK(st.st_mode):
        raise ValueError(f"{dev} is not a block device")
    return st.st_rdev


def majmin(dev: str) -> str:
    rdev = _rdev(dev)
    return f"{os.major(rdev)}:{os.minor(rdev)}"


def linear_table(target_dev: str) -> str:
    return f"0 {block_size_sectors(target_dev)} linear {majmin(target_dev)} 0"


def parse_table(text: str) -> list[Target]:
    """dmsetup's table text (one `start length type params` line per target) -> targets."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    try:
        return [Target.parse(ln) for ln in lines]
    except ValueError:
        raise HvlabError(f"not a device-mapper table: {text.strip()!r}") from None


def table_text(targets: list[Target]) -> str:
    """Targets as `dmsetup table`/`status` print them: a line each."""
    return "".join(f"{t.line}\n" for t in targets)


def create(name: str, table: str, *, uuid: str) -> str:
    """Create, load, resume and make the node (`dmsetup create` + `mknodes`); nothing is
    left when a step fails."""
    dmioctl.create(name, parse_table(table), uuid=uuid)
    return f"/dev/mapper/{name}"


def create_linear(name: str, target_dev: str, *, uuid: str) -> str:
    return create(name, linear_table(target_dev), uuid=uuid)


def message(name: str, *words: str) -> str:
    """Send a message to the target at sector 0; what it answered, a line (as dmsetup
    prints it), or ''."""
    answer = dmioctl.message(name, " ".join(words))
    return answer if not answer or answer.endswith("\n") else f"{answer}\n"


def status(name: str, *, noflush: bool = False) -> str:
    """`dmsetup status [--noflush] NAME`: a line per target. noflush: a thin pool does not
    commit its metadata first."""
    return table_text(dmioctl.status(name, noflush=noflush))


def table(name: str) -> str:
    """`dmsetup table NAME`: the live table, a line per target ('' when none is loaded)."""
    return table_text(dmioctl.table(name))


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
    """The dm name of the one device a stacked dm device maps, from sysfs (cheap enough to
    ask after every step). None when not exactly one dm device lies below."""
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
    targets = dmioctl.table(name)
    if not targets or not targets[0].params:
        raise DmError("table", name, errno.ENODATA,
                      f"device-mapper device {name} has no live table to map a device")
    return targets[0].params.split()[0]


def remove(name: str) -> None:
    """Remove the device and its node; nothing to do when it is gone. An opener that is just
    going away (EBUSY) is waited for, as `dmsetup remove --retry` does."""
    dmioctl.remove(name, missing_ok=True, retries=REMOVE_RETRIES)


def run_resume(name: str) -> None:
    """Resume; errors ignored (recovery paths resume whatever may be suspended)."""
    with contextlib.suppress(DmError):
        dmioctl.resume(name)
