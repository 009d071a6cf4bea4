"""Starting a lab VM, shared by the persistent VM (control.py) and one-shot VMs (oneshot.py):
its command line, its environment (the ptrace shim), what the command inside sees, halting it,
and saying why a boot failed."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil

from hvlab.errors import BadInput, HvlabError
from hvlab.vm import pin, uml, xstate
from hvlab.vm.uml import VmPaths

PASS_ENV = ("CI", "HVLAB_HOME", "PYTEST_ADDOPTS", "COLUMNS", "LINES", "TERM", "NO_COLOR",
            "FORCE_COLOR", "HVLAB_TEST_HOME", "HVLAB_VERBOSE", "HVLAB_INJECT", "HVLAB_CMDLOG")
# Directories the lab VM mounts for itself: a path under them is not the host's file.
VM_PRIVATE = ("/proc", "/sys", "/dev", "/run")
DEFAULT_MEM = os.environ.get("HVLAB_VM_MEM", "2G")


def python() -> str:
    return sys.executable


def cmdline(paths: VmPaths, umid: str, mem: str, console: str, *, quiet: bool) -> list[str]:
    # A console that is a log keeps the kernel's errors (loglevel 4: err and worse), so a boot
    # that fails says why; one that is the user's terminal stays quiet.
    words = ["quiet", "loglevel=0"] if quiet else ["loglevel=4"]
    return [uml.UML, f"umid={umid}", f"mem={mem}", "root=/dev/root", "rootfstype=hostfs",
            "rootflags=/", "rw", *words,
            # No legacy BSD ptys: 512 fewer /dev nodes for every LVM command to scan.
            "pty.legacy_count=0",
            f"init={paths.init}", "con=null", console, f"uml_dir={paths.root}"]


def require() -> None:
    if not uml.available():
        raise HvlabError("the lab VM needs Debian's user-mode-linux kernel: "
                         "run `make deps` (apt-get install user-mode-linux)")
    if os.geteuid() != 0:
        raise HvlabError("the lab VM must be started as root (it attaches loop devices)")
    pin.check_env()  # a bad HVLAB_VM_CPU before anything is made


def uml_env(paths: VmPaths) -> dict[str, str]:
    """linux.uml's own environment: the host's, with the ptrace shim that fits UML's FP
    buffer to this host's XSAVE area (vm/xstate.py). HVLAB_XSTATE_SHIM=0 leaves it out;
    HVLAB_XSTATE_SHIM=FILE.so preloads that build instead (the tests' broken one)."""
    choice = os.environ.get("HVLAB_XSTATE_SHIM", "")
    if choice in ("", "0"):
        shim = None if choice == "0" or not xstate.needed() else xstate.build(uml.shim_dir())
    elif Path(choice).is_file():
        shim = Path(choice).resolve()
    else:
        raise BadInput(f"HVLAB_XSTATE_SHIM={choice}: no such file; allowed: 0 (no shim) or "
                       f"the path of a built shim (.so)")
    return xstate.preload(shim, paths.xstate_report, os.environ)


def guest_env() -> dict[str, str]:
    env = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
    return {**env, **terminal_env(env)}


def terminal_env(env: dict[str, str]) -> dict[str, str]:
    """Tell the command inside what our stdout is: inside, its output is a pipe (or the VM's
    console), never the user's terminal. Colours and live progress only for a terminal;
    pipes and files get plain text."""
    if not sys.stdout.isatty():
        return {"NO_COLOR": "1", "TERM": "dumb"}
    out = {"TERM": env.get("TERM", "xterm-256color")}
    if "NO_COLOR" not in env:
        out["FORCE_COLOR"] = "1"
    size = shutil.get_terminal_size()
    out.setdefault("COLUMNS", env.get("COLUMNS", str(size.columns)))
    out.setdefault("LINES", env.get("LINES", str(size.lines)))
    return out


def check_visible(path: Path) -> None:
    """A path the user names must be the same file inside the lab VM (hostfs shares all but
    the VM's own mounts)."""
    p = os.path.abspath(path)
    for d in VM_PRIVATE:
        if p == d or p.startswith(d + "/"):
            raise BadInput(f"path {path} is under {d}, which the lab VM does not share "
                           f"with this host: use a path elsewhere (e.g. /var/tmp or /tmp)")


def read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def in_child(cpu: int | None, *, die_with_parent: bool) -> None:
    """In the child before exec: its CPU (pin.py says why), and for a one-shot VM SIGKILL
    when the hvlab process that started it dies."""
    pin.apply(cpu)
    if die_with_parent:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGKILL)


def halt(umid: str, paths: VmPaths, p: int, timeout: float = 20.0) -> None:
    subprocess.run(["uml_mconsole", str(paths.root / umid / "mconsole"), "halt"],
                   capture_output=True, check=False, timeout=10)
    try:
        proc = psutil.Process(p)
        proc.wait(timeout=timeout)
    except psutil.TimeoutExpired:
        # UML runs as a process tree (one per VM process): end the whole session.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p, signal.SIGKILL)
    except psutil.Error:
        pass
