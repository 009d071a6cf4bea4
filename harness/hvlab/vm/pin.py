"""One host CPU per lab VM.

user-mode-linux runs each guest process as a host process traced by the UML kernel process:
every guest system call and page fault is a ptrace round trip between the two. When they sit
on different CPUs each round trip is a cross-CPU wake-up, and on a virtual machine (these
hosts are one) that is a VM exit. Pinned to one CPU, the same work ran 2x faster in the lab VM
(two kill tests, 65.9 s -> 33.1 s). UML uses one CPU anyway, so nothing is lost by pinning.

A VM about to start takes the CPU with the fewest lab VMs on it, under a lock, so VMs started
side by side (`make test`'s shards) spread over the CPUs. HVLAB_VM_CPU=N picks CPU N,
HVLAB_VM_CPU=none leaves the VM to the host's scheduler.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psutil

from hvlab.errors import BadInput, HvlabError
from hvlab.sys import private
from hvlab.vm import uml

ENV = "HVLAB_VM_CPU"
# One lock for every VM directory (HVLAB_VM_DIR): the CPUs are the machine's.
LOCK = Path("/run/hvlab/vm-cpu.lock")
LOCK_WAIT_S = 60.0


def allowed() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def _wanted(cpus: list[int]) -> int | str | None:
    """What HVLAB_VM_CPU asks for: a CPU, None (no pinning), or "" (choose)."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return ""
    if raw == "none":
        return None
    if raw.isdigit() and int(raw) in cpus:
        return int(raw)
    raise BadInput(f"{ENV}={raw!r}: expected a CPU this process may use "
                   f"({', '.join(map(str, cpus))}) or none")


def check_env() -> None:
    """Refuse a bad HVLAB_VM_CPU (one line, naming the value and what is allowed)."""
    _wanted(allowed())


def vms_per_cpu() -> Counter[int]:
    """Lab VMs (by umid) pinned to each CPU: UML's processes of one VM share its command line."""
    seen: dict[str, int] = {}
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if not cmd or not cmd[0].endswith(os.path.basename(uml.UML)):
            continue
        umid = next((a for a in cmd if a.startswith("umid=")), "")
        with contextlib.suppress(psutil.Error):
            cpus = p.cpu_affinity() or []
            if umid and len(cpus) == 1:
                seen.setdefault(umid, cpus[0])
    return Counter(seen.values())


def choose(cpus: list[int], busy: Counter[int]) -> int:
    """The CPU with the fewest lab VMs, the lowest on a tie."""
    return min(cpus, key=lambda c: (busy[c], c))


@contextlib.contextmanager
def starting() -> Iterator[int | None]:
    """The CPU for a VM to start inside the block (None: do not pin). The choice is locked
    until the block ends, so start the VM inside it: the next one then sees it."""
    cpus = allowed()
    wanted = _wanted(cpus)
    if wanted != "":
        yield wanted if isinstance(wanted, int) else None
        return
    LOCK.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(LOCK, "a") as lock:
        try:  # held only while a VM process is spawned: a stuck holder is an error
            private.flock_within(lock.fileno(), LOCK_WAIT_S)
        except TimeoutError:
            raise HvlabError(f"{LOCK} is held for over {LOCK_WAIT_S:g} s by another "
                             f"command starting a lab VM") from None
        yield choose(cpus, vms_per_cpu())


def apply(cpu: int | None) -> None:
    """In the child before exec: run on `cpu` only (UML's helpers inherit it)."""
    if cpu is not None:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {cpu})
