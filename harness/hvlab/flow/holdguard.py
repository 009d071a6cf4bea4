"""A watchdog for suspended devices.

While steps 5 and 6 hold a VM's controllers and origins suspended, every write of the guest
waits, and so does the guest's own thaw (ext4 writes its superblock on thaw). If the backup
process dies or hangs there, nothing else would resume them: the guest would stay stuck past
its 10 s watchdog. So a guard process resumes them at once when the backup dies, or at the
deadline when it hangs, and records what went live (C, if its table was loaded), so a restart
maps it.

One guard stands for the whole job (a HoldGuard, owned by the run): it is forked before the
first freeze request (`standby`) and armed for each VM's holds through a socket pair. A fork
of the backup costs 50-90 ms in the lab VM, a line on a socket microseconds. The socket also
tells the guard that the backup died (EOF; disarmed, it then just exits), and tells the
backup whether the guard fired: a disarm is answered, and a hold the guard already resumed
fails its step (the guest may have written past the checkpoint's instant). A guard that
fired has exited: the next VM's standby forks another.
"""

from __future__ import annotations

import contextlib
import gc
import os
import select
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from hvlab.errors import HvlabError
from hvlab.sys import dm

POLL_S = 0.05
IDLE_POLL_S = 1.0
REPLY_S = 5.0  # for the guard's answer to a disarm (it only has to be scheduled)


class GuardFired(HvlabError):
    """The guard resumed the held devices (the step overran its deadline, or the guard could
    not be told to stand down): what the step made may not be of one instant."""


@dataclass
class _Guard:
    pid: int
    sock: socket.socket  # our end; the guard holds the other


def _fork(after: Callable[[str], None]) -> _Guard:
    parent = os.getpid()
    ours, theirs = socket.socketpair()
    gc.freeze()  # the collector then leaves our objects alone: fewer copy-on-write faults
    pid = os.fork()
    if pid == 0:  # the guard: never returns into the caller's code
        code = 0
        try:
            gc.disable()  # a finaliser of an inherited object would close a reused fd number
            ours.close()
            _close_inherited(keep=theirs.fileno())
            os.setsid()  # a signal to the caller's process group does not end the guard
            _serve(theirs, parent, after)
        except BaseException:
            import traceback

            traceback.print_exc()  # to the caller's stderr: nothing else would say why
            code = 1
        finally:
            os._exit(code)
    theirs.close()
    return _Guard(pid, ours)


def _close_inherited(keep: int) -> None:
    """Hold nothing of the backup's but stdio, the socket and device-mapper's control node
    (its ioctls' open fd): not its VM locks (a guard outliving a killed backup by a moment
    would keep the VM locked for the next command), not other guards' sockets (their EOF is
    how they learn that the backup died)."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd <= 2 or fd == keep:
            continue
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "/dev/mapper/control":
                continue
        except OSError:
            continue  # listdir's own fd, closed by now
        with contextlib.suppress(OSError):
            os.close(fd)


def _end(g: _Guard) -> None:
    """Kill first: closing our end first would tell an armed guard that the backup died."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(g.pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(g.pid, 0)
    g.sock.close()


def _alive(g: _Guard) -> bool:
    try:
        return os.waitpid(g.pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return False


def _send(g: _Guard, line: str) -> bool:
    try:
        g.sock.sendall(line.encode() + b"\n")
    except OSError:
        return False  # the guard is gone (it fired at a deadline, or was killed)
    return True


def _stand_down(g: _Guard) -> bool:
    """Disarm; True when the guard confirms it had not fired."""
    if not _send(g, "disarm"):
        return False
    if not select.select([g.sock], [], [], REPLY_S)[0]:
        return False
    try:
        return g.sock.recv(64).startswith(b"disarmed")
    except OSError:
        return False


class HoldGuard:
    """The job's hold guard: a process standing (disarmed) for every VM's holds, or none.
    Owned by the run (flow/guards.py), which ends it when the run's steps end."""

    def __init__(self) -> None:
        self._standing: _Guard | None = None

    @property
    def pid(self) -> int | None:
        return self._standing.pid if self._standing else None

    def standby(self, after: Callable[[str], None]) -> None:
        """Have a guard standing, disarmed, so that arming it inside a window costs nothing:
        the job's, if it still runs; else one forked now. `after(vm)` runs in it once it
        resumed a VM's holds."""
        if self._standing is not None and _alive(self._standing):
            return
        self.close()
        self._standing = _fork(after)

    def close(self) -> None:
        """End the standing guard: the job's steps are over (or it fired)."""
        if self._standing is not None:
            g, self._standing = self._standing, None
            _end(g)

    @contextlib.contextmanager
    def guard(self, vm: str, devices: list[str], deadline_s: float,
              after: Callable[[str], None]) -> Iterator[None]:
        """Run the block with a guard that resumes `devices` (in the order given) if this
        process dies or the block takes longer than deadline_s; `after(vm)` runs in the guard
        once it resumed them. Uses the standing guard if there is one (which runs the `after`
        it was forked with), else forks one for the block. GuardFired when the guard resumed
        them before the block ended."""
        arm = "arm " + " ".join([f"{deadline_s:.3f}", vm, *devices])
        g = self._standing
        own = g is None or not _send(g, arm)
        if own:
            self.close()
            g = _fork(after)
            _send(g, arm)
        assert g is not None
        ok = False
        try:
            yield
            ok = True
        finally:
            stood_down = _stand_down(g)
            if own or not stood_down:
                _end(g)
                if self._standing is g:
                    self._standing = None
        if ok and not stood_down:
            raise GuardFired(f"the guard of {vm}'s held devices resumed them before the step "
                             f"ended (deadline {deadline_s:.2f} s): not a checkpoint of one "
                             f"instant")


def _serve(sock: socket.socket, parent: int, after: Callable[[str], None]) -> None:
    """Wait for lines: `arm SECONDS VM DEV...`, `disarm` (answered). EOF (the backup is gone)
    or the deadline while armed: say so, resume what is held, run `after(VM)`, exit. Lines
    already sent are read before the deadline is looked at: a disarm in time is never
    missed."""
    armed: list[str] = []
    vm = ""
    deadline = 0.0
    buf = b""
    while True:
        # disarmed, only a line or EOF matters (both wake the select): a slow poll, as it
        # stands beside the whole job
        wait = min(max(deadline - time.monotonic(), 0.0), POLL_S) if armed else IDLE_POLL_S
        if select.select([sock], [], [], wait)[0]:
            chunk = sock.recv(4096)
            if not chunk:
                break  # the backup closed its end or died
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                words = line.decode().split()
                if words[:1] == ["arm"]:
                    deadline, vm, armed = time.monotonic() + float(words[1]), words[2], words[3:]
                elif words[:1] == ["disarm"]:
                    armed = []
                    sock.sendall(b"disarmed\n")
            continue
        if armed and time.monotonic() >= deadline:
            break
        if os.getppid() != parent:
            break  # reparented: the backup died and its socket end was inherited elsewhere
    if armed:
        with contextlib.suppress(OSError):
            sock.sendall(b"fired\n")
        _release(armed)
        after(vm)


def _release(devices: list[str]) -> None:
    try:
        held = {d.name for d in dm.list_devices() if d.suspended}
    except HvlabError:
        held = set(devices)  # cannot tell: resume each (a running device ignores it)
    for name in devices:
        if name in held:
            dm.run_resume(name)
