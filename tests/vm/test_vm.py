"""The lab VM from the host: one-shot runs, a persistent VM, a real restart, the shell."""

from __future__ import annotations

import contextlib
import os
import pty
import select
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from hvlab_fixtures.plugin import lab_toml, one_vm_lab

pytestmark = pytest.mark.vm


def hvlab(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hvlab.cli", *args], capture_output=True,
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
        os.execv(sys.executable, [sys.executable, "-m", "hvlab.cli", "vm", "shell"])
    seen = b""
    deadline = time.monotonic() + 120  # a hang guard: a loaded machine is slow
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


def _uml_of(owner: int) -> list[int]:
    import psutil

    tag = f"umid=eph-{owner}-"
    return [p.pid for p in psutil.process_iter(["cmdline"])
            if any(a.startswith(tag) for a in p.info["cmdline"] or [])]


def _wait(pred: Any, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_one_shot_vm_never_outlives_its_command(vm_env: Path, sig: int) -> None:
    """SIGTERM (a CI timeout) halts the VM at once; after a SIGKILL the helpers PDEATHSIG
    cannot reach are reaped by the next one-shot run."""
    proc = subprocess.Popen([sys.executable, "-m", "hvlab.cli", "vm", "run", "--ephemeral",
                             "--", "sleep", "600"], env=os.environ, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _wait(lambda: len(_uml_of(proc.pid)) > 0), "the VM did not start"
    finally:
        proc.send_signal(sig)
        proc.wait(60)
    if sig == signal.SIGKILL:
        assert hvlab("vm", "run", "--ephemeral", "--", "true").returncode == 0
    assert _wait(lambda: not _uml_of(proc.pid), 30), "VM processes outlived their command"


def _affinities(owner: int) -> set[tuple[int, ...]]:
    import psutil

    found = set()
    for pid in _uml_of(owner):
        with contextlib.suppress(psutil.Error):
            found.add(tuple(psutil.Process(pid).cpu_affinity()))
    return found


def test_one_shot_vms_side_by_side_get_a_cpu_each(vm_env: Path) -> None:
    """Every process of a lab VM runs on one CPU (vm/pin.py: UML's ptrace round trips are
    2x cheaper there); two VMs started together take the two least busy CPUs;
    HVLAB_VM_CPU=none leaves a VM to the scheduler, and a bad value is one line, exit 2."""
    from hvlab.vm import pin

    cpus = pin.allowed()
    busy = pin.vms_per_cpu()  # lab VMs of others (in CI: `make test`'s shards)

    def start(**env: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "hvlab.cli", "vm", "run", "--ephemeral",
                                 "--", "sleep", "600"], env={**os.environ, **env},
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)

    procs = [start(), start(), start(HVLAB_VM_CPU="none")]
    try:
        assert _wait(lambda: all(_uml_of(p.pid) for p in procs)), "a VM did not start"
        a, b, free = (_affinities(p.pid) for p in procs)
        assert len(a) == len(b) == 1 and len(next(iter(a))) == len(next(iter(b))) == 1, (a, b)
        (cpu_a,), (cpu_b,) = next(iter(a)), next(iter(b))
        # One after the other under pin's lock, each on the least busy CPU then (another lab
        # VM already running, say a soak's, can leave one CPU the least busy for both).
        first = pin.choose(cpus, busy)
        second = pin.choose(cpus, busy + Counter([first]))
        assert sorted([cpu_a, cpu_b]) == sorted([first, second]), (busy, cpu_a, cpu_b)
        assert free == {tuple(cpus)}
    finally:
        for p in procs:
            p.terminate()
            p.wait(60)
    res = subprocess.run([sys.executable, "-m", "hvlab.cli", "vm", "run", "--ephemeral", "--",
                          "true"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "HVLAB_VM_CPU": "4096"}, stdin=subprocess.DEVNULL)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "HVLAB_VM_CPU='4096'" in res.stderr and "Traceback" not in res.stderr


TINY_LAB = lab_toml(one_vm_lab(name="race", profile="none", backing="256M", size="32M"))


def test_commands_that_race_a_booting_vm_share_it(vm_env: Path) -> None:
    """A forwarded `hvlab up` boots the lab VM; a second one and a `vm up` arrive while it
    boots. Before the boot was serialised, the late ones saw a live pid without `ready`, asked
    that VM to shut down and halted it under the first command 30 s later."""
    from hvlab.vm import control

    lab_file = vm_env / "race.toml"
    lab_file.write_text(TINY_LAB)

    def start(*args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "hvlab.cli", *args], env=os.environ,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    first = start("up", "-n", "racea", "--lab", str(lab_file), "--no-guests")
    procs = [first]
    try:
        assert _wait(lambda: control.pid() is not None, 60), "the first command booted no VM"
        vm_pid = control.pid()
        assert not control.is_up(), "booted too fast: no race to test"
        procs += [start("up", "-n", "raceb", "--lab", str(lab_file), "--no-guests"),
                  start("vm", "up")]
        results = [(p.args, *p.communicate(timeout=300), p.returncode) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    failed = [r for r in results if r[3] != 0]
    assert not failed, failed
    # One VM served all three: the one the first command booted, still up; one process tree.
    assert control.is_up() and control.pid() == vm_pid
    sessions = set()
    for vm_proc in control._uml_processes(control.persistent_paths()):
        with contextlib.suppress(ProcessLookupError):  # UML's helpers come and go
            sessions.add(os.getsid(vm_proc.pid))
    assert sessions == {vm_pid}
    for lab in ("racea", "raceb"):
        res = hvlab("down", "-n", lab)
        assert res.returncode == 0, res.stderr
    # A command that finds the VM running (not booting) is still refused.
    assert hvlab("vm", "up").returncode != 0
