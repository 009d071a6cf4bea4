"""The lab VM's FP state on hosts whose XSAVE area differs from UML's buffer (AMX hosts).

Debian 12's user-mode-linux switches a guest task's FP/vector state with ptrace's
NT_X86_XSTATE regset through a buffer fixed at build time (UML_BYTES). The host kernel's
SETREGSET trims a larger buffer but refuses a smaller one (EFAULT), so on a host whose size is
larger (11008 bytes with AMX tile data) UML panics at its first user process. xstate_shim.c,
preloaded into linux.uml alone, widens that one call; docs/lab-vm.md says why this fix.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import shutil
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from hvlab.errors import HvlabError
from hvlab.sys import private
from hvlab.sys.run import run

SOURCE = Path(__file__).with_name("xstate_shim.c")
# Debian 12's linux.uml (6.1um) passes this many bytes (strace: iov_len=2696): x87 through
# AVX-512 and PKRU. A host without AMX but with AVX-512 has the same size.
UML_BYTES = 2696


ACTIONS = ("pass", "widen")


def decide(uml_bytes: int, host_bytes: int) -> str:
    """What the shim does with UML's SETREGSET: the same rule as hvlab_xstate_decide(). A
    buffer as large as the host's or larger passes (the kernel trims it); a smaller one is
    widened. An unknown host size (0) passes."""
    return "widen" if host_bytes > 0 and uml_bytes < host_bytes else "pass"


def needed() -> bool:
    """The shim is for x86-64 hosts only (the regset is x86's)."""
    return platform.machine() == "x86_64"


def _ours(path: Path) -> bool:
    """A cached build is preloaded into root's linux.uml: only one we made, that nobody else
    could have changed, is used."""
    st = path.lstat()
    return (stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()
            and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def build(into: Path) -> Path:
    """Compile the shim once per source version (cached under `into`, a 0700 folder)."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    out = into / f"xstate-{digest}.so"
    if out.exists() or out.is_symlink():
        if _ours(out):
            return out
        out.unlink()  # not ours to trust: build it again
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise HvlabError("the lab VM needs a C compiler to build its ptrace shim "
                         "(harness/vm/xstate_shim.c): run `make deps` (apt-get install gcc)")
    private.make_dirs(into)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    res = run([cc, "-O2", "-Wall", "-shared", "-fPIC", "-o", str(tmp), str(SOURCE), "-ldl"],
              check=False, noted=False)
    if res.returncode != 0:
        tmp.unlink(missing_ok=True)
        first = (res.stderr.strip().splitlines() or ["?"])[0]
        raise HvlabError(f"cannot build the lab VM's ptrace shim: {first}")
    tmp.chmod(0o755)
    os.replace(tmp, out)
    return out


def preload(shim: Path | None, report: Path, env: Mapping[str, str]) -> dict[str, str]:
    """The environment linux.uml starts with: env, the shim first in LD_PRELOAD (None: no
    shim) and where it says what it did. The last boot's report goes either way."""
    report.unlink(missing_ok=True)
    out = dict(env)
    if shim is None or not needed():
        return out
    out["LD_PRELOAD"] = " ".join(p for p in (str(shim), env.get("LD_PRELOAD", "")) if p)
    out["HVLAB_XSTATE_REPORT"] = str(report)
    return out


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
        how = {"pass": "UML's buffer is large enough: ptrace passes through unchanged",
               "widen": "the shim widens UML's SETREGSET to the host's size"}[self.action]
        src = "seen at the last boot" if self.seen else "Debian 12's UML"
        return (f"host XSAVE {self.host_bytes} bytes, UML {self.uml_bytes} ({src}): {how}")


def fit(shim_dir: Path, report: Path) -> Fit:
    host = host_bytes(build(shim_dir))
    try:
        seen = json.loads(report.read_text())
        if seen["action"] in ACTIONS:
            return Fit(host, int(seen["uml_bytes"]), str(seen["action"]), True)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return Fit(host, UML_BYTES, decide(UML_BYTES, host), False)
