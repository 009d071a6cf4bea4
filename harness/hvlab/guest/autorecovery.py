"""Auto-recovery inside the guest (Hyper-V's step 10): the host attaches A's disks, the guest
mounts them privately, rolls the writers' open work back (as Windows does on the auto-recovery
snapshot), checks the result and unmounts. Mounts live under the run dir, so that one a killed
guest left is found and removed by the next guest start or by `hvlab down`."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from hvlab.errors import CommandError
from hvlab.guest import ledger
from hvlab.guest.config import GuestConfig
from hvlab.guest.protocol import ProtocolError, one_line
from hvlab.sys import fs
from hvlab.sys.run import run

AR_PREFIX = "ar-"  # auto-recovery mounts: <run_dir>/ar-XXXX/<disk>

log = logging.getLogger("hvlab.guest")


def check_devices(cfg: GuestConfig, devices: object, *, auto_recovery: bool) -> None:
    """{disk: /dev/path}: each a known disk, each a distinct block device; where the guest
    mounts and repairs them (auto-recovery), none mounted already (the live disks are)."""
    if not isinstance(devices, dict) or not devices:
        raise ProtocolError("bad_args", "devices must be a non-empty {disk: /dev/path} map")
    mounted = mounted_devices() if auto_recovery else set()
    seen: dict[int, str] = {}
    for disk, dev in devices.items():
        if disk not in dict(cfg.disks):
            shown = disk if len(disk) <= 40 else disk[:40] + "..."
            raise ProtocolError("bad_args", f"unknown disk {shown!r}")
        if not isinstance(dev, str) or not dev.startswith("/") or "\0" in dev \
                or len(dev) > 4096:
            raise ProtocolError("bad_args", f"device of {disk} must be an absolute path")
        try:
            st = os.stat(dev)
        except OSError as exc:
            raise ProtocolError("bad_args", f"no such device {dev}: {exc.strerror}") from exc
        if not stat.S_ISBLK(st.st_mode):
            raise ProtocolError("bad_args", f"{dev} is not a block device")
        if st.st_rdev in seen:
            raise ProtocolError("bad_args", f"{dev} given for {seen[st.st_rdev]} and {disk}")
        seen[st.st_rdev] = disk
        if st.st_rdev in mounted:
            raise ProtocolError("bad_args", f"{dev} is mounted: not an auto-recovery image")

def recover(cfg: GuestConfig, devices: dict[str, str]) -> dict[str, Any]:
    """Mount the auto-recovery image's disks privately, run the writers' repair, unmount."""
    order = [n for n, _ in cfg.disks if n in devices]
    mounted: list[Path] = []
    roots: dict[str, Path] = {}
    # Under the run dir (inside the lab dir), so a mount left by a killed guest is found
    # and removed by the next guest start or by `hvlab down`.
    base = Path(tempfile.mkdtemp(prefix=AR_PREFIX, dir=cfg.run_dir))
    try:
        live = dict(cfg.disks)
        for name in order:
            dev = devices[name]
            # A is B at T0: the live disk's filesystem says what it is (no blkid exec)
            fstype = fs_type_of(live[name]) or run(["blkid", "-o", "value", "-s", "TYPE", dev],
                                                   check=False).stdout
            mnt = base / name
            mnt.mkdir()
            fstype = fstype.strip()
            # the live disk with the same UUID is mounted: xfs refuses a second without nouuid
            try:
                fs.mount_call(dev, mnt, fstype, "nouuid" if fstype == "xfs" else "")
            except OSError as exc:
                raise ProtocolError("failed", f"auto-recovery mount failed: {exc}") from exc
            mounted.append(mnt)
            roots[name] = mnt
        first, last = cfg.disks[0][0], cfg.disks[-1][0]
        if first in roots and last in roots:
            rep = ledger.recover(roots)
            result = ledger.check(roots)
            repaired: dict[str, Any] = rep.to_dict()
        else:
            repaired = {
                "removed": ledger.remove_excluded(roots),
                "note": "ledger disks not all given: ledger not repaired",
            }
            result = None
        # No sync(2) here: the umount below writes A's filesystems back before the answer
        # goes out, and a sync of every filesystem flushed all the other guests' writes too.
    except CommandError as exc:
        raise ProtocolError("failed", f"auto-recovery mount failed: {exc}") from exc
    except (ValueError, KeyError) as exc:  # a damaged image (TornPage is a ValueError)
        raise ProtocolError(
            "failed", f"auto-recovery failed, the image is damaged: {one_line(exc)}"
        ) from exc
    finally:
        errors = []
        for mnt in reversed(mounted):
            try:
                fs.umount_call(mnt)
            except OSError as exc:
                errors.append(str(exc))
        for d in [*(base / n for n in order), base]:
            with contextlib.suppress(OSError):
                d.rmdir()
        if errors:
            log.error("auto-recovery unmount failed: %s", errors)
    return {
        "repaired": repaired,
        "check": result.to_dict() if result else None,
        "devices": dict(devices),
    }


def fs_type_of(mountpoint: Path) -> str | None:
    """The type of the filesystem mounted at mountpoint, from /proc/self/mounts."""
    want = os.path.realpath(mountpoint)
    try:
        text = Path("/proc/self/mounts").read_text()
    except OSError:
        return None
    found = None
    for line in text.splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[1].replace("\\040", " ") == want:
            found = parts[2]  # the last mount there is the one in use
    return found


def mounted_devices() -> set[int]:
    """st_rdev of every block device with a filesystem mounted in this mount namespace."""
    found: set[int] = set()
    try:
        text = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return found
    for line in text.splitlines():
        parts = line.split()
        if len(parts) > 2 and ":" in parts[2]:
            major, _, minor = parts[2].partition(":")
            with contextlib.suppress(ValueError):
                found.add(os.makedev(int(major), int(minor)))
    return found


def clean_stale_ar_mounts(run_dir: Path) -> list[str]:
    """Unmount and remove auto-recovery mount dirs a killed guest left in run_dir."""
    done = []
    for m in sorted(fs.mounts_under(run_dir), key=lambda m: -len(m.target)):
        if Path(m.target).parent.name.startswith(AR_PREFIX):
            fs.umount(Path(m.target))
            done.append(m.target)
    for d in run_dir.glob(f"{AR_PREFIX}*"):
        for sub in d.iterdir():
            with contextlib.suppress(OSError):
                sub.rmdir()
        with contextlib.suppress(OSError):
            d.rmdir()
    return done
