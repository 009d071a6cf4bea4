"""`hvlab doctor`: probe (never assume) what this machine can do."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from hvlab.console import console as make_console
from hvlab.errors import HvlabError
from hvlab.lab import probe
from hvlab.lab.paths import home
from hvlab.lab.probe import ProbeResult
from hvlab.sys.run import run
from hvlab.vm import runner, uml, xstate


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True


def _version(argv: list[str]) -> str:
    res = run(argv, check=False)
    text = (res.stdout or res.stderr).strip().splitlines()
    return text[0] if text else "?"


def checks() -> list[Check]:
    out = [Check("root", os.geteuid() == 0, f"euid {os.geteuid()}", "run as root")]
    out.append(Check("loop devices", os.path.exists("/dev/loop-control"),
                     "/dev/loop-control", "modprobe loop"))
    where = runner.choose()
    native = where == "native"
    out.append(Check("dm-thin on this kernel", native,
                     "yes" if native else f"no device-mapper in {os.uname().release}",
                     "the lab VM is used instead" if uml.available() else "apt-get install "
                     "user-mode-linux", required=False))
    out.append(Check("lab VM kernel (user-mode-linux)", uml.available(),
                     uml.kernel_release() or "missing", "make deps (user-mode-linux)",
                     required=not native))
    if uml.available() and xstate.needed():
        out.append(_fp_state(required=not native))
    tools = {"lvm": ["lvm", "version"], "dmsetup": ["dmsetup", "--version"],
             "losetup": ["losetup", "--version"], "fsfreeze": ["fsfreeze", "--version"],
             "thin_delta": ["thin_delta", "--version"], "mkfs.ext4": ["mkfs.ext4", "-V"],
             "mkfs.xfs": ["mkfs.xfs", "-V"],
             # uml_mconsole has no version flag (it would open a session): ask dpkg
             "uml_mconsole": ["dpkg-query", "-W", "-f", "uml-utilities ${Version}",
                              "uml-utilities"]}
    for name, argv in tools.items():
        have = shutil.which(name) is not None
        out.append(Check(name, have, _version(argv) if have else "missing", "make deps"))
    known = open("/proc/filesystems").read().split()
    for fstype in ("ext4", "xfs"):
        out.append(Check(f"{fstype} (fsfreeze-capable)", fstype in known,
                         "in /proc/filesystems" if fstype in known else "not in this kernel",
                         f"modprobe {fstype}", required=False))
    h = home()
    probe = h if h.exists() else h.parent
    free = shutil.disk_usage(probe).free
    out.append(Check("free space", free > (2 << 30), f"{free >> 30} GiB free under {probe}",
                     "free some space or set HVLAB_HOME"))
    out.append(Check("runner", where != "none", where,
                     "need root + dm-thin, or user-mode-linux"))
    return out


def _fp_state(*, required: bool) -> Check:
    """The host's XSAVE size against UML's FP buffer, and the fix in use (vm/xstate.py)."""
    from hvlab.vm import control

    name = "lab VM FP state (XSAVE)"
    if os.geteuid() != 0:
        return Check(name, False, "not tried: building the shim in the lab VM folder needs root",
                     "run as root", required=required)
    try:
        fit = xstate.fit(uml.shim_dir(), control.persistent_paths().xstate_report)
    except (HvlabError, OSError) as exc:
        return Check(name, False, str(exc), "make deps (gcc)", required=required)
    off = os.environ.get("HVLAB_XSTATE_SHIM") == "0"
    if off and fit.action != "pass":
        return Check(name, False, f"{fit.line}; but HVLAB_XSTATE_SHIM=0 turns the shim off",
                     "unset HVLAB_XSTATE_SHIM", required=required)
    return Check(name, True, fit.line, required=required)


def render(items: list[Check]) -> bool:
    table = Table(title="hvlab doctor")
    for col in ("check", "ok", "detail", "how to fix"):
        table.add_column(col)
    for c in items:
        mark = "[green]yes[/]" if c.ok else ("[red]NO[/]" if c.required else "[yellow]no[/]")
        table.add_row(c.name, mark, c.detail, "" if c.ok else c.fix)
    make_console().print(table)
    return all(c.ok or not c.required for c in items)


# ------------------------------------------------------------------------------ probes
def probe_in_lab_vm() -> list[ProbeResult]:
    """Both probes inside the lab VM (the persistent one if up, else a one-shot VM). The
    results come back through a file on the host's disk, which the VM shares (hostfs)."""
    from hvlab.vm import control, oneshot

    root = uml.vm_root()
    root.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="doctor-", suffix=".json", dir=root)
    os.close(fd)
    out = Path(name)
    argv = [sys.executable, "-m", "hvlab.cli", "doctor-probe", "--out", str(out)]
    try:
        sys.stdout.flush()  # a one-shot VM writes to our stdout's file descriptor directly
        rc = (control.run_in(argv, timeout=300) if control.is_up()
              else oneshot.run_ephemeral(argv))
        text = out.read_text()
        if rc != 0 or not text.strip():
            raise HvlabError(f"exit {rc}, no results")
        return probe.from_json(text)
    except (HvlabError, OSError, ValueError, TypeError, KeyError) as exc:
        return [ProbeResult("nesting", "unknown", f"the probe in the lab VM failed: {exc}",
                            uml.kernel_release(), True)]
    finally:
        out.unlink(missing_ok=True)


def probes(where: str) -> tuple[list[ProbeResult], list[str]]:
    """Real freeze and nesting probes: on this kernel (root and loop devices needed) and, when
    labs run in the lab VM, inside it too. Returns the results and notes on what was not tried."""
    if os.geteuid() != 0:
        return [], ["probes: not tried (they need root: loop devices, mounts)"]
    results: list[ProbeResult] = []
    notes: list[str] = []
    if os.path.exists("/dev/loop-control"):
        results += probe.run_here()
    else:
        notes.append("fsfreeze: not tried on this kernel (no loop devices)")
    if where == "uml":
        results += probe_in_lab_vm()
    elif not probe.dm_usable():
        notes.append("nesting: not tried (no device-mapper here and no lab VM)")
    return results, notes


def probes_ok(results: list[ProbeResult]) -> bool:
    """A freeze must work wherever it was tried; nesting is information. Nothing may leak."""
    return all(r.ok for r in results if r.name == "freeze") and not any(r.leaks for r in results)


def report_probes() -> bool:
    """Print the probe lines (plain text: no wrapping, easy to grep); True when all is well."""
    where = runner.choose()
    vm_note = " (here and in the lab VM)" if where == "uml" else ""
    print(f"probes on real devices{vm_note}; everything they make is removed:", flush=True)
    results, notes = probes(where)
    for line in [r.line() for r in results] + notes:
        print(f"  {line}")
    return probes_ok(results)
