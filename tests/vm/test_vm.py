"""The lab VM from the host: one-shot runs, a persistent VM, a real restart, the shell."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.vm


def hvlab(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=os.environ, stdin=subprocess.DEVNULL)


def test_one_shot_vm_passes_output_and_exit_status(vm_env: Path) -> None:
    res = hvlab("vm", "run", "--ephemeral", "--", "sh", "-c",
                "uname -r; test -e /dev/mapper/control && echo dm; exit 7")
    assert res.returncode == 7
    lines = res.stdout.splitlines()
    assert lines[0].startswith("6.1.") and "dm" in lines
    assert "\r" not in res.stdout


def test_persistent_vm_survives_a_real_restart_with_lab_data(vm_env: Path) -> None:
    assert hvlab("vm", "up").returncode == 0
    assert hvlab("vm", "up").returncode != 0  # already running: a clear refusal
    # Lab commands on this host (no dm) are forwarded into the VM transparently.
    res = hvlab("up", "-n", "vmt", "--no-guests")
    assert res.returncode == 0, res.stderr
    mnt = vm_env / "home" / "vmt" / "mnt" / "vm01" / "disk0"
    res = hvlab("vm", "run", "--", "sh", "-c", f"echo survived > {mnt}/f.txt && sync")
    assert res.returncode == 0, res.stderr
    tree = hvlab("devices", "-n", "vmt")
    assert tree.returncode == 0 and "thin pool" in tree.stdout, tree.stderr
    # Power the VM off with the lab up: loops and dm devices vanish, as in a host reboot.
    assert hvlab("vm", "down").returncode == 0
    assert hvlab("vm", "up").returncode == 0
    res = hvlab("up", "-n", "vmt", "--no-guests")
    assert res.returncode == 0 and "data kept" in res.stdout, res.stdout + res.stderr
    res = hvlab("vm", "run", "--", "cat", f"{mnt}/f.txt")
    assert res.stdout.strip() == "survived"
    res = hvlab("down", "-n", "vmt")
    assert res.returncode == 0, res.stderr
    res = hvlab("vm", "run", "--", "sh", "-c", "losetup -l -n; dmsetup ls")
    assert "hvlab_vmt" not in res.stdout and "vmt" not in res.stdout


def test_shell_attaches_to_a_root_shell_in_the_vm(vm_env: Path) -> None:
    assert hvlab("vm", "up").returncode == 0
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(sys.executable, [sys.executable, "-m", "harness.cli", "vm", "shell"])
    seen = b""
    deadline = time.monotonic() + 30
    sent = False
    try:
        while time.monotonic() < deadline and b"hvlab-vm-says-42" not in seen:
            r, _, _ = select.select([fd], [], [], 0.5)
            if r:
                try:
                    seen += os.read(fd, 4096)
                except OSError:
                    break
            if not sent and b"attached" in seen:
                time.sleep(1)
                os.write(fd, b"echo hvlab-vm-says-$((6*7)) $(id -u) $(uname -r)\r")
                sent = True
        assert b"hvlab-vm-says-42 0 6.1." in seen, seen[-500:]
    finally:
        os.write(fd, b"\x1d")  # Ctrl-] detaches
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
