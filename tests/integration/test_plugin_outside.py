"""The pytest plugin used as another project would: from a directory outside the repository,
through the installed entry point, with nothing of hvlab's test tree around it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hvlab.fixtures.plugin import requires
from hvlab.sys import dm, loop

pytestmark = pytest.mark.integration

OTHER_TEST = '''
from hvlab.sys.lvm import Lvm


def test_thin_snapshot_of_a_disk(lab):
    lvm = Lvm(lab.names.lvm_dir)
    origin = f"{lab.names.vg}/{lab.names.lv('vm01', 'disk0')}"
    lvm("lvcreate", "-q", "-s", "-kn", "-n", "mysnap", origin)
    assert "mysnap" in lab.lv_names()
    print("LAB", lab.names.lab)
'''


def test_plugin_from_another_project(tmp_path: Path) -> None:
    requires("root", "loop", "dm-thin")
    proj = tmp_path / "otherproject"
    proj.mkdir()
    (proj / "test_other.py").write_text(OTHER_TEST)
    home = tmp_path / "home"
    before = {d.name for d in dm.list_devices()}
    env = {k: v for k, v in os.environ.items() if k not in ("HVLAB_HOME", "PYTEST_ADDOPTS")}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                          str(proj)], cwd=proj, capture_output=True, text=True, timeout=600,
                         env={**env, "HVLAB_TEST_HOME": str(home)})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 passed" in res.stdout
    lab = res.stdout.split("LAB ", 1)[1].split()[0]
    # The plugin tore the lab down, snapshot included: no loop, no dm device, no mount left.
    assert not loop.loops_under(home)
    assert {d.name for d in dm.list_devices()} <= before
    assert not any(lab in line for line in Path("/proc/mounts").read_text().splitlines())
