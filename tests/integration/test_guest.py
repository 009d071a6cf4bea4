"""The guest emulator on real loop devices with real fsfreeze (root, loop, ext4, xfs)."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from guest_fixtures import VM, looplab, vm, vm_factory, write_in_thread

from hvlab.guest import ledger
from hvlab.guest.client import GuestUnavailable
from hvlab.guest.quiesce import recover_after_crash
from hvlab.guest.supervise import guest_status, start_guest, stop_guest
from hvlab_fixtures.plugin import requires
from hvlab_fixtures.waits import wait_for

pytestmark = pytest.mark.integration
__all__ = ["looplab", "vm", "vm_factory"]  # the fixtures, imported for pytest



@pytest.fixture(autouse=True)
def _needs_root() -> None:
    requires("root", "loop")  # in CI a missing capability fails instead of skipping


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
    t = write_in_thread(vm.disks[0].mountpoint / "probe.txt", b"written while frozen\n")
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
    t = write_in_thread(vm.disks[1].mountpoint / "probe.txt", b"written while frozen\n")
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
    t = write_in_thread(vm.disks[0].mountpoint / "after-crash.txt", b"written while frozen\n")
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
    t = write_in_thread(vm.disks[0].mountpoint / "after-restart.txt", b"written while frozen\n")
    t.join(0.5)
    assert t.is_alive(), "still frozen: nobody thawed"
    pid = start_guest(vm.config)
    t.join(20)
    assert not t.is_alive()
    assert not guest_status(vm.run_dir)["frozen_marker"]
    assert vm.client.status()["frozen"] is False
    assert pid != vm.pid
    stop_guest(vm.run_dir)


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
