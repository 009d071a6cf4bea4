"""The 14-step flow on real thin snapshots (run in the lab VM): invariants 1-9 of issue 4."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from hvlab.backup import restore as rst
from hvlab.errors import BadInput
from hvlab.flow import engine, recover
from hvlab.guest import ledger
from hvlab.guest.client import GuestClient
from hvlab.lab import guests, runs
from hvlab.lab.handle import Lab
from hvlab.lab.record import Event
from hvlab.sys import dm, fs
from hvlab.sys.run import run
from hvlab_fixtures.plugin import LabHandle, one_vm_lab

pytestmark = pytest.mark.integration


def _lvs(h: LabHandle) -> dict[str, frozenset[str]]:
    return {n: r.tags for n, r in h.names.lvm().lvs(h.names.vg).items()}


def _ctl_lv(h: LabHandle, vm: str, disk: str) -> str:
    """The LV the disk's controller maps, from its dm table (not the sysfs path hvlab uses)."""
    majmin = dm.target_of(h.names.ctl(vm, disk))
    rows = h.names.lvm().lvs(h.names.vg)
    return next(r.name for r in rows.values() if f"{r.major}:{r.minor}" == majmin)


def _mount_ro(dev: str, fstype: str, mp: Path) -> None:
    opts = ("noload",) if fstype == "ext4" else ("norecovery",)
    fs.mount(dev, mp, fstype, read_only=True, extra=opts)


def _by_step(evs: list[Event], vm: str | None = None) -> dict[int, Event]:
    return {e.step: e for e in evs if e.step and e.vm in (vm, None)}


def test_an_abort_before_a_vms_step_4_removes_what_the_first_allocated(
        lab_with_guests: LabHandle) -> None:
    """The job's first step 4 makes C and A for every VM (one lvm process): paused before
    vm02's turn, vm02's are there, inactive, holding B; an abort removes them with the rest."""
    h = lab_with_guests
    lab, pre = h.defn.name, h.lv_names()
    paused = engine.start(lab, ["vm01", "vm02"], pause_after=3, fingerprints=False)
    rid = paused.id
    assert paused.state == "paused"
    rows = h.names.lvm().lvs(h.names.vg)
    for k, role in (("c", "role_checkpoint"), ("a", "role_autorecovery")):
        r = rows[f"vm02_disk0_{k}_{rid}"]
        assert r.major is None and r.origin == "vm02_disk0" and role in r.tags
    assert h.controller_maps_base("vm02", "disk0")
    done = engine.abort(lab, rid)
    assert done.state == "aborted"
    assert h.lv_names() == pre
    assert all(h.controller_maps_base(vm, "disk0") for vm in ("vm01", "vm02"))


def test_backup_two_vms_pause_resume_invariants(lab_with_guests: LabHandle,
                                                tmp_path: Path) -> None:
    h = lab_with_guests
    lab, names = h.defn.name, h.names
    keep = h.mountpoint("vm01", "disk0") / "scratch" / "keep.tmp"
    keep.parent.mkdir(exist_ok=True)
    keep.write_text("excluded from backups by the VSS writer\n")
    run_ = engine.start(lab, ["vm01", "vm02"], pause_after=9)
    rid = run_.id
    assert run_.state == "paused"
    # Paused after step 9: thawed, the guest writes to C; A exists.
    for vm, disk in (("vm01", "disk0"), ("vm01", "disk1"), ("vm02", "disk0")):
        assert _ctl_lv(h, vm, disk) == f"{vm}_{disk}_c_{rid}"
        assert not GuestClient(guests.socket_path(names, vm)).status()["frozen"]
    tags = _lvs(h)
    assert "role_autorecovery" in tags[f"vm01_disk0_a_{rid}"]
    assert "role_checkpoint" in tags[f"vm01_disk0_c_{rid}"]
    with pytest.raises(BadInput, match="already in a running backup"):
        engine.start(lab, ["vm02"])
    # Written after T0: must be on the live disk, never in A, S or the backup.
    after = h.mountpoint("vm01", "disk0") / "after_t0.txt"
    after.write_text("written after T0\n")
    run(["sync"])
    run_ = engine.resume(lab, rid, pause_after=11)
    assert run_.state == "paused"
    # Raw B@T0 (S_B) holds the guest's unfinished transaction; A's fix-ups are not in it.
    sb = {d: f"/dev/mapper/{names.dm_lv_name(run_.vm['vm01'].disks[d].S_B or '')}"
          for d in ("disk0", "disk1")}
    roots = {}
    try:
        for d, fstype in (("disk0", "ext4"), ("disk1", "xfs")):
            _mount_ro(sb[d], fstype, tmp_path / "sb" / d)
            roots[d] = tmp_path / "sb" / d
        raw = ledger.check(roots)
        assert (roots["disk0"] / "scratch" / "keep.tmp").exists()
        assert not (roots["disk0"] / "after_t0.txt").exists()
    finally:
        for mp in roots.values():
            fs.umount(mp)
    assert not raw.consistent and raw.unfinished is not None, raw
    run_ = engine.resume(lab, rid)
    assert run_.state == "done"
    with pytest.raises(BadInput, match="nothing to resume"):
        engine.resume(lab, rid)

    evs = runs.events(names, rid)
    # 6: step order, per-VM 1-10 then the job's 11-14.
    order = [(e.step, e.vm) for e in evs]
    assert order == ([(n, "vm01") for n in range(1, 11)] + [(n, "vm02") for n in range(1, 11)]
                     + [(n, None) for n in range(11, 15)])
    for vm in ("vm01", "vm02"):
        v = run_.vm[vm]
        w = v.window
        assert w is not None and w.frozen_at and w.thawed_at and w.seconds
        # 1: C made only while frozen; all disks of the VM inside one window (< 10 s).
        for info in v.disks.values():
            assert w.frozen_at <= (info.c_created_at or 0) <= w.thawed_at
        assert w.seconds < 10
        st = _by_step(evs, vm)
        assert st[8].detail["window_s"] < 10
        # content is hashed where the invariants need it, and nowhere else
        assert all(e.fingerprints is None for n, e in st.items() if n not in (8, 10, 13))
        for d in v.disks:
            key = f"{vm}/{d}"
            fp = {n: (st[n].fingerprints or {})[key] for n in (8, 10, 13)}
            # 2: B does not change between T0 and the merge.
            assert fp[8]["B"]["sha256"] == fp[10]["B"]["sha256"] == fp[13]["B"]["sha256"]
            # 4: A derives from B@T0.
            assert fp[8]["A"]["sha256"] == fp[8]["B"]["sha256"]
            assert fp[13]["S_B"]["sha256"] == fp[8]["B"]["sha256"]
            assert fp[8]["C"].get("live") and "sha256" not in fp[8]["C"]
            # live writes went to C after T0, to B before
            assert st[3].writes(key) == "B"
            assert st[9].writes(key) == "C"
            assert st[14].writes(key) == "B"
        # each step reports the devices the kernel made and removed (uevents)
        assert any("_c_" in x for x in st[5].devices_created), st[5].devices_created
        assert any("_a_" in x for x in st[6].devices_created), st[6].devices_created
    # The job's first step 4 allocated every VM's C and A; vm02's ran no LVM command.
    made = {a["lv"] for a in _by_step(evs, "vm01")[4].detail["allocated"]}
    assert made == {f"{vm}_{d}_{k}_{rid}" for vm, d in (("vm01", "disk0"), ("vm01", "disk1"),
                                                       ("vm02", "disk0")) for k in "ca"}
    st4 = _by_step(evs, "vm02")[4]
    assert st4.detail["allocated"] == [] and len(st4.detail["allocated_before"]) == 2
    assert not [c for c in st4.commands or [] if c.argv[0] == "lvm"], st4.commands
    assert run_.vm["vm01"].cls == "application-consistent"
    assert run_.vm["vm02"].cls == "filesystem-consistent"
    # 8: the LV set is back (pool usage grows only by what the guests wrote).
    assert run_.post and run_.pre and run_.post["lvs"] == run_.pre["lvs"]
    assert not engine.leftovers(Lab.open(lab), ["vm01", "vm02"], set())

    dest = Path(run_.dest)
    man = json.loads((dest / "manifest.json").read_text())
    assert [v["consistency"] for v in man["vms"]] == ["application-consistent",
                                                      "filesystem-consistent"]
    assert len(man["events"]) == 24
    # only the blocks the pool has mapped were read, not the virtual size
    for d in (d for v in man["vms"] for d in v["disks"]):
        assert d["bytes_read"] <= d["mapped_blocks"] * d["block_bytes"] < d["size"], d
    v1 = man["vms"][0]
    # 5: raw B@T0 differs where auto-recovery worked (thin_delta S_B..S_A).
    assert all(d["auto_recovery_ranges"] for d in v1["disks"])
    assert not man["vms"][1]["disks"][0]["auto_recovery_ranges"]
    # 3 + 4: after_t0 and the excluded file are on the live disk, not in the backup image.
    assert after.exists() and keep.exists()
    lo = run(["losetup", "-f", "--show", "-r", str(dest / "vm01_disk0.img")]).stdout.strip()
    try:
        _mount_ro(lo, "ext4", tmp_path / "img")
        try:
            assert not (tmp_path / "img" / "after_t0.txt").exists()
            assert not (tmp_path / "img" / "scratch" / "keep.tmp").exists()
        finally:
            fs.umount(tmp_path / "img")
    finally:
        run(["losetup", "-d", lo])
    # 5: the backup is fsck-clean, mounts read-only and passes the writers' checker.
    rep = rst.verify(lab, rid)
    assert rep["ok"], json.dumps(rep, indent=1)
    assert rep["vms"][0]["ledger"]["consistent"]
    # restore (and bad input around it)
    rec = rst.restore(lab, str(dest), "rest", vm="vm01")
    h.expect_extra(lvs=rec["lvs"], dm=rec["controllers"])  # the restored VM stays
    assert Path(rec["controllers"][0]).exists()
    assert fs.fsck_readonly(rec["controllers"][0], "ext4").returncode == 0
    with pytest.raises(BadInput, match="already exists"):
        rst.restore(lab, str(dest), "rest", vm="vm01")
    with pytest.raises(BadInput, match="already exists"):
        engine.start(lab, ["vm02"], dest=dest)
    with pytest.raises(BadInput, match="unknown VM"):
        engine.start(lab, ["vm09"])


def _quiet_guest(h: LabHandle, vm: str) -> None:
    GuestClient(guests.socket_path(h.names, vm)).workload(pause=True)


def test_failure_thaws_and_unwinds_then_clean_run(lab_with_guests: LabHandle,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    h = lab_with_guests
    lab, names = h.defn.name, h.names
    _quiet_guest(h, "vm01")  # pool usage is pool-wide: no guest may write
    _quiet_guest(h, "vm02")
    run(["sync"])
    before = _lvs(h)

    # after C exists and the controller maps it, inside the freeze window
    monkeypatch.setenv("HVLAB_INJECT", "s06-one:raise")
    with pytest.raises(engine.FlowFailed, match="injected"):
        engine.start(lab, ["vm02"])
    monkeypatch.undo()
    # 7: thawed; C merged into B (the guest had written to it); nothing left.
    st = GuestClient(guests.socket_path(names, "vm02")).status()
    assert not st["frozen"]
    assert not (names.guest_dir("vm02") / "frozen").exists()
    assert _ctl_lv(h, "vm02", "disk0") == "vm02_disk0"
    assert set(_lvs(h)) == set(before)
    (h.mountpoint("vm02", "disk0") / "still_writable").write_text("ok\n")
    failed = [r for r in runs.all_runs(names) if r.state == "failed"]
    evs = runs.events(names, failed[0].id)
    assert [e.step for e in evs][-2:] == [6, None] and "injected" in (evs[-2].error or "")
    assert len(failed) == 1 and "merged C" in " ".join(failed[0].unwound or [])
    # 8: a clean run of a quiet guest returns LV set and pool usage to the pre-backup state.
    run_ = engine.start(lab, ["vm02"])
    assert run_.state == "done"
    assert run_.post and run_.pre and run_.post["lvs"] == run_.pre["lvs"]
    assert abs(run_.post["pool_used_blocks"] - run_.pre["pool_used_blocks"]) <= 4
    # every backup restores and verifies: a linux guest's is filesystem-consistent
    rep = rst.verify(lab, run_.id)
    assert rep["ok"] and rep["vms"][0]["consistency"] == "filesystem-consistent", rep
    rec = rst.restore(lab, run_.id, "rest02", vm="vm02")
    h.expect_extra(lvs=rec["lvs"], dm=rec["controllers"])
    assert fs.fsck_readonly(rec["controllers"][0], "ext4").returncode == 0


NONE_LAB = one_vm_lab(profile="none", vm="vm03")


def test_crash_consistent_pause_abort_and_leftovers(lab_factory: Callable[..., LabHandle]
                                                   ) -> None:
    h = lab_factory(NONE_LAB, start_guests=True)
    lab, names = h.defn.name, h.names
    run_ = engine.start(lab, ["vm03"], pause_after=11)
    rid = run_.id
    assert run_.vm["vm03"].cls == "crash-consistent"  # 9: labelled
    assert run_.vm["vm03"].window is None
    assert _ctl_lv(h, "vm03", "disk0") == f"vm03_disk0_c_{rid}"
    (h.mountpoint("vm03", "disk0") / "while_paused").write_text("keep me\n")
    run(["sync"])
    with pytest.raises(BadInput, match="cannot pause"):
        engine.start(lab, ["vm03"], pause_after=5)
    engine.abort(lab, rid)
    # abort merged C: the write made while paused is on the live disk, nothing is left.
    assert _ctl_lv(h, "vm03", "disk0") == "vm03_disk0"
    assert (h.mountpoint("vm03", "disk0") / "while_paused").read_text() == "keep me\n"
    assert sorted(_lvs(h)) == sorted(["pool", "vm03_disk0", "[pool_tdata]", "[pool_tmeta]",
                                      "[lvol0_pmspare]"])
    assert runs.load(names, rid).state == "aborted"
    with pytest.raises(BadInput, match="nothing to abort"):
        engine.abort(lab, rid)
    # a leftover auto-recovery checkpoint is found and reported, never reused
    names.lvm()("lvcreate", "-q", "-s", "-kn", "-n", "vm03_disk0_a_old",
                       "--addtag", names.tag, "--addtag", "role_autorecovery",
                       "--addtag", "vm_vm03", "--addtag", "disk_disk0", "--addtag",
                       "run_rold", f"{names.vg}/vm03_disk0")
    # As Hyper-V: the next backup fails ("the file exists"), and names the way out.
    with pytest.raises(BadInput, match=r"auto-recovery checkpoint vm03_disk0_a_old exists "
                                       r"\(run rold\).*0x800423FB.*`hvlab recover`"):
        engine.start(lab, ["vm03"])
    found = recover.recover(lab)
    assert any("KB3175561" in x for x in found.done) and not found.left, found
    assert "vm03_disk0_a_old" not in _lvs(h)
    run_ = engine.start(lab, ["vm03"], fingerprints=False)
    assert run_.state == "done"
    rep = rst.verify(lab, run_.id)
    assert rep["vms"][0]["consistency"] == "crash-consistent"
    assert all(c["ok"] for c in rep["vms"][0]["checksums"])
    rec = rst.restore(lab, run_.id, "rest03", vm="vm03")
    h.expect_extra(lvs=rec["lvs"], dm=rec["controllers"])
    assert Path(rec["controllers"][0]).exists()
