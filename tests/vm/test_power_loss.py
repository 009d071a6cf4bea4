"""Power loss of the lab VM in the middle of a backup: nothing the guest committed is lost.

After step 5 the guest writes into the backup checkpoint C. A restart of the lab must map C
again (not B, which holds T0), the run must resume to a backup that verifies, and the killed
VM's helper processes must not outlive the next `hvlab up`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

pytestmark = pytest.mark.vm

LAB = """
[lab]
name = "pl"
backing_size = "2G"
[[vm]]
name = "vm01"
profile = "windows"
[[vm.disk]]
name = "disk0"
size = "256M"
fs = "ext4"
[[vm.disk]]
name = "disk1"
size = "320M"
fs = "xfs"
[vm.workload]
ops_per_s = 20
paused = true   # the test decides when the guest commits, so it can compare exactly
"""


def hvlab(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([sys.executable, "-m", "hvlab.cli", *args], capture_output=True,
                         text=True, timeout=timeout, env=os.environ, stdin=subprocess.DEVNULL)
    return res


def ok(*args: str) -> str:
    res = hvlab(*args)
    assert res.returncode == 0, f"hvlab {' '.join(args)}: {res.stdout}\n{res.stderr}"
    return res.stdout


def guest(vm: str = "vm01") -> dict[str, Any]:
    rows = json.loads(ok("guest", "status", "-n", "pl", "--json"))
    st: dict[str, Any] = rows[vm]["status"] or {}
    return st


def test_power_loss_after_step_11_loses_no_committed_transaction(vm_env: Path) -> None:
    from hvlab.vm import control

    lab_file = vm_env / "pl.toml"
    lab_file.write_text(LAB)
    ok("up", "--lab", str(lab_file))
    ok("guest", "workload", "vm01", "-n", "pl", "--resume")
    out = ok("backup", "vm01", "-n", "pl", "--pause-after", "11")
    run_id = re.findall(r"\br\d{14}[0-9a-f]{4}\b", out)[0]
    t0_txid = json.loads((vm_env / "home" / "pl" / "runs" / run_id / "run.json").read_text()
                         )["vm"]["vm01"]["window"]["open_txid"]
    time.sleep(2)  # the guest commits into C
    ok("guest", "workload", "vm01", "-n", "pl", "--pause")
    before = guest()
    assert before["committed_txid"] > (t0_txid or 0) + 5, (before, t0_txid)

    # Power loss: the UML kernel process dies at once; its helper processes linger.
    main = control.pid()
    assert main is not None
    old = {p.pid for p in control._uml_processes(control.persistent_paths())}
    os.kill(main, signal.SIGKILL)
    psutil.Process(main).wait(timeout=10) if psutil.pid_exists(main) else None

    out = ok("up", "--lab", str(lab_file))  # boots a new lab VM and restarts the lab
    assert "a backup's C" in out, out
    assert not [p for p in old if psutil.pid_exists(p) and p != main], \
        "helpers of the killed lab VM outlived `hvlab up`"
    after = guest()
    assert (after["committed_txid"], after["committed_hash"]) == (
        before["committed_txid"], before["committed_hash"]), "committed transactions lost"

    ok("backup", "--resume", run_id, "-n", "pl")
    ok("verify", run_id, "-n", "pl")
    # The merge kept C's data: the live ledger is still at the same head.
    after = guest()
    assert after["committed_txid"] == before["committed_txid"]
    ok("down", "-n", "pl")
