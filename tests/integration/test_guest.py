"""The guest emulator on real loop devices with real fsfreeze (root, loop, ext4, xfs)."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from guest_fixtures import Disk, LoopLab, looplab

from hvlab.fixtures.plugin import requires
from hvlab.guest import ledger
from hvlab.guest.client import GuestClient, GuestError, GuestUnavailable
from hvlab.guest.quiesce import recover_after_crash
from hvlab.guest.supervise import guest_status, start_guest, stop_guest

pytestmark = pytest.mark.integration
__all__ = ["looplab"]  # the fixture, imported for pytest



@pytest.fixture(autouse=True)
def _needs_root() -> None:
    requires("root", "loop")  # in CI a missing capability fails instead of skipping


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


def wait_for(pred: Callable[[], bool], timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.05)


def boot(lab: LoopLab, profile: str = "windows", **workload: Any) -> VM:
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

    def make(profile: str = "windows", **workload: Any) -> VM:
        v = boot(looplab, profile, **workload)
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


def write_in_thread(path: Path) -> threading.Thread:
    def work() -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, b"written while frozen\n")
            os.fsync(fd)
        finally:
            os.close(fd)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    return t


def snapshot_images(vm: VM, tag: str) -> dict[str, Path]:
    """Copy every disk block-for-block (call while frozen: this is B at T0)."""
    return {d.name: vm.lab.copy(d.loop, vm.lab.base / f"{tag}-{d.name}.img") for d in vm.disks}


def mount_ro(vm: VM, images: dict[str, Path], tag: str) -> dict[str, Path]:
    return {
        d.name: vm.lab.mount_image_ro(images[d.name], d.fstype, vm.lab.base / tag / d.name)
        for d in vm.disks
    }


def scratch_files(roots: dict[str, Path]) -> list[Path]:
    return [f for r in roots.values() for f in (r / "scratch").glob("*.tmp")]


def umount_all(vm: VM, roots: dict[str, Path]) -> None:
    for mnt in roots.values():
        vm.lab.umount(mnt)
    for dev in list(vm.lab.loops):
        if dev not in {d.loop for d in vm.disks}:
            vm.lab.detach(dev)


def test_identify_and_status(vm: VM) -> None:
    ident = vm.client.identify()
    assert ident["auto_recovery"] is True and ident["pid"] == vm.pid
    st = guest_status(vm.run_dir)
    assert st["alive"] and st["pid"] == vm.pid
    wait_for(lambda: (guest_status(vm.run_dir)["status"] or {}).get("committed_txid", 0) > 0)
    assert (vm.client.socket_path.stat().st_mode & 0o777) == 0o600
    assert start_guest(vm.config) == vm.pid  # idempotent


def test_write_while_frozen_blocks_until_thaw(vm: VM) -> None:
    fr = vm.client.freeze(timeout_s=30)
    marker = (vm.run_dir / "frozen").read_text()
    assert all(str(d.mountpoint) in marker for d in vm.disks)
    seq = vm.client.status()["writers"][-1]["seq"]
    t = write_in_thread(vm.disks[0].mountpoint / "probe.txt")
    t.join(1.0)
    assert t.is_alive(), "a write to a frozen filesystem must block"
    assert vm.client.status()["writers"][-1]["seq"] <= seq + 1  # the appender is stuck too
    th = vm.client.thaw()
    assert th["timed_out"] is False and th["thawed_at"] >= fr["frozen_at"]
    t.join(20)
    assert not t.is_alive()
    assert (vm.disks[0].mountpoint / "probe.txt").read_bytes() == b"written while frozen\n"
    assert not (vm.run_dir / "frozen").exists()
    wait_for(lambda: vm.client.status()["writers"][-1]["seq"] > seq + 1)


def test_watchdog_thaws_after_timeout(vm: VM) -> None:
    vm.client.freeze(timeout_s=1)
    t = write_in_thread(vm.disks[1].mountpoint / "probe.txt")
    t.join(20)  # never sent thaw: the guest's own watchdog must release the write
    assert not t.is_alive()
    wait_for(lambda: vm.client.status()["timed_out"])
    st = vm.client.status()
    assert st["frozen"] is False and st["timed_out"] is True
    assert st["timeout"]["error_code"] == "VSS_E_FLUSH_WRITES_TIMEOUT"
    th = vm.client.thaw()
    assert th["timed_out"] is True and th["frozen_for_s"] < 15
    assert not (vm.run_dir / "frozen").exists()


def test_checker_accepts_quiesced_image_and_rejects_torn_one(
    vm_factory: Callable[..., VM],
) -> None:
    vm = vm_factory(hold_open_txn=False)
    wait_for(lambda: vm.client.status()["committed_txid"] >= 5)
    fr = vm.client.freeze(timeout_s=30)
    images = snapshot_images(vm, "t0")
    vm.client.thaw()
    t0 = fr["t0"]["ledger"]
    assert fr["open_txid"] is None
    roots = mount_ro(vm, images, "ro")
    res = ledger.check(roots)
    assert res.consistent, res.problems
    assert (res.last_txid, res.last_hash) == (t0["last_txid"], t0["last_hash"])
    umount_all(vm, roots)
    # tear page 1 of the copy: half new bytes, half old
    dev = vm.lab.attach(images["d1"])
    mnt = vm.lab.mount(dev, vm.lab.base / "rw" / "d1", "nouuid")
    with open(mnt / "ledger" / "pages.db", "r+b") as f:
        f.seek(ledger.PAGE_SIZE + ledger.PAGE_SIZE // 2)
        f.write(os.urandom(ledger.PAGE_SIZE // 2))
    vm.lab.umount(mnt)
    vm.lab.detach(dev)
    roots = mount_ro(vm, images, "torn")
    res = ledger.check(roots)
    assert not res.consistent
    assert any("page 1" in p and "torn" in p for p in res.problems), res.problems
    umount_all(vm, roots)


def test_auto_recovery_repairs_unfinished_txn(vm: VM) -> None:
    fr = vm.client.freeze(timeout_s=30)
    images = snapshot_images(vm, "b")
    vm.client.thaw()
    t0, open_txid = fr["t0"]["ledger"], fr["open_txid"]
    assert open_txid == t0["last_txid"] + 1
    # B at T0: committed up to t0, one transaction open -> not consistent until recovered
    roots = mount_ro(vm, images, "raw")
    raw = ledger.check(roots)
    assert raw.unfinished == open_txid and not raw.consistent
    assert (raw.last_txid, raw.last_hash) == (t0["last_txid"], t0["last_hash"])
    assert scratch_files(roots)
    umount_all(vm, roots)
    # A: a writable fork of B handed to the guest
    devs = {d.name: vm.lab.attach(images[d.name]) for d in vm.disks}
    rep = vm.client.post_snapshot(devs)
    assert rep["auto_recovery"] is True
    assert rep["repaired"]["rolled_back"] == open_txid and rep["repaired"]["removed"]
    assert rep["check"]["consistent"] is True
    for dev in devs.values():
        vm.lab.detach(dev)
    roots = mount_ro(vm, images, "fixed")
    fixed = ledger.check(roots)
    assert fixed.consistent, fixed.problems
    assert (fixed.last_txid, fixed.last_hash) == (t0["last_txid"], t0["last_hash"])
    assert not scratch_files(roots)
    umount_all(vm, roots)
    # the fix-ups never reach the live disks: scratch files stay, the held txn was committed
    assert scratch_files(vm.roots)
    wait_for(lambda: vm.client.status()["committed_txid"] > open_txid)


def test_kill9_while_frozen_is_recovered(vm: VM) -> None:
    vm.client.freeze(timeout_s=60)
    os.kill(vm.pid, signal.SIGKILL)
    wait_for(lambda: not guest_status(vm.run_dir)["alive"])
    assert guest_status(vm.run_dir)["frozen_marker"]
    t = write_in_thread(vm.disks[0].mountpoint / "after-crash.txt")
    t.join(0.5)
    assert t.is_alive(), "still frozen: nobody thawed"
    done = recover_after_crash(vm.run_dir)
    assert sorted(done["thawed"]) == sorted(str(d.mountpoint) for d in vm.disks)
    t.join(20)
    assert not t.is_alive()
    assert recover_after_crash(vm.run_dir) == {"marker": False, "thawed": []}
    res = stop_guest(vm.run_dir)
    assert res["was_running"] is False
    with pytest.raises(GuestUnavailable):
        vm.client.status()


def test_guest_start_after_kill9_while_frozen_thaws_first(vm: VM) -> None:
    """`hvlab guest start` (and `up`) is a next command too: it thaws before the new guest."""
    vm.client.freeze(timeout_s=60)
    os.kill(vm.pid, signal.SIGKILL)
    wait_for(lambda: not guest_status(vm.run_dir)["alive"])
    t = write_in_thread(vm.disks[0].mountpoint / "after-restart.txt")
    t.join(0.5)
    assert t.is_alive(), "still frozen: nobody thawed"
    pid = start_guest(vm.config)
    t.join(20)
    assert not t.is_alive()
    assert not guest_status(vm.run_dir)["frozen_marker"]
    assert vm.client.status()["frozen"] is False
    assert pid != vm.pid
    stop_guest(vm.run_dir)


def test_bad_channel_input(vm: VM) -> None:
    c = vm.client
    assert c.raw(b"{{{ not json")["code"] == "bad_json"
    assert c.raw(b'{"op": "format_c"}')["code"] == "unknown_op"
    with pytest.raises(GuestError, match="thaw without freeze"):
        c.thaw()
    c.freeze(timeout_s=30)
    with pytest.raises(GuestError, match="already frozen"):
        c.freeze(timeout_s=30)
    # a second client while the first holds the channel
    first = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    first.settimeout(10)
    first.connect(str(c.socket_path))
    first.sendall(b'{"op":"status"}\n')
    assert b'"frozen":true' in first.makefile("rb").readline()
    busy = GuestClient(c.socket_path, timeout=10).raw(b'{"op":"thaw"}')
    assert busy["ok"] is False and busy["code"] == "busy"
    first.close()
    wait_for(lambda: c.raw(b'{"op":"status"}')["ok"])
    c.thaw()
    with pytest.raises(GuestError, match="no such device"):
        c.post_snapshot({"d0": "/dev/hvlab-no-such-device"})
    n = c.status()["committed_txid"]
    wait_for(lambda: c.status()["committed_txid"] > n + 3)
    st = c.status()
    assert all(w["state"] == "running" and not w["error"] for w in st["writers"])
    stop_guest(vm.run_dir)
    res = ledger.check(vm.roots)  # clean stop: the live store is consistent
    assert res.consistent, res.problems
    assert res.last_txid >= n + 3


def test_profile_none_has_no_channel(vm_factory: Callable[..., VM]) -> None:
    vm = vm_factory("none")
    assert not vm.client.socket_path.exists()
    with pytest.raises(GuestUnavailable):
        vm.client.identify()
    st = guest_status(vm.run_dir)
    assert st["alive"] and st["status"]["profile"] == "none"


def test_profile_linux_freezes_without_auto_recovery(vm_factory: Callable[..., VM]) -> None:
    vm = vm_factory("linux")
    ident = vm.client.identify()
    assert ident["auto_recovery"] is False
    fr = vm.client.freeze(timeout_s=30)
    assert fr["open_txid"] is None
    vm.client.thaw()
    rep = vm.client.post_snapshot({"d0": vm.disks[0].loop})
    assert rep["auto_recovery"] is False and rep["repaired"] is None
