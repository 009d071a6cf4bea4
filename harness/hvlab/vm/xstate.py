"""The lab VM's FP state on hosts whose XSAVE area differs from UML's buffer (AMX hosts).

Debian 12's user-mode-linux switches a guest task's FP/vector state with ptrace's
NT_X86_XSTATE regset through a buffer fixed at build time (UML_BYTES). The host kernel's
SETREGSET takes exactly its own size (11008 bytes with AMX tile data), so on such a host UML
panics at its first user process. xstate_shim.c, preloaded into linux.uml alone, widens (or
trims) that one call; the README's "Where the lab runs" says why this fix and not another.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

from hvlab.errors import HvlabError
from hvlab.sys.run import run

SOURCE = Path(__file__).with_name("xstate_shim.c")
# Debian 12's linux.uml (6.1um) passes this many bytes (strace: iov_len=2696): x87 through
# AVX-512 and PKRU. A host without AMX but with AVX-512 has the same size.
UML_BYTES = 2696


def decide(uml_bytes: int, host_bytes: int) -> str:
    """What the shim does with UML's SETREGSET: the same rule as hvlab_xstate_decide()."""
    if host_bytes <= 0 or uml_bytes == host_bytes:
        return "pass"
    return "widen" if uml_bytes < host_bytes else "trim"


def needed() -> bool:
    """The shim is for x86-64 hosts only (the regset is x86's)."""
    return platform.machine() == "x86_64"


def build(into: Path) -> Path:
    """Compile the shim once per source version (cached under `into`)."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    out = into / f"xstate-{digest}.so"
    if out.exists():
        return out
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise HvlabError("the lab VM needs a C compiler to build its ptrace shim "
                         "(harness/vm/xstate_shim.c): run `make deps` (apt-get install gcc)")
    into.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    res = run([cc, "-O2", "-Wall", "-shared", "-fPIC", "-o", str(tmp), str(SOURCE), "-ldl"],
              check=False, noted=False)
    if res.returncode != 0:
        tmp.unlink(missing_ok=True)
        first = (res.stderr.strip().splitlines() or ["?"])[0]
        raise HvlabError(f"cannot build the lab VM's ptrace shim: {first}")
    os.replace(tmp, out)
    return out


def preload(shim_dir: Path, report: Path) -> dict[str, str]:
    """The environment linux.uml starts with: the shim, and where it says what it did."""
    if not needed():
        return {}
    report.unlink(missing_ok=True)
    return {"LD_PRELOAD": str(build(shim_dir)), "HVLAB_XSTATE_REPORT": str(report)}


def host_bytes(shim: Path) -> int:
    """The host kernel's NT_X86_XSTATE size, asked of a child stopped under ptrace."""
    lib = ctypes.CDLL(str(shim), mode=os.RTLD_LOCAL)
    lib.hvlab_xstate_host_size.restype = ctypes.c_long
    size = int(lib.hvlab_xstate_host_size())
    if size < 0:
        raise HvlabError(f"cannot ask the host kernel for its XSAVE size: "
                         f"{os.strerror(-size)}")
    return size


@dataclass(frozen=True)
class Fit:
    """What `hvlab doctor` says of the lab VM's FP state on this host."""

    host_bytes: int
    uml_bytes: int
    action: str
    seen: bool  # uml_bytes and action are from the shim's report of a boot, not assumed

    @property
    def line(self) -> str:
        how = {"pass": "sizes agree: ptrace passes through unchanged",
               "widen": "the shim widens UML's SETREGSET to the host's size",
               "trim": "the shim trims UML's SETREGSET to the host's size"}[self.action]
        src = "seen at the last boot" if self.seen else "Debian 12's UML"
        return (f"host XSAVE {self.host_bytes} bytes, UML {self.uml_bytes} ({src}): {how}")


def fit(shim_dir: Path, report: Path) -> Fit:
    host = host_bytes(build(shim_dir))
    try:
        seen = json.loads(report.read_text())
        return Fit(host, int(seen["uml_bytes"]), str(seen["action"]), True)
    except (OSError, ValueError, KeyError, TypeError):
        return Fit(host, UML_BYTES, decide(UML_BYTES, host), False)
