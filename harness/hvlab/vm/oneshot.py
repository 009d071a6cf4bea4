"""One-shot lab VMs: boot, run one command with the console on our stdio, power off."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import psutil

from hvlab.errors import HvlabError
from hvlab.vm import boot, bootlog, pin, uml
from hvlab.vm.uml import VmPaths


def reap_orphans() -> list[int]:
    """Kill one-shot VMs whose hvlab process is gone (a SIGKILL leaves UML's helper processes
    behind, PDEATHSIG reaches only the main one). Their umid names the owner:
    eph-<pid>-<id> (a command's VM) or diag-<pid>-<id> (a diagnosis boot)."""
    reaped = []
    for p in psutil.process_iter(["cmdline", "create_time"]):
        umid = next((a[5:] for a in p.info["cmdline"] or []
                     if a.startswith(("umid=eph-", "umid=diag-"))), None)
        m = re.fullmatch(r"(?:eph|diag)-(\d+)-[0-9a-f]+", umid or "")
        if not m:
            continue
        try:
            owner = psutil.Process(int(m.group(1)))
            if owner.create_time() <= p.info["create_time"] and owner.is_running():
                continue  # its hvlab process is alive
        except psutil.Error:
            pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(os.getpgid(p.pid), signal.SIGKILL)
            reaped.append(p.pid)
        shutil.rmtree(uml.vm_root() / str(umid), ignore_errors=True)
    return reaped


def run_ephemeral(argv: list[str], *, mem: str = boot.DEFAULT_MEM) -> int:
    """Boot a fresh VM, run argv as root inside with the console on our stdio, power off."""
    boot.require()
    reap_orphans()
    # The console is a tty: stop it from turning \n into \r\n on our output.
    workload = ["sh", "-c", 'stty -onlcr 2>/dev/null; exec "$@"', "hvlab-run", *argv]
    stdin = sys.stdin if sys.stdin and not sys.stdin.closed else None
    with _vm("eph") as paths:
        code = _boot_once(paths, workload, mem, console="con0=fd:0,fd:1", quiet=True,
                          stdin=stdin, stdout=sys.stdout.fileno())
        rc_file = paths.root / "rc"
        if not rc_file.exists():
            if not (paths.root / "started").exists():
                raise HvlabError(diagnose(mem))  # it never reached the command
            raise HvlabError(f"the lab VM stopped before the command finished "
                             f"(uml exit {code})")
        return int(rc_file.read_text().strip() or "1")


def diagnose(mem: str = boot.DEFAULT_MEM) -> str:
    """A one-shot VM that never reached its command: boot once more with the kernel's errors
    kept in a log (a one-shot VM's console is the user's terminal, so it boots quiet), and
    say why in one line. The log stays in the lab VM directory."""
    log_path = uml.vm_root() / "failed-boot.log"
    with _vm("diag") as paths, open(log_path, "wb") as log:
        _boot_once(paths, ["true"], mem, console="con0=null,fd:1", quiet=False,
                   stdin=None, stdout=log.fileno(), timeout=60.0)
        if (paths.root / "rc").exists():
            return ("the lab VM stopped before the command started, and a second boot came "
                    f"up: see {log_path}")
    return bootlog.failure(boot.read(log_path), str(log_path))


@contextlib.contextmanager
def _vm(kind: str) -> Iterator[VmPaths]:
    """A one-shot VM's folder, named by its owner (reap_orphans reads the owner back), and
    removed when the VM is done."""
    root = uml.vm_root() / f"{kind}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    paths = VmPaths(root)
    root.mkdir(parents=True, exist_ok=True)
    try:
        uml.prepare(paths)
        yield paths
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _boot_once(paths: VmPaths, workload: list[str], mem: str, *, console: str, quiet: bool,
               stdin: Any, stdout: int, timeout: float | None = None) -> int | None:
    """Boot, run workload as PID 1's command, wait for the power-off; the VM's exit code. It
    never outlives us: Ctrl-C, SIGTERM (a CI timeout) and SIGHUP halt it, and a SIGKILL of
    this process reaches it through PDEATHSIG."""
    paths.init.write_text(uml.init_script(paths, workload, boot.guest_env()))
    paths.init.chmod(0o755)
    cmd = boot.cmdline(paths, paths.root.name, mem, console, quiet=quiet)
    env = boot.uml_env(paths)
    try:
        with pin.starting() as cpu:
            proc = subprocess.Popen(cmd, stdin=stdin or subprocess.DEVNULL, stdout=stdout,
                                    stderr=subprocess.STDOUT if not quiet else subprocess.DEVNULL,
                                    start_new_session=True, env=env,
                                    preexec_fn=lambda: boot.in_child(cpu, die_with_parent=True))
    except OSError as exc:
        raise HvlabError(f"cannot start the lab VM: {exc}") from None
    old = {s: signal.signal(s, boot.interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        boot.halt(paths.root.name, paths, proc.pid, timeout=5.0)
        return None
    except KeyboardInterrupt:
        boot.halt(paths.root.name, paths, proc.pid, timeout=5.0)
        raise
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
