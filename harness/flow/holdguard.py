"""A watchdog for suspended devices.

While steps 5 and 6 hold a VM's controllers and origins suspended, every write of the guest
waits, and so does the guest's own thaw (ext4 writes its superblock on thaw). If the backup
process dies or hangs there, nothing else would resume them: the guest would stay stuck past
its 10 s watchdog. So a guard process resumes them at once when the backup dies, or at the
deadline when it hangs, and records what went live (C, if its table was loaded), so a restart
maps it.

The guard is forked before the freeze request (`standby`) and armed through a pipe: a fork of
the backup costs 50-100 ms in the lab VM, a line on a pipe microseconds. The pipe also tells
the guard that the backup died: its end reads EOF. Disarmed, the guard then just exits.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from hvlab.sys import dm

POLL_S = 0.05


@dataclass
class _Guard:
    pid: int
    fd: int  # our end of the pipe; the guard reads the other


_standby: dict[str, _Guard] = {}  # VM -> its guard, forked before the window


def _fork(after: Callable[[], None]) -> _Guard:
    parent = os.getpid()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the guard: never returns into the caller's code
        code = 0
        try:
            os.close(w)
            _close_inherited(keep=r)
            os.setsid()  # a signal to the caller's process group does not end the guard
            _serve(r, parent, after)
        except BaseException:
            import traceback

            traceback.print_exc()  # to the caller's stderr: nothing else would say why
            code = 1
        finally:
            os._exit(code)
    os.close(r)
    return _Guard(pid, w)


def _close_inherited(keep: int) -> None:
    """Hold nothing of the backup's but stdio, the pipe and device-mapper's control node (its
    ioctls' open fd): not its VM locks (a guard outliving a killed backup by a moment would
    keep the VM locked for the next command), not other guards' pipes (their EOF is how they
    learn that the backup died)."""
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
    with contextlib.suppress(OSError):
        os.close(g.fd)
    with contextlib.suppress(ProcessLookupError):
        os.kill(g.pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(g.pid, 0)


def standby(vm: str, after: Callable[[], None]) -> None:
    """Fork VM's guard now, disarmed, so that arming it inside the window costs nothing."""
    close(vm)
    _standby[vm] = _fork(after)


def close(vm: str | None = None) -> None:
    """End VM's standing guard (every one of this process when None)."""
    for v in [vm] if vm else list(_standby):
        g = _standby.pop(v, None)
        if g is not None:
            _end(g)


def _send(g: _Guard, line: str) -> bool:
    try:
        os.write(g.fd, line.encode() + b"\n")
    except OSError:
        return False  # the guard is gone (it fired at a deadline, or was killed)
    return True


@contextlib.contextmanager
def guard(vm: str, devices: list[str], deadline_s: float,
          after: Callable[[], None]) -> Iterator[None]:
    """Run the block with a guard that resumes `devices` (in the order given) if this process
    dies or the block takes longer than deadline_s; `after` runs in the guard once it resumed
    them. Uses VM's standing guard if it has one (which runs the `after` it was forked with),
    else forks one for the block."""
    g = _standby.get(vm)
    own = g is None or not _send(g, "arm " + " ".join([f"{deadline_s:.3f}", *devices]))
    if own:
        _standby.pop(vm, None)
        g = _fork(after)
        _send(g, "arm " + " ".join([f"{deadline_s:.3f}", *devices]))
    assert g is not None
    try:
        yield
    finally:
        if own:
            _end(g)
        elif not _send(g, "disarm"):
            close(vm)


def _serve(fd: int, parent: int, after: Callable[[], None]) -> None:
    """Wait for lines: `arm SECONDS DEV...`, `disarm`. EOF (the backup is gone) or the
    deadline while armed: resume what is held, run `after`, exit."""
    armed: list[str] = []
    deadline = 0.0
    buf = b""
    while True:
        wait = max(deadline - time.monotonic(), 0.0) if armed else None
        ready = select.select([fd], [], [], min(wait, POLL_S) if wait is not None else POLL_S)[0]
        if armed and (time.monotonic() >= deadline):
            break
        if not ready:
            if os.getppid() != parent:
                break  # reparented: the backup died and its pipe end was inherited elsewhere
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            break  # the backup closed its end or died
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            words = line.decode().split()
            if words[:1] == ["arm"]:
                deadline, armed = time.monotonic() + float(words[1]), words[2:]
            elif words[:1] == ["disarm"]:
                armed = []
    if armed:
        _release(armed)
        after()


def _release(devices: list[str]) -> None:
    held = {d.name for d in dm.list_devices() if d.suspended}
    for name in devices:
        if name in held:
            dm.run_resume(name)
