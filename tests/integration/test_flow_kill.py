"""A backup process killed with SIGKILL in the middle of a step is recoverable by the next
command: `--resume` finishes the run, `--abort` unwinds it, and either leaves the LV set as it
was. The kill points are half-done steps: the object exists, the run record does not say so."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import psutil
import pytest

from hvlab.backup import restore as rst
from hvlab.errors import BadInput
from hvlab.fixtures.plugin import LabHandle
from hvlab.flow import engine, runs
from hvlab.guest.client import GuestClient
from hvlab.lab import guests
from hvlab.sys import fs
from hvlab.sys.lvm import Lvm

pytestmark = pytest.mark.integration

ONE_VM: dict[str, Any] = {
    "lab": {"name": "k", "backing_size": "512M"},
    "vm": [{"name": "vm01", "profile": "windows",
            "disk": [{"name": "disk0", "size": "64M", "fs": "ext4"}]}],
}

# Each patch runs the real operation, then kills the process before the run record is saved.
KILLERS = {
    "step 10, A attached to the guest": """
orig = engine.dm.create_linear
def patched(*a, **k):
    out = orig(*a, **k); die(); return out
engine.dm.create_linear = patched
""",
    "step 11, S_B made, S_A not": """
orig = engine.Ctx.snapshot
def patched(self, origin, name, role, *a, **k):
    orig(self, origin, name, role, *a, **k)
    if role == engine.ROLE_OF["S_B"]: die()
engine.Ctx.snapshot = patched
""",
    "step 13, metadata snapshot reserved": """
orig = thinmeta.MetadataSnap.delta
def patched(self, *a):
    orig(self, *a); die()
thinmeta.MetadataSnap.delta = patched
""",
    "step 14, C renamed, tags not yet fixed": """
orig = engine.retag_base
def patched(ctx, lv):
    die()
engine.retag_base = patched
""",
    "step 14, B removed, C not yet renamed": """
orig = engine.Ctx.remove_lv
def patched(self, lv):
    out = orig(self, lv)
    if lv == "vm01_disk0": die()
    return out
engine.Ctx.remove_lv = patched
""",
    "after step 14, before the manifest": """
engine.finish = lambda ctx: die()
""",
    "manifest written, run not yet marked done": """
from hvlab.backup import manifest
orig = manifest.write
def patched(*a, **k):
    orig(*a, **k); die()
manifest.write = patched
""",
}

SCRIPT = """
import os, signal, sys
from hvlab.flow import engine
from hvlab.backup import thinmeta
def die():
    os.kill(os.getpid(), signal.SIGKILL)
{patch}
engine.start(sys.argv[1], ["vm01"], fingerprints=False)
"""


def _killed_run(h: LabHandle, point: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(patch=KILLERS[point]),
                           h.defn.name], env=dict(os.environ), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == -9, proc.stderr
    (run_,) = runs.all_runs(h.names)
    assert runs.effective_state(run_) == "interrupted"
    return run_


@pytest.mark.parametrize("point", list(KILLERS))
def test_killed_mid_step_then_resume(lab_factory: Callable[..., LabHandle], point: str) -> None:
    h = lab_factory(ONE_VM, start_guests=True)
    pre = h.lv_names()
    run_ = _killed_run(h, point)
    done = engine.resume(h.defn.name, run_["id"], fingerprints=False)
    assert done["state"] == "done"
    assert h.lv_names() == pre and h.controller_maps_base("vm01", "disk0")
    assert not GuestClient(guests.socket_path(h.names, "vm01")).status()["frozen"]
    assert rst.verify(h.defn.name, run_["id"])["ok"]


@pytest.mark.parametrize("point", ["step 11, S_B made, S_A not",
                                   "step 14, B removed, C not yet renamed"])
def test_killed_mid_step_then_abort(lab_factory: Callable[..., LabHandle], point: str) -> None:
    h = lab_factory(ONE_VM, start_guests=True)
    pre = h.lv_names()
    marker = h.mountpoint("vm01", "disk0") / "live.txt"
    run_ = _killed_run(h, point)
    marker.write_text("written after the kill\n")
    engine.abort(h.defn.name, run_["id"])
    assert runs.load(h.names, run_["id"])["state"] == "aborted"
    assert h.lv_names() == pre and h.controller_maps_base("vm01", "disk0")
    assert marker.read_text() == "written after the kill\n"
    with pytest.raises(Exception, match="nothing to resume"):
        engine.resume(h.defn.name, run_["id"])


def test_killed_inside_the_freeze_with_controllers_suspended(
        lab_factory: Callable[..., LabHandle]) -> None:
    """Killed in step 5 between the suspend and the resume of the controller, with the guest
    frozen: resume is refused, abort resumes the controller, thaws and removes C."""
    h = lab_factory(ONE_VM, start_guests=True)
    pre = h.lv_names()
    KILLERS["step 5, controller suspended"] = """
orig = engine.Ctx.snapshot
def patched(self, origin, name, role, *a, **k):
    orig(self, origin, name, role, *a, **k)
    if role == engine.ROLE_OF["C"]: die()
engine.Ctx.snapshot = patched
"""
    try:
        run_ = _killed_run(h, "step 5, controller suspended")
    finally:
        del KILLERS["step 5, controller suspended"]
    with pytest.raises(BadInput, match="inside a freeze window"):
        engine.resume(h.defn.name, run_["id"])
    engine.abort(h.defn.name, run_["id"])
    assert h.lv_names() == pre and h.controller_maps_base("vm01", "disk0")
    assert not GuestClient(guests.socket_path(h.names, "vm01")).status()["frozen"]
    probe = h.mountpoint("vm01", "disk0") / "after-abort.txt"
    probe.write_text("the disk takes writes again\n")
    assert probe.read_text() == "the disk takes writes again\n"


def test_resume_finishes_the_retag_of_a_merged_checkpoint(
        lab_factory: Callable[..., LabHandle]) -> None:
    h = lab_factory(ONE_VM, start_guests=True)
    run_ = _killed_run(h, "step 14, C renamed, tags not yet fixed")
    engine.resume(h.defn.name, run_["id"], fingerprints=False)
    rows = {r["lv_name"]: r for r in Lvm(h.names.lvm_dir).lvs(h.names.vg)}
    tags = rows["vm01_disk0"]["lv_tags"].split(",")
    assert "role_base" in tags and "role_checkpoint" not in tags
    assert not [t for t in tags if t.startswith("run_")]
    again = engine.start(h.defn.name, ["vm01"], fingerprints=False)  # no leftover reported
    assert again["state"] == "done"


@pytest.mark.parametrize("guest_restarted", [False, True])
def test_killed_while_the_guest_had_A_mounted(lab_factory: Callable[..., LabHandle],
                                               guest_restarted: bool) -> None:
    """Host and guest both die during step 10's auto-recovery, with A still mounted in the
    guest's run dir: the next guest start or the resumed step 10 unmounts it, and the run
    finishes as if nothing happened."""
    h = lab_factory(ONE_VM, start_guests=True)
    pre = h.lv_names()
    run_dir = h.names.guest_dir("vm01")
    KILLERS["step 10, A mounted in the guest"] = f"""
import subprocess
from hvlab.guest.client import GuestClient
def patched(self, devices):
    mnt = {str(run_dir)!r} + "/ar-killed/disk0"
    os.makedirs(mnt)
    subprocess.run(["mount", devices["disk0"], mnt], check=True)
    die()
GuestClient.post_snapshot = patched
"""
    try:
        run_ = _killed_run(h, "step 10, A mounted in the guest")
    finally:
        del KILLERS["step 10, A mounted in the guest"]
    assert fs.mounts_under(run_dir)
    if guest_restarted:
        pid = guests.running_pids(h.names)[0]
        proc = psutil.Process(pid)
        os.kill(pid, signal.SIGKILL)
        proc.wait(30)
        guests.start_all(h.defn, h.names)
        assert not fs.mounts_under(run_dir)
    done = engine.resume(h.defn.name, run_["id"], fingerprints=False)
    assert done["state"] == "done"
    assert not fs.mounts_under(run_dir) and not list(run_dir.glob("ar-*"))
    assert h.lv_names() == pre
    assert rst.verify(h.defn.name, run_["id"])["ok"]
