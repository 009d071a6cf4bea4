"""Paths mean what the user means, backups outlive the lab, output fits where it goes.

Driven from the host, where lab commands are forwarded into the lab VM: a relative path and a
path under the host's /tmp must name the same file inside the VM and out.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from hvlab_fixtures.plugin import lab_toml, one_vm_lab

pytestmark = pytest.mark.vm

LAB = lab_toml(one_vm_lab(name="pt", backing="1G"))
RUN_ID = re.compile(r"\br\d{14}[0-9a-f]{4}\b")


def test_tmp_and_relative_paths_backups_kept_plain_output(vm_env: Path) -> None:
    work = Path("/tmp") / f"hvlab-paths-{uuid.uuid4().hex[:8]}"  # the host's /tmp, on purpose
    work.mkdir()

    def hv(*args: str) -> subprocess.CompletedProcess[str]:
        # stdout is a pipe here: what `hvlab status | cat` sees
        return subprocess.run([sys.executable, "-m", "hvlab.cli", *args], cwd=work, text=True,
                              capture_output=True, timeout=600, stdin=subprocess.DEVNULL,
                              env={**os.environ, "TERM": "xterm-256color"})

    def ok(*args: str) -> str:
        res = hv(*args)
        assert res.returncode == 0, f"hvlab {' '.join(args)}: {res.stdout}\n{res.stderr}"
        assert "\x1b[" not in res.stdout + res.stderr, f"ANSI codes into a pipe: {args}"
        return res.stdout

    try:
        (work / "lab.toml").write_text(LAB)
        ok("up", "--lab", "lab.toml")  # relative, in a directory under /tmp
        assert "vm01" in ok("status", "-n", "pt")

        out = ok("backup", "vm01", "-n", "pt", "--dest", "bk")  # relative --dest
        first = RUN_ID.findall(out)[0]
        assert (work / "bk" / "manifest.json").is_file(), out
        out = ok("backup", "vm01", "-n", "pt")  # default --dest: outside the lab directory
        second = RUN_ID.findall(out)[0]
        kept = vm_env / "home" / "backups" / "pt" / second
        assert (kept / "manifest.json").is_file(), out

        out = ok("explain", first, "-n", "pt", "--svg", str(work / "run.svg"))
        assert (work / "run.svg").stat().st_size > 0 and str(work / "run.svg") in out

        bad = hv("backup", "vm01", "-n", "pt", "--dest", "/run/x")
        assert bad.returncode != 0 and "/run" in bad.stderr and len(bad.stderr.splitlines()) == 1

        out = ok("down", "-n", "pt")
        assert str(kept.parent) in out and "kept" in out, out
        assert (kept / "manifest.json").is_file()

        # With the lab VM down, a command runs in a one-shot VM whose console is a tty:
        # still plain text into our pipe.
        ok("vm", "down")
        ok("runs", "-n", "pt")

        ok("up", "--lab", "lab.toml")  # the lab again, new and empty
        assert "OK" in ok("verify", second, "-n", "pt")  # by run id, from the kept folder
        assert "OK" in ok("verify", "bk", "-n", "pt")  # by a relative directory
        out = ok("down", "-n", "pt", "--purge")
        assert not kept.parent.exists(), out
    finally:
        hv("down", "-n", "pt", "--purge")
        shutil.rmtree(work, ignore_errors=True)
