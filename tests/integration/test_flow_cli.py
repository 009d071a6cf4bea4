"""`hvlab backup/restore/verify/explain` on bad input, through the real command line: one
line on stderr naming the bad value, exit code 2, no traceback, and nothing changed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hvlab.fixtures.plugin import LabHandle
from hvlab.flow import engine
from hvlab.lab import runs
from hvlab.sys.run import run

pytestmark = pytest.mark.integration


def hvlab(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hvlab.cli", *args], capture_output=True,
                          text=True, env=os.environ, timeout=300)


def _one_line_error(res: subprocess.CompletedProcess[str], message: str) -> str | None:
    """None when `res` is a one-line usage error containing `message`; else what is wrong."""
    lines = res.stderr.strip().splitlines()
    if (res.returncode == 2 and len(lines) == 1 and message in lines[0]
            and "Traceback" not in res.stderr + res.stdout):
        return None
    return f"{res.args[3:]}: exit {res.returncode}, stderr {res.stderr!r}, want {message!r}"


def test_backup_restore_verify_bad_input(lab: LabHandle, tmp_path: Path) -> None:
    n = lab.defn.name
    done = engine.start(n, ["vm02"], fingerprints=False)
    assert done.state == "done"
    lvs_before = lab.lv_names()
    runs_before = {r.id for r in runs.all_runs(lab.names)}

    ro = tmp_path / "ro"
    ro.mkdir()
    run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "hvlab-test-ro", str(ro)])
    try:
        cases = [
            (["backup", "-n", n, "vm09"], "unknown VM 'vm09'"),
            (["backup", "-n", n], "give VMs to back up"),
            (["backup", "-n", n, "vm01", "vm01"], "named twice"),
            (["backup", "-n", n, "vm01", "--dest", done.dest], "already exists"),
            (["backup", "-n", n, "vm01", "--dest", str(ro / "b")], "not writable"),
            (["backup", "-n", n, "vm01", "--pause-after", "5"], "freeze window"),
            (["backup", "-n", n, "vm01", "--pause-after", "15"], "15"),
            (["backup", "-n", n, "--resume", done.id], "nothing to resume"),
            (["backup", "-n", n, "--abort", done.id], "nothing to abort"),
            (["backup", "-n", n, "--resume", "r0nosuchrun"], "r0nosuchrun"),
            (["restore", "-n", n, done.dest, "--as", "vm01"], "restore onto a new name"),
            (["restore", "-n", n, done.dest, "--as", "Bad_Name"], "Bad_Name"),
            (["restore", "-n", n, str(tmp_path / "nobackup"), "--as", "rest"], "nobackup"),
            (["verify", "-n", n, str(tmp_path / "nobackup")], "nobackup"),
            (["explain", "-n", n, "r0nosuchrun"], "r0nosuchrun"),
            (["explain", "-n", n, done.id, "--json", "--commands"], "use it alone"),
            (["backup", "-n", n, "vm01", "--inject", "step-99:kill"], "step-99"),
            (["backup", "-n", n, "vm01", "--inject", "step-05:explode"], "explode"),
        ]
        wrong = [w for args, message in cases if (w := _one_line_error(hvlab(*args), message))]
        assert not wrong, "\n".join(wrong)
    finally:
        run(["umount", str(ro)])
    assert lab.lv_names() == lvs_before, "bad input changed the LV set"
    assert {r.id for r in runs.all_runs(lab.names)} == runs_before, "a run was registered"
    assert lab.controller_maps_base("vm02", "disk0")
    # The program log: every command of every step, ready to copy.
    out = hvlab("explain", "-n", n, done.id, "--commands")
    assert out.returncode == 0, out.stderr
    assert "# [5] vm02 backup checkpoint" in out.stdout
    assert "lvm lvcreate -q -s -kn" in out.stdout and "dmsetup reload" in out.stdout
    assert "thin_dump --metadata-snap" in out.stdout and "lvm lvrename" in out.stdout


def test_stop_is_refused_while_a_backup_is_paused(lab: LabHandle) -> None:
    n = lab.defn.name
    paused = engine.start(n, ["vm02"], pause_after=9, fingerprints=False)
    assert paused.state == "paused" and not lab.controller_maps_base("vm02", "disk0")
    assert _one_line_error(hvlab("stop", "-n", n), "before `hvlab stop`") is None
    engine.abort(n, paused.id)
    assert lab.controller_maps_base("vm02", "disk0")
