"""More of issue 4 on real devices: a backup under full write load, and pausing after every
step where a pause is allowed, continued by --resume and unwound by --abort."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hvlab.backup import restore as rst
from hvlab.flow import actions, engine, steps
from hvlab.guest.client import GuestClient
from hvlab.guest.supervise import stop_guest
from hvlab.lab import guests, runs
from hvlab_fixtures.plugin import LabHandle, one_vm_lab

pytestmark = pytest.mark.integration

ONE_VM = one_vm_lab()
ALLOWED = [1, 2, 3, 8, 9, 10, 11, 12, 13]


def test_backup_while_the_guest_writes_at_full_rate(lab_factory: Callable[..., LabHandle]
                                                   ) -> None:
    h = lab_factory(ONE_VM, start_guests=True)
    client = GuestClient(guests.socket_path(h.names, "vm01"))
    client.workload(ops_per_s=2000)  # as fast as the guest can go
    before = client.status()["committed_txid"]
    run_ = engine.start(h.defn.name, ["vm01"], fingerprints=False)
    assert run_.state == "done"
    after = client.status()["committed_txid"]
    assert after > before, "the guest kept committing through the backup"
    report = rst.verify(h.defn.name, run_.id)
    assert report["ok"], report
    assert h.controller_maps_base("vm01", "disk0")
    # Invariant 3, exactly: the image holds the ledger as committed at T0, not one
    # transaction more, although the guest kept committing after T0.
    t0_txid = (run_.vm["vm01"].freeze_reply or {})["ledger_last_txid"]
    (vm_report,) = report["vms"]
    assert vm_report["ledger"]["last_txid"] == t0_txid
    assert after > t0_txid


def test_flush_and_hold_timeout_fails_and_unwinds(lab_factory: Callable[..., LabHandle],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Invariant 7 on the timeout path: a guest whose watchdog thaws before the host's thaw
    (VSS_E_FLUSH_WRITES_TIMEOUT) fails the run, which unwinds to the LV set it found."""
    h = lab_factory(ONE_VM, start_guests=True)
    pre = h.lv_names()
    # The host asks for a 0.2 s hold and step 7 takes longer, so the guest's watchdog thaws.
    monkeypatch.setattr(actions, "FLUSH_AND_HOLD_S", 0.2)
    step_7 = steps.ACTIONS[7]

    def slow_step_7(ctx: Any, vm: str) -> Any:
        time.sleep(1.0)
        return step_7(ctx, vm)

    monkeypatch.setitem(steps.ACTIONS, 7, slow_step_7)
    with pytest.raises(engine.FlowFailed, match="VSS_E_FLUSH_WRITES_TIMEOUT"):
        engine.start(h.defn.name, ["vm01"], fingerprints=False)
    (run_,) = runs.all_runs(h.names)
    assert run_.state == "failed"
    assert h.lv_names() == pre and h.controller_maps_base("vm01", "disk0")
    st = GuestClient(guests.socket_path(h.names, "vm01")).status()
    assert not st["frozen"]
    probe = h.mountpoint("vm01", "disk0") / "after-timeout.txt"
    probe.write_text("writes go on\n")


@pytest.mark.parametrize("step", ALLOWED)
def test_pause_after_each_step_then_resume_or_abort(lab_factory: Callable[..., LabHandle],
                                                    step: int) -> None:
    h = lab_factory(ONE_VM, start_guests=True)
    lab = h.defn.name
    pre = h.lv_names()
    client = GuestClient(guests.socket_path(h.names, "vm01"))

    paused = engine.start(lab, ["vm01"], pause_after=step, fingerprints=False)
    assert paused.state == "paused"
    assert not client.status()["frozen"], "a paused run never holds the guest frozen"
    marker = h.mountpoint("vm01", "disk0") / f"written-while-paused-{step}"
    marker.write_text("live write\n")
    engine.abort(lab, paused.id)
    assert runs.load(h.names, paused.id).state == "aborted"
    assert h.lv_names() == pre and h.controller_maps_base("vm01", "disk0")
    assert marker.read_text() == "live write\n", "abort must keep the live writes"

    paused = engine.start(lab, ["vm01"], pause_after=step, fingerprints=False)
    done = engine.resume(lab, paused.id, fingerprints=False)
    assert done.state == "done"
    assert h.lv_names() == pre and h.controller_maps_base("vm01", "disk0")
    assert marker.read_text() == "live write\n"
    assert rst.verify(lab, done.id)["ok"]


def test_windows_vm_whose_guest_is_down_falls_back_to_crash_consistent(
        lab_factory: Callable[..., LabHandle]) -> None:
    """Invariant 9: a guest that does not answer gives a labelled crash-consistent backup."""
    h = lab_factory(ONE_VM, start_guests=True)
    stop_guest(h.names.guest_dir("vm01"))
    pre = h.lv_names()
    # Application-aware processing required: the job fails, as Veeam's "Require" does.
    with pytest.raises(engine.FlowFailed, match="application-aware processing is required"):
        engine.start(h.defn.name, ["vm01"], fingerprints=False, app_aware="require")
    assert h.lv_names() == pre and h.controller_maps_base("vm01", "disk0")
    run_ = engine.start(h.defn.name, ["vm01"], fingerprints=False)  # "try", the default
    assert run_.state == "done"
    assert run_.vm["vm01"].cls == "crash-consistent"
    man = json.loads((Path(run_.dest) / "manifest.json").read_text())
    assert man["vms"][0]["app_aware"] == "try" and man["vms"][0]["fallback"]
    report = rst.verify(h.defn.name, run_.id)
    assert report["ok"] and report["vms"][0]["consistency"] == "crash-consistent"
    rec = rst.restore(h.defn.name, run_.id, "rest01", vm="vm01")
    h.expect_extra(lvs=rec["lvs"], dm=rec["controllers"])
    assert rec["controllers"]


def test_application_aware_processing_off_never_asks_the_guest(
        lab_factory: Callable[..., LabHandle]) -> None:
    h = lab_factory(ONE_VM, start_guests=True)
    client = GuestClient(guests.socket_path(h.names, "vm01"))
    res = subprocess.run([sys.executable, "-m", "hvlab.cli", "backup", "vm01", "-n",
                          h.defn.name, "--app-aware", "off", "--no-fingerprints"],
                         capture_output=True, text=True, timeout=300, env=os.environ)
    assert res.returncode == 0 and "crash-consistent" in res.stdout, res.stdout + res.stderr
    (run_,) = runs.all_runs(h.names)
    assert run_.app_aware == "off" and run_.vm["vm01"].answers is False
    assert "off" in (run_.vm["vm01"].no_answer or "")
    assert client.status()["state"] != "thawed", "the guest was asked to freeze"
    bad = subprocess.run([sys.executable, "-m", "hvlab.cli", "backup", "vm01", "-n",
                          h.defn.name, "--app-aware", "maybe"], capture_output=True, text=True,
                         timeout=300, env=os.environ)
    assert bad.returncode == 2 and "maybe" in bad.stderr
