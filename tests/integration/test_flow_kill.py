"""A backup process killed with SIGKILL at any named fault point (every step boundary and every
half-done step: the object exists, the run record does not say so yet) is recoverable by the
next command: `--resume` finishes the run, `--abort` unwinds it, and either leaves the LV set
as it was."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from hvlab.backup import restore as rst
from hvlab.backup import thinmeta
from hvlab.errors import BadInput
from hvlab.flow import actions, engine, recover
from hvlab.flow import steps as S
from hvlab.flow.model import Model
from hvlab.guest import ledger
from hvlab.guest.client import GuestClient
from hvlab.lab import guests, live, runs
from hvlab.lab.record import Run
from hvlab.sys import dm, fs
from hvlab.sys.run import run as sysrun
from hvlab_fixtures.plugin import LabHandle, one_vm_lab
from hvlab_fixtures.waits import at_fault_point

pytestmark = pytest.mark.integration

ONE_VM = one_vm_lab()

# The flush-and-hold limit the killed backups ask for. Killed inside the window, nothing thaws
# the guest but its own watchdog at the end of that limit, so each such test waited out VSS's
# 10 s: 4 s is the same path (the window itself takes ~0.3 s for a disk) with 6 s less idle.
HOLD_S = 4.0


def _backup(h: LabHandle, inject: str = "", patch: str = "", model: str = S.DEFAULT
            ) -> list[str]:
    """`hvlab backup vm01` (the CLI's main, --inject for a fault point) in a new process
    whose flush-and-hold limit is HOLD_S; patch: code run first (die() kills it)."""
    return [sys.executable, "-c", SCRIPT.format(hold=HOLD_S, patch=patch), "backup", "vm01",
            "-n", h.defn.name, "--no-fingerprints", "--model", model,
            *(["--inject", inject] if inject else [])]


def _killed_run(h: LabHandle, point: str, patch: str = "", model: str = S.DEFAULT) -> Run:
    """A backup killed (SIGKILL) at a named fault point, through the CLI's hidden --inject;
    with patch, by the patch (which changes the guest's side first)."""
    proc = subprocess.run(_backup(h, f"{point}:kill" if point else "", patch, model),
                          env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stdout + proc.stderr
    (run_,) = runs.all_runs(h.names)
    assert runs.effective_state(run_) == "interrupted"
    return run_


SCRIPT = """
import os, signal, sys
from hvlab import cli
from hvlab.flow import actions
actions.FLUSH_AND_HOLD_S = {hold}
def die():
    os.kill(os.getpid(), signal.SIGKILL)
{patch}
cli.main(sys.argv[1:])
"""
# Killed at one of these inside a step, the run is inside the guest's freeze window.
INSIDE_FREEZE = {"s05-one", "s05-snapshots", "s05-reloaded", "s06-one", "gs-made", "gs-origin"}


def _in_freeze(model: Model, point: str) -> bool:
    """Killed there, the guest is frozen: resume is refused, abort it. A boundary is inside
    when the step before it opened or held the window."""
    if point.startswith("step-"):
        return int(point[5:]) - 1 in model.freeze_steps
    return point in INSIDE_FREEZE


@pytest.mark.parametrize(("model", "point"), [(m, p) for m in S.MODELS
                                              for p in S.MODELS[m].fault_points])
def test_killed_at_every_fault_point(lab_factory: Callable[..., LabHandle], model: str,
                                     point: str) -> None:
    """Every named fault point of every Hyper-V generation: killed there, the next command
    recovers the run (resume, or abort inside the freeze window), the live disk keeps what
    the guest committed, the LV set is as before, and the backup (or the next one)
    verifies."""
    h = lab_factory(ONE_VM, start_guests=True)
    client = GuestClient(guests.socket_path(h.names, "vm01"))
    pre = h.lv_names()
    run_ = _killed_run(h, point, model=model)
    acked = client.status()["committed_txid"]  # what the guest acknowledged by the kill
    if _in_freeze(S.MODELS[model], point):
        _thaws_within_its_watchdog(h, client)
        with pytest.raises(BadInput, match="inside a freeze window"):
            engine.resume(h.defn.name, run_.id, fingerprints=False)
        engine.abort(h.defn.name, run_.id)
        assert runs.load(h.names, run_.id).state == "aborted"
        run_ = engine.start(h.defn.name, ["vm01"], fingerprints=False, model=model)
    else:
        done = engine.resume(h.defn.name, run_.id, fingerprints=False)
        assert done.state == "done"
    # Nothing acknowledged was lost, read from the live disk (the ledger's WAL through the
    # mount), not from the guest's own counter.
    assert _live_txid(h) >= acked
    assert h.lv_names() == pre and h.controller_maps_base("vm01", "disk0")
    assert not client.status()["frozen"]
    assert rst.verify(h.defn.name, run_.id)["ok"]


def _live_txid(h: LabHandle) -> int:
    return ledger.check({"disk0": h.mountpoint("vm01", "disk0")}).last_txid


def _thaws_within_its_watchdog(h: LabHandle, client: GuestClient) -> None:
    """Killed inside the window, with no command run after it: the guest's own watchdog
    thaws it by the end of its flush-and-hold limit, and the disk takes writes again."""
    st = client.status()
    assert st["frozen"], st
    deadline = st["frozen_at"] + HOLD_S
    assert _poll(lambda: not client.status()["frozen"], deadline - time.time() + 1.0), \
        "the guest stayed frozen past its watchdog"
    probe = h.mountpoint("vm01", "disk0") / "after-watchdog.txt"
    probe.write_text("the disk takes writes again\n")


@pytest.mark.parametrize("point", ["s11-one", "s14-base-removed"])
def test_killed_mid_step_then_abort(lab_factory: Callable[..., LabHandle], point: str) -> None:
    h = lab_factory(ONE_VM, start_guests=True)
    pre = h.lv_names()
    marker = h.mountpoint("vm01", "disk0") / "live.txt"
    run_ = _killed_run(h, point)
    marker.write_text("written after the kill\n")
    # `down` never pulls the lab from under an interrupted run (the measured failure: the
    # unwind then failed with "Cannot process volume group")
    refused = _cli("down", "-n", h.defn.name)
    assert refused.returncode == 2 and f"--abort {run_.id}" in refused.stderr, refused.stderr
    engine.abort(h.defn.name, run_.id)
    assert runs.load(h.names, run_.id).state == "aborted"
    assert h.lv_names() == pre and h.controller_maps_base("vm01", "disk0")
    assert marker.read_text() == "written after the kill\n"
    with pytest.raises(Exception, match="nothing to resume"):
        engine.resume(h.defn.name, run_.id)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hvlab.cli", *args], env=dict(os.environ),
                          capture_output=True, text=True, timeout=300)


def _held(h: LabHandle) -> bool:
    return any(d.suspended for d in dm.list_devices() if d.name == h.names.ctl("vm01", "disk0"))


def _poll(pred: Callable[[], bool], seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.1)
    return pred()


def test_killed_with_controllers_suspended_then_abort(
        lab_factory: Callable[..., LabHandle]) -> None:
    """Killed in step 5 with C loaded into the suspended controller and the guest frozen:
    the step's guard resumes the controller at once (C goes live, recorded), the guest's
    watchdog thaws within its flush-and-hold limit, with no command run; abort then merges
    C."""
    h = lab_factory(ONE_VM, start_guests=True)
    pre = h.lv_names()
    client = GuestClient(guests.socket_path(h.names, "vm01"))
    run_ = _killed_run(h, "s05-reloaded")
    assert _poll(lambda: not _held(h), 2.0), "the controller stayed suspended"
    assert _poll(lambda: not client.status()["frozen"], HOLD_S + 2.0), "the guest stayed frozen"
    assert live.recorded(h.names, "vm01", "disk0") == f"vm01_disk0_c_{run_.id}"
    engine.abort(h.defn.name, run_.id)
    assert h.lv_names() == pre and h.controller_maps_base("vm01", "disk0")
    assert not GuestClient(guests.socket_path(h.names, "vm01")).status()["frozen"]
    probe = h.mountpoint("vm01", "disk0") / "after-abort.txt"
    probe.write_text("the disk takes writes again\n")
    assert probe.read_text() == "the disk takes writes again\n"


def test_hung_with_controllers_suspended(lab_factory: Callable[..., LabHandle]) -> None:
    """A backup that hangs in step 5 with the controllers held: they are resumed by the
    guard within the flush-and-hold limit while the process still hangs."""
    h = lab_factory(ONE_VM, start_guests=True)
    proc = subprocess.Popen(_backup(h, "s05-reloaded:hang"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        assert _poll(lambda: _held(h), 60.0), "never reached step 5"
        assert _poll(lambda: not _held(h), HOLD_S + 1.0), "held past the flush-and-hold limit"
        assert proc.poll() is None  # still hanging: the guard did it
        refused = _cli("down", "-n", h.defn.name)  # never under a running backup
        assert refused.returncode == 2 and "running in process" in refused.stderr
    finally:
        proc.kill()
        proc.wait(30)
    (run_,) = runs.all_runs(h.names)
    engine.abort(h.defn.name, run_.id)
    assert h.controller_maps_base("vm01", "disk0")


def test_a_step_that_outlives_its_guard_fails(lab_factory: Callable[..., LabHandle],
                                              monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    """Step 6 holds the origins past its bound (the flush-and-hold limit): the guard resumes
    them, and when the step goes on it learns so (GuardFired) instead of carrying on as if
    its A were of one instant. The run unwinds; the next backup verifies."""
    h = lab_factory(ONE_VM, start_guests=True)
    pre = h.lv_names()
    monkeypatch.setattr(actions, "FLUSH_AND_HOLD_S", HOLD_S)

    def let_go_after_the_guard(go: Path) -> None:
        _poll(lambda: not _held_origin(h), 30.0)  # the guard resumed B
        go.touch()

    with (at_fault_point("s06-one", let_go_after_the_guard, monkeypatch=monkeypatch,
                        tmp_path=tmp_path),
          pytest.raises(engine.FlowFailed, match="resumed them before the step ended")):
        engine.start(h.defn.name, ["vm01"], fingerprints=False, app_aware="off")
    (failed,) = runs.all_runs(h.names)
    assert failed.state == "failed" and h.lv_names() == pre
    assert h.controller_maps_base("vm01", "disk0") and not _held_origin(h)
    ok = engine.start(h.defn.name, ["vm01"], fingerprints=False)
    assert ok.state == "done" and rst.verify(h.defn.name, ok.id)["ok"]


def _held_origin(h: LabHandle) -> bool:
    origin = h.names.dm_lv_name("vm01_disk0")
    return any(d.suspended for d in dm.list_devices() if d.name == origin)


def test_resume_finishes_the_retag_of_a_merged_checkpoint(
        lab_factory: Callable[..., LabHandle]) -> None:
    h = lab_factory(ONE_VM, start_guests=True)
    run_ = _killed_run(h, "s14-renamed")
    engine.resume(h.defn.name, run_.id, fingerprints=False)
    tags = h.names.lvm().lvs(h.names.vg)["vm01_disk0"].tags
    assert "role_base" in tags and "role_checkpoint" not in tags
    assert not [t for t in tags if t.startswith("run_")]
    again = engine.start(h.defn.name, ["vm01"], fingerprints=False)  # no leftover reported
    assert again.state == "done"


@pytest.mark.parametrize("guest_restarted", [False, True])
def test_killed_while_the_guest_had_A_mounted(lab_factory: Callable[..., LabHandle],
                                               guest_restarted: bool) -> None:
    """Host and guest both die during step 10's auto-recovery, with A still mounted in the
    guest's run dir: the next guest start or the resumed step 10 unmounts it, and the run
    finishes as if nothing happened."""
    h = lab_factory(ONE_VM, start_guests=True)
    pre = h.lv_names()
    run_dir = h.names.guest_dir("vm01")
    patch = f"""
import subprocess
from hvlab.guest.client import GuestClient
def patched(self, devices):
    mnt = {str(run_dir)!r} + "/ar-killed/disk0"
    os.makedirs(mnt)
    subprocess.run(["mount", devices["disk0"], mnt], check=True)
    die()
GuestClient.post_snapshot = patched
"""
    run_ = _killed_run(h, "", patch=patch)
    assert fs.mounts_under(run_dir)
    if guest_restarted:
        pid = guests.running_pids(h.names)[0]
        proc = psutil.Process(pid)
        os.kill(pid, signal.SIGKILL)
        proc.wait(30)
        guests.start_all(h.defn, h.names)
        assert not fs.mounts_under(run_dir)
    done = engine.resume(h.defn.name, run_.id, fingerprints=False)
    assert done.state == "done"
    assert not fs.mounts_under(run_dir) and not list(run_dir.glob("ar-*"))
    assert h.lv_names() == pre
    assert rst.verify(h.defn.name, run_.id)["ok"]


def test_recover_cleans_what_dead_runs_left(lab_factory: Callable[..., LabHandle]) -> None:
    """`hvlab recover`: a run killed after step 11 whose run record is lost too (only the LVM
    tags tell), a metadata snapshot a dead process holds, a paused run left alone."""
    h = lab_factory(ONE_VM, start_guests=True)
    pre = h.lv_names()
    client = GuestClient(guests.socket_path(h.names, "vm01"))
    run_ = _killed_run(h, "s12-one")
    shutil.rmtree(h.names.runs_dir / run_.id)
    acked = client.status()["committed_txid"]
    sysrun(["dmsetup", "message", thinmeta.tpool_dev(h.names), "0", "reserve_metadata_snap"])
    res = subprocess.run([sys.executable, "-m", "hvlab.cli", "recover", "-n", h.defn.name],
                         capture_output=True, text=True, timeout=300, env=os.environ)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "lingering backup checkpoint (GUID.avhdx)" in res.stdout
    assert "merged C" in res.stdout and "metadata snapshot" in res.stdout, res.stdout
    assert h.lv_names() == pre and h.controller_maps_base("vm01", "disk0")
    assert client.status()["committed_txid"] >= acked  # the guest's writes to C were merged
    done = engine.start(h.defn.name, ["vm01"], fingerprints=False)
    assert rst.verify(h.defn.name, done.id)["ok"]
    paused = engine.start(h.defn.name, ["vm01"], pause_after=9, fingerprints=False)
    rep = recover.recover(h.defn.name)
    assert len(rep.left) == 1 and paused.id in rep.left[0] and "paused" in rep.left[0]
    engine.abort(h.defn.name, paused.id)
    assert recover.recover(h.defn.name).left == []


@pytest.mark.parametrize("point", ["gs-recovered", "rv-merging"])
def test_recover_cleans_what_a_dead_2012_run_left(lab_factory: Callable[..., LabHandle],
                                                  point: str) -> None:
    """2012: killed with the guest's shadow copy in place (the controller B's snapshot-origin,
    G on D) or in the middle of the host's roll-back, its run record lost: `hvlab recover`
    finds the diff area by its tags, puts each controller back on B, removes G, the roll-back
    device, S and D; the guest's writes stayed on B all along."""
    h = lab_factory(ONE_VM, start_guests=True)
    pre = h.lv_names()
    client = GuestClient(guests.socket_path(h.names, "vm01"))
    run_ = _killed_run(h, point, model="2012")
    assert dm.table(h.names.ctl("vm01", "disk0")).split()[2] == "snapshot-origin"
    shutil.rmtree(h.names.runs_dir / run_.id)
    acked = client.status()["committed_txid"]
    # Found and reported, never reused: the next backup names it and the way out.
    with pytest.raises(BadInput, match=r"diff area vm01_disk0_d_.*`hvlab recover`"):
        engine.start(h.defn.name, ["vm01"], model="2012")
    res = subprocess.run([sys.executable, "-m", "hvlab.cli", "recover", "-n", h.defn.name],
                         capture_output=True, text=True, timeout=300, env=os.environ)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "the guest's shadow copy diff area (2012)" in res.stdout, res.stdout
    assert h.lv_names() == pre and h.controller_maps_base("vm01", "disk0")
    assert dm.table(h.names.ctl("vm01", "disk0")).split()[2] == "linear"
    assert not dm.devices_with_prefix(f"{h.names.vg}_gs_")
    assert not dm.devices_with_prefix(f"{h.names.vg}_rv_")
    assert _live_txid(h) >= acked
    done = engine.start(h.defn.name, ["vm01"], fingerprints=False, model="2012")
    assert rst.verify(h.defn.name, done.id)["ok"]
