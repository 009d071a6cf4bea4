"""`hvlab doctor`: probe (never assume) what this machine can do."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from hvlab.lab.paths import home
from hvlab.sys.run import run
from hvlab.vm import runner, uml


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


def render(items: list[Check]) -> bool:
    table = Table(title="hvlab doctor")
    for col in ("check", "ok", "detail", "how to fix"):
        table.add_column(col)
    for c in items:
        mark = "[green]yes[/]" if c.ok else ("[red]NO[/]" if c.required else "[yellow]no[/]")
        table.add_row(c.name, mark, c.detail, "" if c.ok else c.fix)
    Console().print(table)
    return all(c.ok or not c.required for c in items)
