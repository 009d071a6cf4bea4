"""`hvlab doctor` on a host without device-mapper: a real freeze here and, in the lab VM
(Linux 6.1), a real freeze and the nesting probe; nothing of either is left behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from hvlab.sys import fs, loop

pytestmark = pytest.mark.vm

FREEZE_HERE = re.compile(
    r"^  fsfreeze: on this kernel \(Linux \S+\): freeze \+ thaw of a scratch ext4 works$", re.M)
FREEZE_VM = re.compile(
    r"^  fsfreeze: in the lab VM \(Linux 6\.1\.\S+\): freeze \+ thaw of a scratch ext4 works$",
    re.M)
NESTING_VM = re.compile(
    r"^  nesting: in the lab VM \(Linux 6\.1\.\S+\): user freeze \+ dm suspend do not nest "
    r"\(EBUSY\)$", re.M)

# Both fits: a host whose XSAVE area is no larger than UML's buffer (AVX without AVX-512 or
# AMX: 832 bytes on an AMD EPYC here) needs no shim; a larger one (AMX: 11008) is widened.
FP_STATE = re.compile(r"lab VM FP state \(XSAVE\) +│ yes +│ host XSAVE \d+ bytes, UML 2696 "
                      r"\((seen at the last boot|Debian 12's UML)\): (UML's buffer is large "
                      r"enough: ptrace passes through unchanged|the shim widens UML's SETREGSET "
                      r"to the host's size)")


def hvlab(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hvlab.cli", *args], capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL,
                          env={**os.environ, "COLUMNS": "300"})  # table rows unwrapped


def _scratch_dirs() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("hvlab-doctor-*"))


def _doctor_and_check_nothing_left(vm_env: Path) -> str:
    dirs_before = _scratch_dirs()
    res = hvlab("doctor")
    out = res.stdout
    assert res.returncode == 0, out + res.stderr
    assert FREEZE_HERE.search(out), out
    assert FREEZE_VM.search(out), out
    assert NESTING_VM.search(out), out
    assert "LEFT BEHIND" not in out
    # The host's XSAVE size against UML's buffer, and the fix in use (issue 20).
    assert FP_STATE.search(out), out
    # Nothing of the probes on the host: loop, mount, scratch dir, the VM's result file.
    assert not [lo for lo in loop.list_loops() if "/hvlab-doctor-" in lo.back_file]
    assert not [m for m in fs.mounts() if "/hvlab-doctor-" in m.target]
    assert _scratch_dirs() <= dirs_before
    assert not list((vm_env / "vm").glob("doctor-*.json"))
    return out


def test_doctor_probes_freeze_and_nesting_in_a_one_shot_lab_vm(vm_env: Path) -> None:
    _doctor_and_check_nothing_left(vm_env)
    from hvlab.vm import control

    assert not control.is_up()  # the one-shot VM is gone


def test_doctor_uses_the_running_lab_vm(vm_env: Path) -> None:
    assert hvlab("vm", "up").returncode == 0
    from hvlab.vm import control

    pid = control.pid()
    out = _doctor_and_check_nothing_left(vm_env)
    m = FP_STATE.search(out)
    # The shim reports a boot only when it widened: then doctor tells what it saw.
    assert m is not None, out
    assert (m.group(1) == "seen at the last boot") == m.group(2).startswith("the shim widens")
    assert control.pid() == pid  # doctor ran its probe in it and left it running
    res = hvlab("vm", "run", "--", "sh", "-c",
                "losetup -l -n; dmsetup ls; grep doctor /proc/mounts")
    assert "hvlab-doctor" not in res.stdout, res.stdout
