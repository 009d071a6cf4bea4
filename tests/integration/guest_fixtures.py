"""Real block devices for the guest tests: sparse files -> loop devices -> ext4/xfs -> mounts,
and an emulated VM (a guest emulator over two of them) booted on them.

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from hvlab.guest.client import GuestClient
from hvlab.guest.quiesce import thaw_fs
from hvlab.guest.supervise import guest_status, start_guest, stop_guest
from hvlab.sys.run import run
from hvlab_fixtures.waits import wait_for


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


@dataclass
class VM:
    lab: LoopLab
    disks: list[Disk]
    run_dir: Path
    config: dict[str, Any]
    client: GuestClient
    pid: int

    @property
    def roots(self) -> dict[str, Path]:
        return {d.name: d.mountpoint for d in self.disks}


def boot(
    lab: LoopLab,
    profile: str = "windows",
    channel: dict[str, Any] | None = None,
    **workload: Any,
) -> VM:
    disks = [lab.disk("d0", "ext4", 64), lab.disk("d1", "xfs", 320)]
    run_dir = lab.base / "run"
    cfg = {
        "vm": "vm1",
        "profile": profile,
        "socket": str(run_dir / "is.sock"),
        "run_dir": str(run_dir),
        "disks": [{"name": d.name, "mountpoint": str(d.mountpoint)} for d in disks],
        "workload": {"ops_per_s": 50, "append_ops_per_s": 50, "scratch_ops_per_s": 20, **workload},
        "seed": 7,
        **({"channel": channel} if channel else {}),
    }
    pid = start_guest(cfg)
    return VM(lab, disks, run_dir, cfg, GuestClient(run_dir / "is.sock", timeout=30), pid)


def shutdown(vm: VM) -> None:
    stop_guest(vm.run_dir)
    assert not psutil.pid_exists(vm.pid) or psutil.Process(vm.pid).status() == "zombie"
    assert not guest_status(vm.run_dir)["alive"]


@pytest.fixture
def vm_factory(looplab: LoopLab) -> Iterator[Callable[..., VM]]:
    made: list[VM] = []

    def make(
        profile: str = "windows", channel: dict[str, Any] | None = None, **workload: Any
    ) -> VM:
        v = boot(looplab, profile, channel, **workload)
        made.append(v)
        return v

    yield make
    for v in made:
        shutdown(v)


@pytest.fixture
def vm(vm_factory: Callable[..., VM]) -> VM:
    v = vm_factory()
    wait_for(lambda: v.client.status()["committed_txid"] >= 5)
    return v
