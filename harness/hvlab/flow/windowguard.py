"""A watchdog for a freeze window whose guest died.

The guest's own watchdog thaws its filesystems at the flush-and-hold limit, but only while the
guest process lives. Killed while frozen (kill -9, a crash), it leaves them frozen (in the lab
they are the host's; in Hyper-V they would die with the VM) until a command thaws them from
the freeze marker the guest left. So while a VM's window is open the backup forks a guard for
it: the guard thaws from the marker as soon as the guest is gone, whether the backup still
runs, hangs or died too. It ends when the window closes (the guest thawed, or the backup ended
the window) or at its deadline (by then a live guest has thawed itself). A fork, not a new
program: it costs milliseconds (half a second to start Python in the lab VM).
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import time
from pathlib import Path

from hvlab.flow.context import Ctx
from hvlab.guest.client import GuestError
from hvlab.guest.quiesce import MARKER, recover_after_crash
from hvlab.guest.supervise import thaw_if_dead

POLL_S = 0.1
_guards: dict[str, int] = {}  # VM -> guard pid, of the windows this process opened


def open_window(vm: str, run_dir: Path, seconds: float) -> None:
    """Guard VM's freeze window (its guest keeps its state in run_dir) for at most seconds."""
    close(vm)
    gc.freeze()  # the collector then leaves our objects alone: fewer copy-on-write faults
    pid = os.fork()
    if pid == 0:  # the guard: never returns into the caller's code
        code = 0
        try:
            os.setsid()  # outlives a signal to the backup's process group
            _detach()
            _watch(run_dir, time.monotonic() + seconds)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    _guards[vm] = pid


def close(vm: str | None = None) -> None:
    """End the guard of vm (every guard of this process when None): its window closed."""
    for v in [vm] if vm else list(_guards):
        pid = _guards.pop(v, None)
        if pid is None:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def thaw(ctx: Ctx, vm: str) -> list[str]:
    """Close VM's window any way there is: the guest's abort, else (a dead or hung guest)
    from the freeze marker it left; then its guard ends. Safe to call any time."""
    notes = []
    if ctx.vm(vm).answers:
        try:
            if ctx.client(vm).abort().get("thawed"):
                notes.append(f"{vm}: thawed by abort")
        except GuestError as exc:
            notes.append(f"{vm}: abort: {exc}")
    rec = recover_after_crash(ctx.names.guest_dir(vm))
    if rec.get("thawed"):
        notes.append(f"{vm}: recovered freeze marker, thawed {rec['thawed']}")
    close(vm)
    ctx.vm(vm).frozen = False
    return notes


def _detach() -> None:
    """Hold nothing of the backup's: not its output pipes (whoever reads them would wait for
    the guard), not its locks (a VM lock fd shared with the guard outlives the backup)."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.closerange(3, 65536)


def _watch(run_dir: Path, deadline: float) -> None:
    frozen = False
    while time.monotonic() < deadline:
        if (run_dir / MARKER).exists():
            frozen = True
        elif frozen:
            return  # thawed by the guest (its thaw or its watchdog) or by another command
        with contextlib.suppress(Exception):  # a thaw that failed is tried again
            if thaw_if_dead(run_dir):
                return
        time.sleep(POLL_S)
