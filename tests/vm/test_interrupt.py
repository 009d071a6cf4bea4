"""A forwarded backup and its client: Ctrl-C unwinds the run inside the lab VM before the
client exits 130; a client that dies (kill -9, a closed terminal) leaves no command without an
owner; `down` refuses to pull a lab from under a paused run."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from hvlab_fixtures.plugin import lab_toml, one_vm_lab

pytestmark = pytest.mark.vm

LAB = lab_toml(one_vm_lab(name="ic", backing="1G"))
HANG = ["backup", "vm01", "-n", "ic", "--no-fingerprints", "--inject", "s11-one:hang"]


def hv(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hvlab.cli", *args], capture_output=True,
                          text=True, timeout=600, env=os.environ, stdin=subprocess.DEVNULL)


def runs() -> list[dict[str, Any]]:
    res = hv("runs", "-n", "ic", "--json")
    assert res.returncode == 0, res.stderr
    rows: list[dict[str, Any]] = json.loads(res.stdout)
    return rows


def ctrl_c_heard() -> None:
    """The client as a terminal starts it: a job started with `&` by a shell without job
    control (make, nohup, a CI script) inherits SIGINT ignored, and Python then never installs
    its Ctrl-C handler, so the SIGINT below would be lost and the client wait for ever."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def hanging_backup() -> subprocess.Popen[str]:
    """A backup started from the host that hangs inside step 11 (one S made): returned once
    the backup says it hangs at the fault point (its stderr line, read as it comes)."""
    proc = subprocess.Popen([sys.executable, "-m", "hvlab.cli", *HANG], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ,
                            preexec_fn=ctrl_c_heard)
    assert proc.stderr is not None
    fd, seen = proc.stderr.fileno(), b""  # raw reads: a line may come in any chunk
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if select.select([fd], [], [], 1.0)[0]:
            chunk = os.read(fd, 65536)
            seen += chunk
            if b"hanging at fault point s11-one" in seen:
                return proc
            assert chunk, seen.decode(errors="replace")  # it ended
        assert proc.poll() is None, seen.decode(errors="replace")
    proc.kill()
    raise AssertionError(f"the backup never hung in step 11: {seen[-500:]!r}")


def settled(run_id: str, seconds: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        (r,) = [x for x in runs() if x["id"] == run_id]
        if r["state"] in ("failed", "aborted", "done"):
            return r
        time.sleep(1)
    raise AssertionError(f"run {run_id} did not end: {r['state']}")


def test_ctrl_c_unwinds_and_a_dead_client_leaves_no_owner(vm_env: Path) -> None:
    lab_file = vm_env / "ic.toml"
    lab_file.write_text(LAB)
    assert hv("up", "--lab", str(lab_file)).returncode == 0

    # Ctrl-C: the run unwinds inside the VM, then the client exits 130.
    proc = hanging_backup()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, out + err
    (first,) = runs()
    assert first["state"] == "failed" and "KeyboardInterrupt" in first["error"], first
    assert first["unwound"] and first["post"]["lvs"] == first["pre"]["lvs"], first

    # The client killed: the command inside is stopped (SIGTERM) and unwinds by itself.
    proc = hanging_backup()
    proc.kill()
    proc.wait(30)
    second = next(r for r in runs() if r["id"] != first["id"])
    second = settled(second["id"], 60)
    assert second["state"] == "failed" and second["post"]["lvs"] == second["pre"]["lvs"]

    # down refuses under a paused run; abort, then down.
    res = hv("backup", "vm01", "-n", "ic", "--pause-after", "9", "--no-fingerprints")
    assert res.returncode == 0, res.stderr
    res = hv("down", "-n", "ic")
    assert res.returncode == 2 and "--abort" in res.stderr and len(res.stderr.splitlines()) == 1
    paused = next(r for r in runs() if r["state"] == "paused")
    assert hv("backup", "-n", "ic", "--abort", paused["id"]).returncode == 0
    assert hv("down", "-n", "ic").returncode == 0
