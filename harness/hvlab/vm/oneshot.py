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

import psutil

from hvlab.errors import HvlabError
from hvlab.vm import boot, pin, uml
from hvlab.vm.uml import VmPaths


def reap_orphans() -> list[int]:
    """Kill one-shot VMs whose hvlab process is gone (a SIGKILL leaves UML's helper processes
    behind, PDEATHSIG reaches only the main one). Their umid names the owner: eph-<pid>-<id>."""
    reaped = []
    for p in psutil.process_iter(["cmdline", "create_time"]):
        umid = next((a[5:] for a in p.info["cmdline"] or [] if a.startswith("umid=eph-")), None)
        m = re.fullmatch(r"eph-(\d+)-[0-9a-f]+", umid or "")
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
    root = uml.vm_root() / f"eph-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    paths = VmPaths(root)
    root.mkdir(parents=True, exist_ok=True)
    try:
        uml.prepare(paths)
        # The console is a tty: stop it from turning \n into \r\n on our output.
        workload = ["sh", "-c", 'stty -onlcr 2>/dev/null; exec "$@"', "hvlab-run", *argv]
        paths.init.write_text(uml.init_script(paths, workload, boot.guest_env()))
        paths.init.chmod(0o755)
        stdin = sys.stdin if sys.stdin and not sys.stdin.closed else None
        cmd = boot.cmdline(paths, root.name, mem, "con0=fd:0,fd:1", quiet=True)
        env = boot.uml_env(paths)
        try:
            with pin.starting() as cpu:
                proc = subprocess.Popen(cmd, stdin=stdin or subprocess.DEVNULL,
                                        stdout=sys.stdout.fileno(), stderr=subprocess.DEVNULL,
                                        start_new_session=True, env=env,
                                        preexec_fn=lambda: boot.in_child(cpu, die_with_parent=True))
        except OSError as exc:
            raise HvlabError(f"cannot start the lab VM: {exc}") from None
        # A one-shot VM never outlives its command: Ctrl-C, SIGTERM (a CI timeout) and SIGHUP
        # halt it; a SIGKILL of this process reaches it through PDEATHSIG.
        old = {s: signal.signal(s, boot.interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
        try:
            proc.wait()
        except KeyboardInterrupt:
            boot.halt(root.name, paths, proc.pid, timeout=5.0)
            raise
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
        rc_file = root / "rc"
        if not rc_file.exists():
            if not (root / "started").exists():
                raise HvlabError(boot.diagnose(mem))  # it never reached the command
            raise HvlabError(f"the lab VM stopped before the command finished "
                             f"(uml exit {proc.returncode})")
        return int(rc_file.read_text().strip() or "1")
    finally:
        shutil.rmtree(root, ignore_errors=True)
