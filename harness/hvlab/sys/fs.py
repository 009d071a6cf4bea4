"""Filesystems: mkfs, mount/umount with verification, fsck, fsfreeze."""

from __future__ import annotations

import ctypes
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

from hvlab.errors import HvlabError, LeakError
from hvlab.sys.run import Result, run

FILESYSTEMS = ("ext4", "xfs")
# mkfs.xfs in Debian 12 refuses filesystems below 300 MiB.
MIN_SIZE = {"ext4": 16 << 20, "xfs": 300 << 20}
FITHAW = 0xC0045878  # _IOWR('X', 120, int): what `fsfreeze --unfreeze` sends


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    fstype: str
    options: str


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")


def mounts() -> list[Mount]:
    out = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        src, tgt, fstype, opts, *_ = line.split()
        out.append(Mount(_unescape(src), _unescape(tgt), fstype, opts))
    return out


def mounts_under(directory: Path) -> list[Mount]:
    prefix = str(directory.resolve()).rstrip("/") + "/"
    return [m for m in mounts() if m.target.startswith(prefix)]


def is_mounted(target: Path) -> bool:
    t = str(target.resolve())
    return any(m.target == t for m in mounts())


def mkfs(dev: str, fstype: str, label: str) -> None:
    if fstype == "ext4":
        # lazy init off: otherwise ext4lazyinit keeps writing after mkfs and pollutes deltas.
        run(["mkfs.ext4", "-q", "-F", "-L", label[:16], "-E",
             "lazy_itable_init=0,lazy_journal_init=0,nodiscard", dev], timeout=300)
    elif fstype == "xfs":
        run(["mkfs.xfs", "-q", "-f", "-K", "-L", label[:12], dev], timeout=300)
    else:
        raise ValueError(fstype)


def mount(dev: str, target: Path, fstype: str, *, read_only: bool = False,
          extra: tuple[str, ...] = ()) -> None:
    target.mkdir(parents=True, exist_ok=True)
    opts = ["ro" if read_only else "rw", *extra]
    if fstype == "xfs":
        opts.append("nouuid")  # snapshots share the UUID of their origin
    run(["mount", "-t", fstype, "-o", ",".join(opts), dev, str(target)])


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def mount_call(dev: str, target: Path, fstype: str, options: str = "") -> None:
    """mount(2) itself, as mount(8) sends it for a plain `mount -t TYPE -o OPTIONS DEV DIR`:
    for a guest that mounts many times (auto-recovery), where each exec of mount(8) costs
    40-80 ms of the lab VM's one CPU. OSError naming the device when the kernel refuses."""
    if _libc.mount(dev.encode(), str(target).encode(), fstype.encode(), 0,
                   options.encode() or None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {dev} on {target} ({fstype}): {os.strerror(err)}")


def umount_call(target: Path) -> None:
    """umount(2): what `umount DIR` sends (writes the filesystem back before it returns)."""
    if _libc.umount2(str(target).encode(), 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {target}: {os.strerror(err)}")


def umount(target: Path) -> None:
    if not is_mounted(target):
        return
    run(["umount", str(target)])
    if is_mounted(target):
        raise LeakError(f"{target} is still mounted after umount")


def fsck_readonly(dev: str, fstype: str) -> Result:
    if fstype == "xfs":
        return run(["xfs_repair", "-n", dev], check=False, timeout=600)
    return run(["fsck.ext4", "-n", "-f", dev], check=False, timeout=600)


def repair(dev: str, fstype: str, scratch: Path) -> str:
    """Check and repair an unmounted filesystem, as a boot does after an error: ext4's
    e2fsck replays the journal and fixes (exit 1: fixed; 2: fixed, reboot); xfs_repair
    wants the log replayed first, by a mount (at `scratch`, an empty folder). Returns what
    it did, one line; HvlabError when it could not."""
    if fstype == "xfs":
        mount_call(dev, scratch, fstype, "nouuid")
        umount_call(scratch)
        res = run(["xfs_repair", dev], check=False, timeout=600)
        ok = res.returncode == 0
    else:
        res = run(["fsck.ext4", "-f", "-y", dev], check=False, timeout=600)
        ok = res.returncode in (0, 1, 2)
    if not ok:
        raise HvlabError(f"{fstype} repair of {dev} failed (exit {res.returncode}): "
                         f"{(res.stdout + res.stderr).strip().splitlines()[-1:]}")
    fixed = fstype == "ext4" and res.returncode != 0
    return f"{dev}: {fstype} {'repaired' if fixed else 'clean'}"


def freeze(target: Path) -> None:
    run(["fsfreeze", "--freeze", str(target)])


def thaw(target: Path) -> bool:
    """Thaw; False when it was not frozen (EINVAL), which is fine for recovery paths, or could
    not be asked (not a directory, gone): where `fsfreeze --unfreeze` failed too. The ioctl
    itself, as fsfreeze sends it on the mountpoint, without the ~0.05 s exec."""
    try:
        fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.ioctl(fd, FITHAW, 0)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True
