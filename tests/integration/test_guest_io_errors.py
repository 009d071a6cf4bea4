"""A guest whose writes meet I/O errors: the thin pool is full, in error-when-full mode, so a
write that needs a new chunk fails at once (dm-thin ends it with ENOSPC; the application sees
ENOSPC or EIO, as the filesystem passes it on). A real guest keeps running with the error
surfaced to the application: the transaction fails whole, nothing half-committed, nothing
acknowledged lost. The next backup refuses with the pool's state named; once the pool is
extended the writer commits again and the backup verifies. Then the same with the pool
filling after C is taken (a backup paused after step 5, the guest writing into C)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable

import pytest

from hvlab.backup import restore as rst
from hvlab.backup import thinmeta
from hvlab.errors import BadInput
from hvlab.flow import engine, recover
from hvlab.guest import ledger
from hvlab.guest.client import GuestClient
from hvlab.guest.writers import last_ack
from hvlab.lab import guests
from hvlab.sys import fs
from hvlab.sys.run import run
from hvlab_fixtures.plugin import LabHandle, one_vm_lab
from hvlab_fixtures.waits import wait_for

pytestmark = pytest.mark.integration

FILLER = "filler"
# Small: these tests write the pool full. Run in the lab VM without --basetemp (make test's
# shards give one on the host's /tmp), pytest's temp folder and so the backing file are in the
# VM's /run tmpfs (TMPDIR=/run/tmp, half the VM's memory, 1 GiB): a 1 GiB pool left no room
# for what an earlier test in the same VM still held there, and the fill stopped on the
# tmpfs's ENOSPC instead of the pool's.
BACKING = "384M"


def _ledger_row(client: GuestClient) -> dict[str, object]:
    (row,) = [w for w in client.status()["writers"] if w["name"] == "ledger"]
    return dict(row)


def _fill_the_pool(h: LabHandle) -> None:
    """A thin LV of the lab's tag written until the pool has no chunk left (dd stops on
    the pool's error)."""
    lvm, vg = h.names.lvm(), h.names.vg
    lvm("lvcreate", "-q", "-V", "2G", "-T", f"{vg}/{h.names.pool}", "-n", FILLER,
        "--addtag", h.names.tag)
    h.expect_extra(lvs=[FILLER])
    run(["dd", "if=/dev/zero", f"of={h.names.lv_path(FILLER)}", "bs=1M", "oflag=direct",
         "status=none"], check=False)
    used, total = thinmeta.pool_usage(h.names)
    assert used == total, f"the pool is not full: {used} of {total} chunks"


def _failing(client: GuestClient) -> None:
    """The writer's transactions fail on the pool's error; the guest answers, alive. dm-thin
    ends the bio with ENOSPC (since Linux 4.6); a filesystem passes that on or makes it EIO
    (both seen on xfs in the lab VM, depending on which write met it first)."""
    wait_for(lambda: _ledger_row(client)["io_error"] is not None, 60,
             "the ledger's writes failing on the full pool")
    row = _ledger_row(client)
    assert row["state"] == "failing", row
    assert re.match(r"(EIO|ENOSPC)\b", str(row["io_error"])), row
    assert client.status()["ok"]


def _room_again(h: LabHandle, client: GuestClient) -> str:
    """The filler removed: the pool has room. The writer commits again by itself when only
    its data writes failed; a filesystem that failed (ext4 read-only once its journal
    aborted, xfs shut down) needs what a real VM needs, a reboot: `hvlab guest reboot`
    (repair and mount again), after which the ledger recovers from what is on disk.
    Returns which it was."""
    lvm, vg = h.names.lvm(), h.names.vg
    lvm("lvremove", "-q", "-y", f"{vg}/{FILLER}")
    before = client.status()["committed_txid"]
    how = "by itself"
    try:
        wait_for(lambda: client.status()["committed_txid"] > before, 5)
    except AssertionError:
        err = str(_ledger_row(client)["io_error"])
        assert re.match(r"(EROFS|EIO|EUCLEAN|ENOSPC)", err), err
        res = subprocess.run([sys.executable, "-m", "hvlab.cli", "guest", "reboot", "vm01",
                              "-n", h.defn.name], capture_output=True, text=True,
                             timeout=600, env=os.environ)
        assert res.returncode == 0 and "rebooted" in res.stdout, res.stdout + res.stderr
        how = f"after `guest reboot` ({err}): {res.stdout.strip()}"
    wait_for(lambda: client.status()["committed_txid"] > before + 3, 60,
             lambda: f"the writer committing again ({how}): {_ledger_row(client)}, "
                     f"pool {thinmeta.pool_usage(h.names)}")
    assert _ledger_row(client)["io_error"] is None
    print(f"the guest's writer recovered {how}")
    return how


def _acked_are_on_disk(h: LabHandle, client: GuestClient) -> None:
    """Paused: the ledger read from the live disks is whole and ends at the guest's last
    acknowledged transaction (its ack log's last line)."""
    client.workload(pause=True)
    st = client.status()
    res = ledger.check({"disk0": h.mountpoint("vm01", "disk0")})
    assert not res.problems and res.unfinished is None, res
    assert (res.last_txid, res.last_hash) == (st["committed_txid"], st["committed_hash"])
    assert last_ack(h.names.guest_dir("vm01")) == (res.last_txid, res.last_hash)
    client.workload(pause=False)


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_a_full_pool_fails_the_guests_writes_not_the_guest(
        fstype: str, lab_factory: Callable[..., LabHandle]) -> None:
    size = "320M" if fstype == "xfs" else "128M"  # mkfs.xfs's least
    h = lab_factory(one_vm_lab(fs=fstype, backing=BACKING, size=size), start_guests=True)
    client = GuestClient(guests.socket_path(h.names, "vm01"))
    wait_for(lambda: client.status()["committed_txid"] > 3, 30, "the guest committing")
    # A thin snapshot of the disk: every chunk shared, so each first write needs a new one.
    lvm, vg = h.names.lvm(), h.names.vg
    lvm("lvcreate", "-q", "-s", "-n", "keep", f"{vg}/{h.names.lv('vm01', 'disk0')}",
        "--addtag", h.names.tag)
    h.expect_extra(lvs=["keep"])
    _fill_the_pool(h)
    _failing(client)
    with pytest.raises(BadInput, match=re.escape(f"{vg}/{h.names.pool}")):
        engine.start(h.defn.name, ["vm01"], fingerprints=False)
    (m,) = [m for m in fs.mounts() if m.target == str(h.mountpoint("vm01", "disk0"))]
    assert "ro" not in m.options.split(","), f"the guest's filesystem went read-only: {m}"
    lvm("lvremove", "-q", "-y", f"{vg}/keep")
    _room_again(h, client)
    _acked_are_on_disk(h, client)
    ok = engine.start(h.defn.name, ["vm01"], fingerprints=False)
    assert ok.state == "done" and rst.verify(h.defn.name, ok.id)["ok"]


def test_the_pool_fills_after_c_is_taken(lab_factory: Callable[..., LabHandle]) -> None:
    """Paused after step 8 (thawed) the guest writes into C; the pool fills. The rest of the backup
    either completes (its image is T0's) or fails with the pool's state named and unwinds;
    nothing the guest acknowledged is lost; with room again the next backup verifies."""
    h = lab_factory(one_vm_lab(backing=BACKING, size="128M"), start_guests=True)
    client = GuestClient(guests.socket_path(h.names, "vm01"))
    wait_for(lambda: client.status()["committed_txid"] > 3, 30, "the guest committing")
    pre = h.lv_names()
    paused = engine.start(h.defn.name, ["vm01"], fingerprints=False, pause_after=8)
    assert paused.state == "paused"
    _fill_the_pool(h)
    _failing(client)
    try:
        done = engine.resume(h.defn.name, paused.id, fingerprints=False)
        assert done.state == "done" and rst.verify(h.defn.name, done.id)["ok"]
        print("the paused backup, resumed on the full pool: done, verified")
    except engine.FlowFailed as exc:
        assert re.search(r"out of data space|reached threshold|is full: \d+ of", str(exc)), exc
        print(f"the paused backup, resumed on the full pool: {exc}")
        recover.recover(h.defn.name)
    assert h.lv_names() - {FILLER} == pre and h.controller_maps_base("vm01", "disk0")
    _room_again(h, client)
    _acked_are_on_disk(h, client)
    ok = engine.start(h.defn.name, ["vm01"], fingerprints=False)
    assert ok.state == "done" and rst.verify(h.defn.name, ok.id)["ok"]
