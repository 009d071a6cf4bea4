"""A watchdog for suspended controllers.

While step 5 holds a VM's controllers suspended, every write of the guest waits, and so does
the guest's own thaw (ext4 writes its superblock on thaw). If the backup process dies or hangs
there, nothing else would resume them: the guest would stay stuck past its 10 s watchdog. So
the process forks a guard first. The guard resumes the controllers at once when the process
dies, or at the deadline when it hangs, and records what went live (C, if its table was
loaded), so a restart maps it. A fork, not a new program: it costs milliseconds inside the
freeze window, where starting Python would cost half a second in the lab VM.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator

from hvlab.sys import dm

POLL_S = 0.05


@contextlib.contextmanager
def guard(ctls: list[str], deadline_s: float, after: Callable[[], None]) -> Iterator[None]:
    """Run the block with a guard that resumes ctls if this process dies or the block takes
    longer than deadline_s; `after` runs in the guard once it resumed them."""
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the guard: never returns into the caller's code
        code = 0
        try:
            os.setsid()  # a signal to the caller's process group does not end the guard
            _watch(parent, ctls, time.monotonic() + deadline_s, after)
        except BaseException:
            import traceback

            traceback.print_exc()  # to the caller's stderr: nothing else would say why
            code = 1
        finally:
            os._exit(code)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def _watch(parent: int, ctls: list[str], deadline: float, after: Callable[[], None]) -> None:
    while time.monotonic() < deadline and os.getppid() == parent:
        time.sleep(POLL_S)
    held = {d.name for d in dm.list_devices() if d.suspended}
    for ctl in ctls:
        if ctl in held:
            dm.run_resume(ctl)
    after()
