"""The Vagrant path and provision.sh: checked offline so they cannot rot (no box, no root)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from hvlab_fixtures.plugin import requires

REPO = Path(__file__).resolve().parents[2]


def _vagrant(tmp_path: Path, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    # A private VAGRANT_HOME and dotfile dir: nothing of ours in ~/.vagrant.d or the checkout.
    env = dict(os.environ, VAGRANT_HOME=str(tmp_path / "home"),
               VAGRANT_DOTFILE_PATH=str(tmp_path / "dot"), VAGRANT_CWD=str(cwd))
    return subprocess.run(["vagrant", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=180, stdin=subprocess.DEVNULL)


def test_vagrantfile_validates_for_both_machines(tmp_path: Path) -> None:
    requires("vagrant")  # in CI a missing vagrant fails (.ci/run installs it)
    res = _vagrant(tmp_path, "validate", "--ignore-provider")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "default:" in res.stdout and "noble:" in res.stdout, res.stdout


def test_vagrant_validate_catches_a_broken_vagrantfile(tmp_path: Path) -> None:
    """The check above means something: validate rejects a bad machine definition."""
    requires("vagrant")
    bad = tmp_path / "bad"
    bad.mkdir()
    text = (REPO / "Vagrantfile").read_text().replace('"hvlab-noble"', '"-not a hostname"')
    (bad / "Vagrantfile").write_text(text)
    res = _vagrant(tmp_path, "validate", "--ignore-provider", cwd=bad)
    assert res.returncode != 0 and "hostname" in res.stdout + res.stderr


def test_one_package_list_used_by_make_vagrant_and_ci() -> None:
    script = (REPO / "provision.sh").read_text()
    assert script.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in script
    assert subprocess.run(["bash", "-n", str(REPO / "provision.sh")]).returncode == 0
    makefile = (REPO / "Makefile").read_text()
    assert "apt-get" not in makefile and "provision.sh" in makefile
    assert "provision.sh" in (REPO / "Vagrantfile").read_text()
    dry = subprocess.run(["make", "-n", "-B", "deps"], cwd=REPO, capture_output=True, text=True)
    assert "provision.sh" in dry.stdout, dry.stdout + dry.stderr
