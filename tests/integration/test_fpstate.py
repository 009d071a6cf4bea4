"""The kernel the lab runs on keeps every task's FP/vector state (issue 20): in the lab VM
that is user-mode-linux switching it by ptrace, through the shim on hosts with AMX."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from hvlab_fixtures.plugin import requires

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import sha_workload  # noqa: E402


def test_vector_registers_survive_every_switch(tmp_path: Path) -> None:
    requires("cc")
    exe = tmp_path / "fpstate"
    subprocess.run(["cc", "-O2", "-Wall", "-pthread", "-o", str(exe), str(HERE / "fpstate.c")],
                   check=True, capture_output=True, text=True)
    mib = 8
    expected = hashlib.sha256(sha_workload.data(mib)).hexdigest()
    # The copies and hashes run beside the register test, so their tasks interleave with it.
    hashing = subprocess.Popen([sys.executable, str(HERE / "sha_workload.py"), "3", "2", "6",
                                str(mib), expected], stdout=subprocess.PIPE, text=True)
    try:
        regs = subprocess.run([str(exe), "4", "2", "3000"], capture_output=True, text=True,
                              timeout=600)
        hashed, _ = hashing.communicate(timeout=600)
    finally:
        if hashing.poll() is None:
            hashing.kill()
            hashing.wait()
    assert regs.returncode == 0, regs.stdout + regs.stderr
    assert "every register kept" in regs.stdout
    assert any(k in regs.stdout for k in ("avx512,", "avx2,")), regs.stdout
    assert hashing.returncode == 0 and "every digest right" in hashed, hashed
