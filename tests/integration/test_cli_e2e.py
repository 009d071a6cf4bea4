"""The "done when" paths of issues 2-4 through the real `hvlab` command line, on the test
lab (2 VMs, 3 disks, guests running): status and guest status, the workload knobs, a paused
backup poked at with `hvlab devices`, resume, runs, explain, verify, restore."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from typing import Any

import pytest

from hvlab_fixtures.plugin import LabHandle
from hvlab_fixtures.waits import wait_for

pytestmark = pytest.mark.integration


def hvlab(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([sys.executable, "-m", "hvlab.cli", *args], capture_output=True,
                         text=True, env={**os.environ, "COLUMNS": "220"}, timeout=600)
    assert "Traceback" not in res.stderr + res.stdout, res.stderr
    if ok:
        assert res.returncode == 0, f"hvlab {' '.join(args)}: {res.stderr}"
    return res


def _guests(n: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(hvlab("guest", "status", "-n", n, "--json").stdout)
    return out


def _status(n: str, vm: str = "vm01") -> dict[str, Any]:
    return dict(_guests(n)[vm]["status"] or {"clock": 0.0, "writers": []})


def _txid(n: str, vm: str) -> int:
    return int(_status(n, vm).get("committed_txid") or 0)


def test_status_and_guests_commit(lab_with_guests: LabHandle) -> None:
    lab = lab_with_guests
    n = lab.defn.name
    tree = hvlab("status", "-n", n).stdout
    for part in ("loop", "thin pool", "vm01_disk0", "vm01_disk1", "vm02_disk0", "data"):
        assert part in tree, f"{part!r} missing from `hvlab status`"
    first = _guests(n)
    assert set(first) == {"vm01", "vm02"} and all(r["alive"] for r in first.values())
    tx0 = _txid(n, "vm01")
    wait_for(lambda: _txid(n, "vm01") > tx0, 30, "vm01's ledger writer commits")
    table = hvlab("guest", "status", "-n", n).stdout
    assert "vm01" in table and "windows" in table and "linux" in table
    # doctor may fail a check here (inside the lab VM some host tools are missing): it must
    # still report, in a table, the runner it would use
    doc = hvlab("doctor", ok=False)
    assert doc.returncode in (0, 1) and "dm-thin on this kernel" in doc.stdout
    assert "native" in doc.stdout


def test_workload_knobs(lab_with_guests: LabHandle) -> None:
    lab = lab_with_guests
    n = lab.defn.name
    wait_for(lambda: _txid(n, "vm01") > 0, 30, "vm01's ledger writer commits")
    asked = time.time()
    out = hvlab("guest", "workload", "vm01", "-n", n, "--pause").stdout
    assert "paused" in out
    # status.json is rewritten every second: one written after the pause says it is paused...
    wait_for(lambda: _status(n)["clock"] > asked
             and all(w["state"] == "paused" for w in _status(n)["writers"]), 30, "paused")
    tx0, since = _txid(n, "vm01"), _status(n)["clock"]
    # ... and two seconds of statuses later (20 transactions at the lab's rate) no more commit
    wait_for(lambda: _status(n)["clock"] > since + 2, 30, "two more seconds of status")
    assert _txid(n, "vm01") == tx0, "a paused writer still commits"
    out = hvlab("guest", "workload", "vm01", "-n", n, "--resume", "--ops-per-s", "40").stdout
    assert "target 40.0 ops/s" in out and "paused" not in out
    bad = hvlab("guest", "workload", "vm01", "-n", n, "--ops-per-s", "0", ok=False)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    bad = hvlab("guest", "workload", "vm01", "-n", n, ok=False)
    assert bad.returncode == 2 and "--ops-per-s" in bad.stderr


def test_paused_backup_poked_then_resumed(lab_with_guests: LabHandle) -> None:
    lab = lab_with_guests
    n = lab.defn.name
    pre = lab.lv_names()
    out = hvlab("backup", "-n", n, "vm01", "--pause-after", "11", "--no-fingerprints").stdout
    m = re.search(r"run (\S+) paused after step 11", out)
    assert m, out
    run_id = m.group(1)
    for role in ("C backup checkpoint", "A auto-recovery checkpoint",
                 "S external snapshot of B", "S external snapshot of A", "guest writes here"):
        assert role in out, f"{role!r} not printed at the pause"
    paths = re.findall(r"^\s+(/dev/\S+)", out, re.M)
    assert paths and all(os.path.exists(p) for p in paths), paths
    tree = hvlab("devices", "-n", n).stdout
    for label in ("backup checkpoint (C)", "auto-recovery checkpoint (A)",
                  "external snapshot (S)"):
        assert label in tree, f"{label!r} missing from `hvlab devices` during the pause"
    # the paused run holds vm01; a second backup of it is refused in one line
    busy = hvlab("backup", "-n", n, "vm01", ok=False)
    assert busy.returncode == 2 and "already in a running backup" in busy.stderr
    assert len(busy.stderr.strip().splitlines()) == 1
    late = hvlab("backup", "-n", n, "--resume", run_id, "--pause-after", "3", ok=False)
    assert late.returncode == 2 and "already past step 3" in late.stderr
    assert not _guests(n)["vm01"]["status"]["frozen"]

    out = hvlab("backup", "-n", n, "--resume", run_id).stdout
    assert f"run {run_id} done" in out
    assert lab.lv_names() == pre and lab.controller_maps_base("vm01", "disk0")

    listing = json.loads(hvlab("runs", "-n", n, "--json").stdout)
    (rec,) = [r for r in listing if r["id"] == run_id]
    assert rec["state"] == "done"
    assert run_id in hvlab("runs", "-n", n).stdout
    timeline = hvlab("explain", "-n", n, run_id).stdout
    for text in ("T0", "vm01", "C"):
        assert text in timeline
    ver = json.loads(hvlab("verify", "-n", n, run_id, "--json").stdout)
    assert ver["ok"] is True
    hvlab("restore", "-n", n, run_id, "--as", "rest01", "--vm", "vm01")
    disks = [d.name for d in lab.defn.vms[0].disks]
    lab.expect_extra(lvs=[lab.names.lv("rest01", d) for d in disks],
                     dm=[lab.names.ctl("rest01", d) for d in disks])
    assert "rest01" in hvlab("devices", "-n", n).stdout
