"""Tests that drive the lab VM from the host (they cannot run inside it)."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hvlab_fixtures.plugin import requires


@pytest.fixture
def vm_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private VM directory and lab home on the host disk, apart from the user's."""
    requires("root", "uml", "not-in-vm")
    root = Path("/var/tmp") / f"hvlab-vmtest-{uuid.uuid4().hex[:8]}"
    root.mkdir(parents=True)
    monkeypatch.setenv("HVLAB_VM_DIR", str(root / "vm"))
    monkeypatch.setenv("HVLAB_HOME", str(root / "home"))
    monkeypatch.setenv("HVLAB_VM_MEM", "1G")
    yield root
    from hvlab.vm import control

    control.down()
    assert control.pid() is None, "lab VM still running after the test"
    shutil.rmtree(root, ignore_errors=True)
    leftovers = [p for p in Path("/var/tmp").glob("hvlab-vmtest-*") if p == root]
    assert not leftovers
    del os.environ["HVLAB_HOME"]
