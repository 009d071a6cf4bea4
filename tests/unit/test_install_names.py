"""hvlab installs two import packages, `hvlab` and its pytest plugin `hvlab_fixtures`: no
top-level `harness` or `fixtures` that would shadow other PyPI packages (`fixtures` is a widely
used test library)."""

from __future__ import annotations

import subprocess
import sys


def _probe(code: str) -> str:
    # From / : the repository is not on sys.path there, only what is installed.
    res = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True,
                         check=True, timeout=60)
    return res.stdout.strip()


def test_only_hvlab_and_its_plugin_are_installed() -> None:
    out = _probe("import importlib.util as u; print([n for n in ('harness', 'fixtures') "
                 "if u.find_spec(n)], bool(u.find_spec('hvlab_fixtures.plugin')))")
    assert out == "[] True"


def test_plugin_and_default_lab_come_from_the_package() -> None:
    out = _probe("from importlib.metadata import entry_points as e; "
                 "print([x.value for x in e(group='pytest11') if x.name == 'hvlab'])")
    assert out == "['hvlab_fixtures.plugin']"
    out = _probe("from hvlab.lab import definition; print(definition.load(None).name)")
    assert out == "hvlab"


def test_version() -> None:
    res = subprocess.run([sys.executable, "-m", "hvlab.cli", "--version"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.startswith("hvlab, version ")
