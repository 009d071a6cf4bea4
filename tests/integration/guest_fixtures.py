"""Real block devices for the guest tests: sparse files -> loop devices -> ext4/xfs -> mounts.

Everything made here is torn down by the fixture's finalizer, which then asserts that no loop
device backed by its files remains. (Not conftest.py: imported by the modules that use it.)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hvlab.guest.quiesce import thaw_fs
from hvlab.sys.run import run


@dataclass
class Disk:
    name: str
    image: Path
    loop: str
    mountpoint: Path
    fstype: str


def loops_backed_by(base: Path) -> list[str]:
    out = json.loads(run(["losetup", "-J", "-l"]).stdout or '{"loopdevices": []}')
    return [
        d["name"]
        for d in out.get("loopdevices", [])
        if str(d.get("back-file") or "").startswith(str(base))
    ]


class LoopLab:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.loops: list[str] = []
        self.mounts: list[Path] = []

    def attach(self, image: Path, readonly: bool = False) -> str:
        argv = ["losetup", "-f", "--show", *(["-r"] if readonly else []), str(image)]
        dev = run(argv).stdout.strip()
        self.loops.append(dev)
        return dev

    def detach(self, dev: str) -> None:
        run(["losetup", "-d", dev])
        self.loops.remove(dev)

    def mount(self, dev: str, mnt: Path, opts: str | None = None) -> Path:
        mnt.mkdir(parents=True, exist_ok=True)
        run(["mount", *(["-o", opts] if opts else []), dev, str(mnt)])
        self.mounts.append(mnt)
        return mnt

    def umount(self, mnt: Path) -> None:
        run(["umount", str(mnt)])
        self.mounts.remove(mnt)

    def disk(self, name: str, fstype: str, size_mib: int) -> Disk:
        img = self.base / f"{name}.img"
        with open(img, "wb") as f:
            f.truncate(size_mib << 20)
        dev = self.attach(img)
        run(["mkfs.ext4", "-q", "-F", dev] if fstype == "ext4" else ["mkfs.xfs", "-q", "-f", dev])
        mnt = self.mount(dev, self.base / "mnt" / name)
        return Disk(name, img, dev, mnt, fstype)

    def copy(self, dev: str, dest: Path) -> Path:
        """Block-level copy of a device (what a checkpoint captures), bypassing the page cache."""
        run(
            [
                "dd",
                f"if={dev}",
                f"of={dest}",
                "bs=4M",
                "iflag=direct",
                "conv=sparse",
                "status=none",
            ],
            timeout=300,
        )
        return dest

    def mount_image_ro(self, image: Path, fstype: str, mnt: Path) -> Path:
        dev = self.attach(image, readonly=True)
        opts = "ro,noload" if fstype == "ext4" else "ro,norecovery,nouuid"
        return self.mount(dev, mnt, opts)

    def cleanup(self) -> None:
        errors = []
        for mnt in reversed(list(self.mounts)):
            with contextlib.suppress(OSError):
                thaw_fs(mnt)  # a failed test may have left it frozen
            try:
                self.umount(mnt)
            except Exception as exc:
                errors.append(f"umount {mnt}: {exc}")
        for dev in reversed(list(self.loops)):
            try:
                self.detach(dev)
            except Exception as exc:
                errors.append(f"losetup -d {dev}: {exc}")
        left = loops_backed_by(self.base)
        shutil.rmtree(self.base, ignore_errors=True)
        assert not errors, errors
        assert not left, f"loop devices left behind: {left}"


@pytest.fixture
def looplab() -> Iterator[LoopLab]:
    # Short path: Unix socket paths are limited to 108 bytes.
    lab = LoopLab(Path(tempfile.mkdtemp(prefix="hvg-", dir="/tmp")))
    try:
        yield lab
    finally:
        lab.cleanup()


def write_in_thread(path: Path, text: bytes = b"written\n") -> threading.Thread:
    """A write with fsync, as the guest's applications do: it blocks while the filesystem is
    frozen. The thread is started; join it to know the write went through."""
    def work() -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, text)
            os.fsync(fd)
        finally:
            os.close(fd)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    return t
