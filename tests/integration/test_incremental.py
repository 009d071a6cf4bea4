"""Incremental backups (issue 11): a reference snapshot per disk, thin_delta against it, only
the changed chunks read; a chain of a full and incrementals restores bit for bit to each T0;
any doubt about the reference makes a full backup that says why."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hvlab.backup import chain, manifest, thinmeta
from hvlab.backup import restore as rst
from hvlab.errors import HvlabError
from hvlab.flow import engine, recover
from hvlab.lab import runs
from hvlab.lab.record import Run
from hvlab.sys.run import run as sysrun
from hvlab_fixtures.plugin import LabHandle, one_vm_lab, requires

pytestmark = pytest.mark.integration

ONE_VM = one_vm_lab()


def _backup(h: LabHandle, copy: Path, **kw: Any) -> Run:
    """An incremental-chain backup, paused after step 12 (S_A made, auto-recovery done) to
    copy S_A: what a restore of this point must give back, byte for byte."""
    paused = engine.start(h.defn.name, ["vm01"], fingerprints=False, pause_after=12,
                          incremental=True, **kw)
    assert paused.state == "paused"
    sa = paused.vm["vm01"].disks["disk0"].S_A or ""
    copy.write_bytes(Path(h.names.lv_path(sa)).read_bytes())
    done = engine.resume(h.defn.name, paused.id, fingerprints=False)
    assert done.state == "done"
    return done


def _chain(r: Run) -> dict[str, Any]:
    c: dict[str, Any] = r.images["vm01/disk0"]["chain"]
    return c


def _references(h: LabHandle) -> list[str]:
    return chain.references(h.names.lvm().lvs(h.names.vg), "vm01", "disk0")


def _restored_equals(h: LabHandle, r: Run, copy: Path, name: str) -> None:
    rec = rst.restore(h.defn.name, r.id, name)
    h.expect_extra(lvs=rec["lvs"], dm=[Path(c).name for c in rec["controllers"]])
    dev = h.names.lv_path(rec["lvs"][0])
    assert Path(dev).read_bytes() == copy.read_bytes(), f"{name}: not the state at T0 of {r.id}"


def test_a_chain_of_a_full_and_three_incrementals_restores_each_point(
        lab_factory: Callable[..., LabHandle], tmp_path: Path) -> None:
    requires("off-host")
    h = lab_factory(ONE_VM, start_guests=True)
    pre = h.lv_names()
    mnt = h.mountpoint("vm01", "disk0")
    (mnt / "a.bin").write_bytes(os.urandom(6 << 20))
    points: list[tuple[Run, Path]] = []

    def point(**kw: Any) -> Run:
        copy = tmp_path / f"t0-{len(points)}.img"
        r = _backup(h, copy, **kw)
        points.append((r, copy))
        assert _references(h) == [chain.reference_lv("vm01", "disk0", r.id)]
        # the LV set the run found, its reference point moved on
        assert h.lv_names() == pre | {chain.reference_lv("vm01", "disk0", r.id)}
        return r

    full = point()
    assert _chain(full)["kind"] == "full" and "no earlier backup" in _chain(full)["reason"]
    gen = _chain(full)["generation"]

    (mnt / "b.bin").write_bytes(os.urandom(2 << 20))
    inc1 = point()
    c = _chain(inc1)
    assert c["kind"] == "incremental" and c["generation"] == gen
    assert c["parent"] == {"run": full.id, "dest": full.dest}
    img = inc1.images["vm01/disk0"]
    # Only what changed is read: the chunks the new file and the guest's writes took.
    assert img["bytes_read"] == c["changed_bytes"] >= 2 << 20
    assert img["bytes_read"] < img["mapped_bytes"] - (4 << 20)

    (mnt / "a.bin").unlink()  # discarded: unmapped in the pool, not read, zeros again
    # ext4 frees an unlinked file's blocks when its journal commits (every 5 s): commit now,
    # or fstrim may find them still in use and discard nothing.
    os.sync()
    sysrun(["fstrim", str(mnt)])
    inc2 = point(mode="off-host")  # off-host and incremental combine
    c2 = _chain(inc2)
    assert c2["kind"] == "incremental" and c2["discarded_bytes"] >= 4 << 20
    assert inc2.link and inc2.link["nbd_bytes"] == c2["changed_bytes"]

    with open(mnt / "b.bin", "r+b") as f:
        f.seek(1 << 20)
        f.write(os.urandom(512 << 10))
    inc3 = point()
    assert _chain(inc3)["kind"] == "incremental"

    for i, (r, copy) in enumerate(points):
        _restored_equals(h, r, copy, f"p{i}")
    report = rst.verify(h.defn.name, inc3.id)  # every link's checksum, then the point itself
    assert report["ok"] and len(report["vms"][0]["checksums"]) == 4
    _, man = manifest.locate(h.names, inc3.id)
    assert man["vms"][0]["disks"][0]["chain"]["parent"]["run"] == inc2.id
    # Step 13 computes deltas from its dump: the same answer as thin_delta, on this pool
    # (the live disk moved on from the reference: changed, new and discarded blocks).
    rows = h.names.lvm().lvs(h.names.vg)
    ref, live = (rows[x].thin_id for x in (_references(h)[0], "vm01_disk0"))
    assert ref is not None and live is not None
    with thinmeta.metadata_snap(h.names) as ms:
        by_tool = ms.delta(ref, live, tool=True)
        assert thinmeta.delta_in(ms.dump(), ref, live) == by_tool
        assert thinmeta.delta_in(ms.dump(), live, ref) == {
            "different": by_tool["different"], "left_only": by_tool["right_only"],
            "right_only": by_tool["left_only"]}


def test_a_lost_reference_makes_a_full_backup_that_says_why(
        lab_factory: Callable[..., LabHandle], tmp_path: Path) -> None:
    h = lab_factory(ONE_VM, start_guests=True)
    first = _backup(h, tmp_path / "one.img")
    (ref,) = _references(h)
    h.names.lvm()("lvremove", "-q", "-y", f"{h.names.vg}/{ref}")
    again = _backup(h, tmp_path / "two.img")
    c = _chain(again)
    assert c["kind"] == "full" and f"reference snapshot {ref} is gone" in c["reason"]
    assert c["generation"] != _chain(first)["generation"]  # a new chain begins
    _, man = manifest.locate(h.names, again.id)
    assert man["vms"][0]["disks"][0]["chain"]["reason"] == c["reason"]
    assert _references(h) == [chain.reference_lv("vm01", "disk0", again.id)]
    # A deleted earlier link breaks what depends on it, named, never a wrong restore.
    (mnt := h.mountpoint("vm01", "disk0") / "c.bin").write_bytes(os.urandom(1 << 20))
    inc = _backup(h, tmp_path / "three.img")
    assert _chain(inc)["kind"] == "incremental" and mnt.exists()
    (Path(again.dest) / again.images["vm01/disk0"]["file"]).unlink()
    with pytest.raises(HvlabError, match=r"damaged.*missing"):
        rst.restore(h.defn.name, inc.id, "pbroken")


@pytest.mark.parametrize("then", ["resume", "abort"])
def test_killed_while_the_reference_moves_on(lab_factory: Callable[..., LabHandle],
                                             tmp_path: Path, then: str) -> None:
    """SIGKILL in step 14 right after S_A became the reference (old one removed, C not yet
    merged). Resumed: the run finishes and the chain moves on. Aborted: the chain still
    names the old reference, which is gone, the abort removes the run's own, and the next
    incremental is a full that says so."""
    h = lab_factory(ONE_VM, start_guests=True)
    first = _backup(h, tmp_path / "one.img")
    proc = subprocess.run([sys.executable, "-m", "hvlab.cli", "backup", "vm01", "-n",
                           h.defn.name, "--no-fingerprints", "--incremental", "--inject",
                           "s14-references:kill"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stdout + proc.stderr
    killed = next(r for r in runs.all_runs(h.names) if r.id != first.id)
    assert _references(h) == [chain.reference_lv("vm01", "disk0", killed.id)]
    if then == "resume":
        done = engine.resume(h.defn.name, killed.id, fingerprints=False)
        assert done.state == "done" and _chain(done)["kind"] == "incremental"
        assert chain.load(h.names)["vm01/disk0"]["run"] == killed.id
        assert rst.verify(h.defn.name, killed.id)["ok"]
        return
    aborted = engine.abort(h.defn.name, killed.id)
    assert any("removed reference point" in x for x in aborted.unwound or [])
    assert not _references(h) and not recover.recover(h.defn.name).left
    again = _backup(h, tmp_path / "two.img")
    assert _chain(again)["kind"] == "full" and "is gone" in _chain(again)["reason"]
