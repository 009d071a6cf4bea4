"""The pytest plugin used as another project would: from a directory outside the repository,
through the installed entry point, with nothing of hvlab's test tree around it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hvlab.sys import dm, loop
from hvlab_fixtures.plugin import requires

pytestmark = pytest.mark.integration

OTHER_TEST = '''
from hvlab.sys.lvm import Lvm


def test_thin_snapshot_of_a_disk(lab):
    lvm = lab.names.lvm()
    origin = f"{lab.names.vg}/{lab.names.lv('vm01', 'disk0')}"
    lvm("lvcreate", "-q", "-s", "-kn", "-n", "mysnap", origin)
    assert "mysnap" in lab.lv_names()
    lab.expect_extra(lvs=["mysnap"])  # left on purpose: the plugin removes it with the lab
    print("LAB", lab.names.lab)
'''

LEAKY_TEST = '''
from hvlab.sys.lvm import Lvm


def test_leaves_snapshots_behind(lab):
    lvm = lab.names.lvm()
    origin = f"{lab.names.vg}/{lab.names.lv('vm01', 'disk0')}"
    lvm("lvcreate", "-q", "-s", "-kn", "-n", "mysnap", origin)
    lvm("lvcreate", "-q", "-s", "-kn", "-n", "vm01_disk0_c_rfake",
        "--addtag", "role_checkpoint", origin)
    print("LAB", lab.names.lab)
'''


def _inner_pytest(tmp_path: Path, test_text: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Run test_text as another project's test file, with a private HVLAB_HOME."""
    proj = tmp_path / "otherproject"
    proj.mkdir()
    (proj / "test_other.py").write_text(test_text)
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k not in ("HVLAB_HOME", "PYTEST_ADDOPTS")}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                          str(proj)], cwd=proj, capture_output=True, text=True, timeout=600,
                         env={**env, "HVLAB_TEST_HOME": str(home)})
    return res, home


def _nothing_left(res: subprocess.CompletedProcess[str], home: Path, before: set[str]) -> None:
    lab = res.stdout.split("LAB ", 1)[1].split()[0]
    assert not loop.loops_under(home)
    assert {d.name for d in dm.list_devices()} <= before
    assert not any(lab in line for line in Path("/proc/mounts").read_text().splitlines())


def test_plugin_from_another_project(tmp_path: Path) -> None:
    requires("root", "loop", "dm-thin")
    before = {d.name for d in dm.list_devices()}
    res, home = _inner_pytest(tmp_path, OTHER_TEST)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 passed" in res.stdout
    # The plugin tore the lab down, snapshot included: no loop, no dm device, no mount left.
    _nothing_left(res, home, before)


def test_a_test_that_leaves_snapshots_fails_and_its_lab_is_removed(tmp_path: Path) -> None:
    """The check before teardown can fail: an undeclared snapshot and a backup checkpoint left
    by the test fail it (the test itself, not its teardown), each named; the lab goes anyway."""
    requires("root", "loop", "dm-thin")
    before = {d.name for d in dm.list_devices()}
    res, home = _inner_pytest(tmp_path, LEAKY_TEST)
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    summary = res.stdout.strip().splitlines()[-1]
    assert "1 failed" in summary and "error" not in summary, out
    assert "LV mysnap" in out, out
    assert "LV vm01_disk0_c_rfake (backup checkpoint (C))" in out, out
    assert "expect_extra" in out, out
    _nothing_left(res, home, before)
