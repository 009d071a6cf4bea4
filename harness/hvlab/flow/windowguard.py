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

from hvlab.guest.quiesce import MARKER
from hvlab.guest.supervise import thaw_if_dead

POLL_S = 0.1


class WindowGuards:
    """The guards of a run's open freeze windows, a process per VM. Owned by the run
    (flow/guards.py)."""

    def __init__(self) -> None:
        self._pids: dict[str, int] = {}  # VM -> guard pid

    def open(self, vm: str, run_dir: Path, seconds: float) -> None:
        """Guard VM's freeze window (its guest keeps its state in run_dir) for at most
        seconds."""
        self.close(vm)
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
        self._pids[vm] = pid

    def close(self, vm: str | None = None) -> None:
        """End the guard of vm (every guard of the run when None): its window closed."""
        for v in [vm] if vm else list(self._pids):
            pid = self._pids.pop(v, None)
            if pid is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)

    def vms(self) -> list[str]:
        return list(self._pids)


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
