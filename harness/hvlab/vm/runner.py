"""Where lab commands run: natively when this kernel has dm-thin and we are root, otherwise in
the lab VM. Callers never need to know which."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from hvlab.sys.run import run
from hvlab.vm import uml


def in_vm() -> bool:
    return os.environ.get("HVLAB_IN_VM") == "1"


def native_dm_thin() -> bool:
    """Is dm-thin usable on this kernel now (loaded, built in, or loadable)?"""
    if not Path("/dev/mapper/control").exists():
        return False
    if not shutil.which("dmsetup"):
        return False  # the tools are missing, not the kernel: `hvlab doctor` says so
    res = run(["dmsetup", "targets"], check=False)
    if "thin-pool" in res.stdout:
        return True
    if not shutil.which("modprobe"):
        return False
    return run(["modprobe", "dm-thin-pool"], check=False).returncode == 0


def choose() -> str:
    """'native' or 'uml' (or 'none' with no way to run a lab)."""
    if in_vm() or (os.geteuid() == 0 and native_dm_thin()):
        return "native"
    if uml.available():
        return "uml"
    return "none"
