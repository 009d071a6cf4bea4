"""Faults injected below the flow by the kernel, lvm2's way: a fault target (dm-delay,
dm-dust) swapped in under the lab's PV while a backup runs. Each ends with nothing lost on
the live side and nothing left of the run, and the next backup verifies."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from hvlab.backup import restore as rst
from hvlab.backup import thinmeta
from hvlab.flow import actions, engine, faults
from hvlab.guest.client import GuestClient
from hvlab.lab import guests, pvfault, runs
from hvlab.sys import dmioctl
from hvlab.sys.run import run
from hvlab_fixtures.plugin import LabHandle, one_vm_lab
from hvlab_fixtures.waits import at_fault_point, wait_for

pytestmark = pytest.mark.integration

ONE_VM = one_vm_lab()


def _after_the_fault(h: LabHandle, pre: set[str], client: GuestClient, before: int) -> None:
    """What must hold once the fault is gone: the run unwound to the LV set it found, the
    guest runs on B, unfrozen, with every transaction it acknowledged, and the next backup
    verifies."""
    (failed,) = runs.all_runs(h.names)
    assert failed.state == "failed"
    assert h.lv_names() == pre and h.controller_maps_base("vm01", "disk0")
    st = client.status()
    assert not st["frozen"] and st["committed_txid"] >= before
    ok = engine.start(h.defn.name, ["vm01"], fingerprints=False)
    assert ok.state == "done" and rst.verify(h.defn.name, ok.id)["ok"]
    _commits_again(client, before)


def _commits_again(client: GuestClient, before: int) -> None:
    """The guest's workload commits again (when is its business: on a loaded machine it may
    not have yet; a minute is a hang guard)."""
    wait_for(lambda: client.status()["committed_txid"] > before, 60,
             lambda: f"the guest's workload committing again: {_writers(client)}")


def _writers(client: GuestClient) -> list[dict[str, object]]:
    return list(client.status()["writers"])


def test_a_suspend_that_does_not_return_is_bounded(lab_factory: Callable[..., LabHandle],
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    """A device below that does not complete writes (dm-delay, 60 s per write): step 5's
    suspend of the controller waits on the guest's writes in flight. It is given up at the
    end of the window (the kernel abandons an interrupted suspend and leaves the device
    running), the step fails and the run unwinds instead of hanging. The delay goes in when
    step 5 begins (step 4's LVM work writes the same PV) and out once the unwind starts (it
    removes the LVs step 4 allocated). A 4 s limit, not VSS's 10 s: the same path, waited
    out 6 s sooner."""
    monkeypatch.setattr(actions, "FLUSH_AND_HOLD_S", 4.0)
    h = lab_factory(ONE_VM, start_guests=True)
    client = GuestClient(guests.socket_path(h.names, "vm01"))
    client.workload(ops_per_s=200)
    pre, before = h.lv_names(), client.status()["committed_txid"]

    def slow_while_step_5(go: Path) -> None:
        with pvfault.delayed(h.names, 0, write_ms=60_000):
            go.touch()
            wait_for(lambda: any(r.state != "running" for r in runs.all_runs(h.names)), 300,
                     "the run leaving `running`")

    dmioctl.prepare_interrupts()  # pvfault's bounded suspend runs in the thread below
    # Crash-consistent: the guest is not frozen, so its writes are in flight at step 5.
    with (at_fault_point("step-05", slow_while_step_5, monkeypatch=monkeypatch,
                        tmp_path=tmp_path),
          pytest.raises(engine.FlowFailed, match="did not return within")):
        engine.start(h.defn.name, ["vm01"], fingerprints=False, app_aware="off")
    _after_the_fault(h, pre, client, before)


def _static_chunk(h: LabHandle, path: Path, block_bytes: int) -> int:
    """A pool chunk of the live disk that lies wholly inside `path` (which no guest writer
    touches): its virtual chunk number, from the file's extents (filefrag)."""
    out = run(["filefrag", "-v", "-b4096", str(path)]).stdout
    for m in re.finditer(r"^\s*\d+:\s+\d+\.\.\s*\d+:\s+(\d+)\.\.\s*(\d+):", out, re.M):
        first, last = int(m.group(1)) * 4096, (int(m.group(2)) + 1) * 4096
        chunk = -(-first // block_bytes)
        if (chunk + 1) * block_bytes <= last:
            return chunk
    raise AssertionError(f"no whole chunk inside {path}: {out}")


def test_read_errors_below_the_snapshot(lab_factory: Callable[..., LabHandle]) -> None:
    """Bad sectors (dm-dust) under a chunk the snapshot maps: step 13's read fails with EIO
    and says where, the partial image is removed, the run unwinds, and the live VM keeps
    its data (the chunk belongs to a file the guest never writes, as on a real disk where
    a bad sector sits under cold data)."""
    h = lab_factory(ONE_VM, start_guests=True)
    client = GuestClient(guests.socket_path(h.names, "vm01"))
    cold = h.mountpoint("vm01", "disk0") / "cold.bin"
    payload = os.urandom(1 << 20)
    with open(cold, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())  # a flush: the pool commits the mapping
    lv = h.names.lv("vm01", "disk0")
    thin_id = h.names.lvm().lvs(h.names.vg)[lv].thin_id
    assert thin_id is not None
    with thinmeta.metadata_snap(h.names) as ms:
        block_bytes, _ = ms.dump()
        data_block = dict(ms.mapping(thin_id).pairs)[_static_chunk(h, cold, block_bytes)]
    place = pvfault.locate(h.names, f"{h.names.pool}_tdata", data_block * block_bytes)
    first = place.offset // pvfault.DUST_BLOCK
    bad = range(first, first + block_bytes // pvfault.DUST_BLOCK)

    pre, before = h.lv_names(), client.status()["committed_txid"]
    with pvfault.bad_blocks(h.names, place.pv, bad):
        with pytest.raises(engine.FlowFailed, match="Input/output error reading"):
            engine.start(h.defn.name, ["vm01"], fingerprints=False)
        (failed,) = runs.all_runs(h.names)
        assert not list(Path(failed.dest).glob("*.img")), "a partial image was left"
    _after_the_fault(h, pre, client, before)
    run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"])
    assert cold.read_bytes() == payload, "the live disk lost the data under the bad sectors"


TWO_DISKS = one_vm_lab(2)


def test_the_second_disks_checkpoint_fails(lab_factory: Callable[..., LabHandle],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """C of disk0 made, C of disk1 fails (step 5, controllers held, guest frozen): the
    first is rolled back, the controllers run on B again, the guest thaws and goes on. The
    failure is raised by the flow between the two `create_snap`s (fault point s05-one): a fault
    in the kernel there would also fail the unwind's own LVM writes."""
    h = lab_factory(TWO_DISKS, start_guests=True)
    client = GuestClient(guests.socket_path(h.names, "vm01"))
    pre, before = h.lv_names(), client.status()["committed_txid"]
    monkeypatch.setenv(faults.ENV, "s05-one:raise")
    monkeypatch.setattr(faults, "_fired", set())
    with pytest.raises(engine.FlowFailed, match="s05-one"):
        engine.start(h.defn.name, ["vm01"], fingerprints=False)
    monkeypatch.delenv(faults.ENV)
    assert h.controller_maps_base("vm01", "disk1")
    _after_the_fault(h, pre, client, before)


def _pool_free_bytes(h: LabHandle) -> int:
    used, total = thinmeta.pool_usage(h.names)
    return (total - used) * (64 << 10)  # the lab's pools have 64 KiB chunks


def test_the_pool_fills_inside_the_freeze_window(lab_factory: Callable[..., LabHandle],
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    """fstests generic/459's case: another writer of the same pool fills its data space while
    the guest is frozen. The checkpoint is refused by LVM's rule ("free space in thin pool ...
    reached threshold"), which step 5 applies itself since the pool takes it, the job fails
    inside the window, unwinds and thaws the guest (its thaw
    writes B in place: no new chunk needed); once the pool is extended the next backup works.
    The guest's workload is paused: with the pool in error-when-full mode a write that needs
    a new chunk would fail with EIO, which is the pool's failure, not the backup's. And it is
    a Linux guest (fsfreeze, no VSS writer): a Windows guest's ledger holds a transaction open
    across the freeze and commits it at the thaw, paused or not, while the pool is full and
    step 4's LVs still share B's chunks; its journal write can need a new chunk, and ext4
    went read-only (EROFS: 2 runs of 7 in the lab VM)."""
    h = lab_factory(one_vm_lab(profile="linux"), start_guests=True)
    client = GuestClient(guests.socket_path(h.names, "vm01"))
    client.workload(pause=True)
    lvm = h.names.lvm()
    vg, filler = h.names.vg, "filler"
    lvm("lvcreate", "-q", "-V", "1G", "-T", f"{vg}/{h.names.pool}", "-n", filler,
        "--addtag", h.names.tag)
    dev = h.names.lv_path(filler)
    h.expect_extra(lvs=[filler])  # until the end of the test, where it is removed
    room = 4 << 20  # what the backup finds free; the filler takes it inside the window
    mib = (_pool_free_bytes(h) - room) >> 20
    run(["dd", "if=/dev/urandom", f"of={dev}", "bs=1M", f"count={mib}", "oflag=direct",
         "status=none"])
    pre, before = h.lv_names(), client.status()["committed_txid"]


    def fill_when_frozen(go: Path) -> None:
        assert client.status()["frozen"], "step 5 comes inside the freeze window"
        run(["dd", "if=/dev/urandom", f"of={dev}", "bs=1M", f"seek={mib}", "count=16",
             "oflag=direct", "status=none"], check=False)  # ENOSPC: the pool is full
        go.touch()

    with (at_fault_point("step-05", fill_when_frozen, monkeypatch=monkeypatch,
                        tmp_path=tmp_path),
          pytest.raises(engine.FlowFailed, match=r"reached threshold|out of data space")):
        engine.start(h.defn.name, ["vm01"], fingerprints=False)
    # Still full: the filler took the room. (Not 0: freeing the LVs step 4 allocated gave
    # back the chunks the guest's freeze had copied away from them.)
    assert _pool_free_bytes(h) < room
    (failed,) = runs.all_runs(h.names)
    assert failed.state == "failed" and h.lv_names() == pre
    assert h.controller_maps_base("vm01", "disk0") and not client.status()["frozen"]
    assert client.status()["committed_txid"] >= before

    lvm("lvextend", "-q", "-l", "+100%FREE", f"{vg}/{h.names.pool}")
    client.workload(pause=False)
    ok = engine.start(h.defn.name, ["vm01"], fingerprints=False)
    assert ok.state == "done" and rst.verify(h.defn.name, ok.id)["ok"]
    _commits_again(client, before)
    lvm("lvremove", "-q", "-y", f"{vg}/{filler}")
