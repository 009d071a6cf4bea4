"""A lab VM that does not boot says why in one line, in its kernel's words, and what to do;
the console log keeps the kernel's messages (issue 20)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hvlab.vm import xstate

pytestmark = pytest.mark.vm


def hvlab(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hvlab.cli", *args], capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL,
                          env={**os.environ, **env})


def _one_line(res: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode != 0 and len(lines) == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    return lines[0]


def test_persistent_vm_that_cannot_boot_says_why(vm_env: Path) -> None:
    line = _one_line(hvlab("vm", "up", HVLAB_VM_MEM="8M"))
    assert "did not come up: Too few physical memory" in line, line
    assert "HVLAB_VM_MEM" in line  # what to do
    log = vm_env / "vm" / "lab-vm" / "console.log"
    assert str(log) in line and "Too few physical memory" in log.read_text()


def test_one_shot_vm_that_cannot_boot_says_why(vm_env: Path) -> None:
    line = _one_line(hvlab("vm", "run", "--ephemeral", "--", "true", HVLAB_VM_MEM="8M"))
    assert "did not come up: Too few physical memory" in line, line
    assert (vm_env / "vm" / "failed-boot.log").exists()
    assert not list((vm_env / "vm").glob("eph-*")) and not list((vm_env / "vm").glob("diag-*"))


def test_without_the_shim_an_amx_host_names_the_ptrace_failure(vm_env: Path) -> None:
    """The failure the shim fixes, as a user would meet it. On a host whose XSAVE size is no
    larger than UML's buffer, the lab VM needs no shim and boots without it."""
    host = xstate.host_bytes(xstate.build(vm_env / "shim"))
    res = hvlab("vm", "up", HVLAB_XSTATE_SHIM="0")
    if xstate.decide(xstate.UML_BYTES, host) == "pass":
        assert res.returncode == 0, res.stderr
        return
    line = _one_line(res)
    assert "ptrace set fp regs failed, errno = 14" in line, line
    assert "Kernel panic" in line and "hvlab doctor" in line
