"""The FP-state test means something: with a shim built to switch only part of the vector
state, the same program, in the lab VM, reports the registers it lost (issue 20)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hvlab.vm import xstate
from hvlab_fixtures.plugin import requires

pytestmark = pytest.mark.vm
REPO = Path(__file__).resolve().parents[2]


def _cc(out: Path, *args: str) -> Path:
    subprocess.run(["cc", "-O2", "-Wall", *args, "-o", str(out)], check=True,
                   capture_output=True, text=True)
    return out


def test_a_shim_that_drops_upper_vector_state_is_caught(vm_env: Path) -> None:
    requires("cc")
    flags = open("/proc/cpuinfo").read()
    # Switch only x87/SSE and the header (576 bytes), plus the AVX upper halves (832) where
    # the CPU has AVX-512: what is left unswitched is the widest state the program uses.
    keep = 832 if " avx512f" in flags else 576
    broken = _cc(vm_env / "broken.so", "-shared", "-fPIC", f"-DHVLAB_TEST_SWITCH_ONLY={keep}",
                 str(xstate.SOURCE), "-ldl")
    exe = _cc(vm_env / "fpstate", "-pthread", str(REPO / "tests/integration/fpstate.c"))
    res = subprocess.run([sys.executable, "-m", "hvlab.cli", "vm", "run", "--ephemeral", "--",
                          str(exe), "4", "2", "500"], capture_output=True, text=True,
                         timeout=300, stdin=subprocess.DEVNULL,
                         env={**os.environ, "HVLAB_XSTATE_SHIM": str(broken)})
    assert res.returncode != 0, res.stdout + res.stderr
    assert "MISMATCH" in res.stdout, res.stdout + res.stderr
