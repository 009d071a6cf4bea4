"""The guest fails inside a real backup: killed while frozen, a writer vetoes the freeze, the
guest never answers the freeze. Each under `--app-aware require` (the job fails, nothing is
left, the guest is thawed and writing) and `try` (a labelled crash-consistent backup that
verifies); the filesystems are never frozen past the 10 s flush-and-hold limit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from guest_fixtures import write_in_thread

from hvlab.backup import restore as rst
from hvlab.flow import actions, engine, recover
from hvlab.guest.client import GuestClient
from hvlab.guest.supervise import guest_status, start_guest, stop_guest
from hvlab.lab import guests, runs
from hvlab.lab.record import Run
from hvlab.sys import dmioctl
from hvlab_fixtures.plugin import LabHandle, one_vm_lab
from hvlab_fixtures.waits import wait_for

pytestmark = pytest.mark.integration

ONE_VM = one_vm_lab()
HOLD = actions.FLUSH_AND_HOLD_S


def client(h: LabHandle) -> GuestClient:
    return GuestClient(guests.socket_path(h.names, "vm01"))


def restart_guest(h: LabHandle, **knobs: Any) -> None:
    stop_guest(h.names.guest_dir("vm01"))
    start_guest(guests.config_for(h.defn, h.names, "vm01", **knobs))



def kill_guest_while_frozen(h: LabHandle) -> float:
    """Wait until the guest is frozen in a backup, kill -9 it, and return when it froze."""
    c = client(h)
    end = time.monotonic() + 120
    while time.monotonic() < end:
        st = c.status()
        if st["frozen"]:
            os.kill(st["pid"], signal.SIGKILL)
            # Gone, or a zombie: a thread of it blocked on the frozen disk ends at the thaw.
            wait_for(lambda: not guest_status(h.names.guest_dir("vm01"))["alive"])
            return float(st["frozen_at"])
        time.sleep(0.02)
    raise AssertionError("the guest never froze")


def assert_thawed_in_time(h: LabHandle, frozen_at: float) -> None:
    """A write to the VM's disk completes before the flush-and-hold limit runs out."""
    t = write_in_thread(h.mountpoint("vm01", "disk0") / "after-kill.txt")
    t.join(max(0.0, frozen_at + HOLD - time.time()) + 1.0)  # 1 s: the write itself
    assert not t.is_alive(), "the disk stayed frozen past the flush-and-hold limit"


def assert_writing(h: LabHandle) -> None:
    c = client(h)
    st = c.status()
    assert not st["frozen"] and all(w["state"] == "running" for w in st["writers"]), st
    txid = st["committed_txid"]
    wait_for(lambda: c.status()["committed_txid"] > txid)  # it commits again


def assert_crash_consistent(h: LabHandle, run_: Run, why: str) -> None:
    assert run_.state == "done" and run_.vm["vm01"].cls == "crash-consistent"
    man = json.loads((Path(run_.dest) / "manifest.json").read_text())
    assert why in man["vms"][0]["fallback"], man["vms"][0]
    report = rst.verify(h.defn.name, run_.id)
    assert report["ok"] and report["vms"][0]["consistency"] == "crash-consistent", report


def backup_in_thread(lab: str, policy: str) -> tuple[threading.Thread, list[object]]:
    """A backup running while the test acts on its guest; the list gets its run or error."""
    result: list[object] = []

    def work() -> None:
        try:
            result.append(engine.start(lab, ["vm01"], fingerprints=False, app_aware=policy))
        except engine.FlowFailed as exc:
            result.append(exc)

    # Whether the guest dies before or after it answers the freeze, the flow may reach step
    # 5, whose bounded suspend, from a thread, needs this done in the main thread.
    dmioctl.prepare_interrupts()
    t = threading.Thread(target=work)
    t.start()
    return t, result


def test_guest_killed_while_frozen_in_a_backup(lab_factory: Callable[..., LabHandle]) -> None:
    """kill -9 of the guest inside the freeze window: the host thaws its disks within the
    flush-and-hold limit even while the backup hangs; the run fails under require, goes on
    crash-consistent under try; after a restart of the guest the next backup verifies."""
    h = lab_factory(ONE_VM, start_guests=True)
    lab, pre = h.defn.name, h.lv_names()

    # The backup hangs inside the window: only the host's guard of the window can thaw.
    proc = subprocess.Popen([sys.executable, "-m", "hvlab.cli", "backup", "vm01", "-n", lab,
                             "--no-fingerprints", "--inject", "step-07:hang"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        said = ""
        for line in proc.stderr:
            said += line
            if "hanging at fault point step-07" in line:
                break
        else:
            raise AssertionError(f"the backup never reached step 7: {said}")
        assert_thawed_in_time(h, kill_guest_while_frozen(h))
    finally:
        proc.kill()
        proc.wait(30)
    rep = recover.recover(lab)  # the run died inside its window: aborted
    assert rep.left == [] and h.lv_names() == pre and h.controller_maps_base("vm01", "disk0")

    for policy in ("require", "try"):
        restart_guest(h)
        t, result = backup_in_thread(lab, policy)
        assert_thawed_in_time(h, kill_guest_while_frozen(h))
        t.join(300)
        assert not t.is_alive()
        if policy == "require":
            (exc,) = result
            assert isinstance(exc, engine.FlowFailed), exc
            assert "application-aware processing is required" in str(exc), exc
            assert h.lv_names() == pre and h.controller_maps_base("vm01", "disk0")
            assert [r.state for r in runs.all_runs(h.names)].count("failed") == 1
        else:
            (run_,) = result
            assert isinstance(run_, Run), run_
            assert_crash_consistent(h, run_, "the guest")

    restart_guest(h)
    assert_writing(h)
    again = engine.start(lab, ["vm01"], fingerprints=False, app_aware="require")
    assert again.vm["vm01"].cls == "application-consistent"
    assert rst.verify(lab, again.id)["ok"]
    assert h.lv_names() == pre


@pytest.mark.parametrize("fault", [{"veto": "scratch"}, {"mute": "freeze"}],
                         ids=["writer-vetoes", "no-answer"])
def test_guest_cannot_quiesce(lab_factory: Callable[..., LabHandle], fault: dict[str, str],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A VSS-aware writer vetoes the freeze (the ledger, frozen before it, is let go), or the
    guest never answers the freeze: require fails the job and leaves nothing, the guest
    thawed and writing; try makes a crash-consistent backup, labelled, that verifies."""
    h = lab_factory(ONE_VM, start_guests=True)
    restart_guest(h, writer_timeout_s=2.0)  # the host waits 2 s + its slack for an answer
    monkeypatch.setattr(actions, "FREEZE_SLACK_S", 1.0)  # no freeze succeeds here: 1 s will do
    lab, pre = h.defn.name, h.lv_names()
    why = "vetoed the freeze: VSS_E_WRITERERROR_RETRYABLE" if "veto" in fault else \
        "did not answer"

    assert client(h).fault(**fault)["armed"] == fault
    with pytest.raises(engine.FlowFailed, match="application-aware processing is required"
                       ) as failed:
        engine.start(lab, ["vm01"], fingerprints=False, app_aware="require")
    assert why in str(failed.value)
    assert h.lv_names() == pre and h.controller_maps_base("vm01", "disk0")
    assert client(h).status()["faults"] == {}, "a fault fires once"
    assert_writing(h)

    client(h).fault(**fault)
    run_ = engine.start(lab, ["vm01"], fingerprints=False, app_aware="try")
    assert_crash_consistent(h, run_, why)
    assert h.lv_names() == pre
    assert_writing(h)
