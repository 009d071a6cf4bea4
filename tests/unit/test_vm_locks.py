"""One running backup per VM across processes (flock), released when the holder dies."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hvlab.errors import BadInput
from hvlab.lab.paths import Names
from hvlab.lab.runs import VmLocks

HOLD = """
import os, sys, time
os.environ["HVLAB_HOME"] = sys.argv[1]
from hvlab.lab.runs import VmLocks
from hvlab.lab.paths import Names
with VmLocks(Names("lk"), ["vm01"]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_vm_held_by_another_process_is_refused(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HVLAB_HOME", str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        with pytest.raises(BadInput, match="VM vm01 is already in a running backup"), \
                VmLocks(Names("lk"), ["vm02", "vm01"]):
            pass
        with VmLocks(Names("lk"), ["vm02"]):  # the lock on vm02 was released on the error
            pass
    finally:
        proc.kill()
        proc.wait()
    with VmLocks(Names("lk"), ["vm01"]):  # a dead holder holds nothing
        pass
