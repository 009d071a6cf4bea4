"""The second disk's checkpoint refused by the kernel (issue 23, item 4), not by a fault point.

Inside the freeze window, after the first disk's C (fault point s05-one waits), the extents of
the pool's metadata LV are swapped for dm-error under the PV, as a failing disk would do it.
The pool's next commit (the second disk's `delete`) fails, dm-thin fails the pool, and the
second `create_snap` is refused (ENOTSUP). The run must say so in one line, resume and thaw
the guest, and leave LVM's metadata as it was (no half lvremove on a pool that cannot delete).
Once the disk is healed, `hvlab recover` brings the pool back the host's way (stop, up: LVM's
thin_check clears needs_check) and then the unwind's own LVM writes work: nothing of the run
is left, LVM and the kernel agree, no acknowledged transaction is lost, the next backup
verifies."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from hvlab.backup import restore as rst
from hvlab.backup import thinmeta
from hvlab.flow import engine, faults
from hvlab.guest import ledger
from hvlab.guest.client import GuestClient
from hvlab.guest.writers import last_ack
from hvlab.lab import guests, poolhealth, pvfault, runs
from hvlab.sys import dm
from hvlab_fixtures.plugin import LabHandle, one_vm_lab
from hvlab_fixtures.waits import wait_for

pytestmark = pytest.mark.integration

# Writers paused as the lab starts (the test lets them go): the repair restarts the guest
# paused, so its ledger stands still at what survived and compares exactly.
LAB = one_vm_lab([("64M", "ext4"), ("320M", "xfs")], backing="1G",
                 workload={"paused": True})


def _hvlab(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "hvlab.cli", *args], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})


def test_the_second_checkpoint_refused_by_a_failing_metadata_disk(
        lab_factory: Callable[..., LabHandle], tmp_path: Path) -> None:
    h = lab_factory(LAB, start_guests=True)
    client = GuestClient(guests.socket_path(h.names, "vm01"))
    client.workload(ops_per_s=200, pause=False)
    pre = h.lv_names()
    go = tmp_path / "go"
    backup = _hvlab("backup", "vm01", "-n", h.defn.name, "--no-fingerprints",
                    env={faults.ENV: "s05-one:wait", faults.GO_ENV: str(go)})
    try:
        wait_for(Path(f"{go}.waiting").exists, 300, "the backup waiting after the first C")
        frozen = client.status()
        assert frozen["frozen"], frozen
        with pvfault.lv_fails(h.names, "pool_tmeta"):
            go.touch()
            out, err = backup.communicate(timeout=300)
            # The kernel refused; the run says so in one line, naming the pool's failure.
            assert backup.returncode == 1 and "Traceback" not in out + err, out + err
            line = err.strip()
            print(f"backup: {line}")
            assert "\n" not in line, line
            assert "create_snap" in line and "ENOTSUP" in line, line
            assert (f"thin pool {h.names.vg}/pool has failed in the kernel (mode Fail)"
                    in line), line
            assert "`hvlab recover`" in line, line
            health = poolhealth.health(h.names)
            assert health is not None and health.mode == "Fail", health
            # The guest is thawed and writes (and fails) on its live disks, nothing held.
            st = client.status()
            assert not st["frozen"], st
            for d in ("disk0", "disk1"):
                assert h.controller_maps_base("vm01", d)
            assert not any(d.suspended for d in dm.list_devices()
                           if d.name.startswith(h.names.dm_prefixes[0]))
            # LVM's metadata is as step 4 left it: the run's C and A are still LVM's LVs
            # (the unwind did not start an lvremove the pool could not carry out).
            (r,) = runs.all_runs(h.names)
            assert runs.effective_state(r) == "interrupted", r
            assert "has failed in the kernel" in (r.unwind_error or ""), r.unwind_error
            made = h.lv_names() - pre
            assert len(made) == 4 and all(r.id in lv for lv in made), made
        # The disk is healed; the pool is not: dm-thin never upgrades a failed pool itself.
        health = poolhealth.health(h.names)
        assert health is not None and health.failed, health
        ack = last_ack(h.names.guest_dir("vm01"))
        acked = max(frozen["committed_txid"], client.status()["committed_txid"],
                    ack[0] if ack else 0)
    finally:
        go.touch()
        if backup.poll() is None:
            backup.kill()
            backup.communicate()

    out, err = _hvlab("recover", "-n", h.defn.name).communicate(timeout=600)
    print(f"recover: {out}")
    assert "had failed in the kernel" in out and f"run {r.id}" in out, out + err
    # The unwind's own LVM writes worked: nothing of the run is left, the pool writes, its
    # metadata is clean and LVM and the kernel count the same thin devices.
    health = poolhealth.health(h.names)
    assert health is not None and not health.failed and health.mode == "rw", health
    assert h.lv_names() == pre
    (r,) = runs.all_runs(h.names)
    assert r.state == "aborted", r
    assert thinmeta.check(h.names) == ""
    lvm_ids, kernel_ids = h.thin_ids()
    assert lvm_ids == kernel_ids, (lvm_ids, kernel_ids)
    # Every transaction the guest acknowledged is on its live disks, with its chain whole:
    # the restarted guest's writers are paused, so nothing since can hide a loss.
    client = GuestClient(guests.socket_path(h.names, "vm01"))
    st = client.status()
    assert all(w["state"] == "paused" for w in st["writers"]), st["writers"]
    roots = {d: h.mountpoint("vm01", d) for d in ("disk0", "disk1")}
    on_disk = ledger.check(roots)
    assert on_disk.consistent and on_disk.last_txid >= acked, (acked, on_disk)
    assert st["committed_txid"] == on_disk.last_txid
    if ack is not None and on_disk.last_txid == ack[0]:
        assert on_disk.last_hash == ack[1], (ack, on_disk)
    client.workload(pause=False)
    done = engine.start(h.defn.name, ["vm01"], fingerprints=False)
    assert done.state == "done" and rst.verify(h.defn.name, done.id)["ok"]
