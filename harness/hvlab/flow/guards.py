"""The watchdog processes a run's steps fork, owned by the run and ended with its steps:

    with ctx.guards:             # engine.execute
        ...                      # step 4: ctx.guards.hold.standby(...), .windows.open(vm, ...)

A guest still frozen when the steps end keeps its window's guard: it thaws the guest's
filesystems if the guest dies (windowguard.py says why)."""

from __future__ import annotations

import gc
from collections.abc import Callable
from types import TracebackType

from hvlab.flow.holdguard import HoldGuard
from hvlab.flow.windowguard import WindowGuards


class Guards:
    def __init__(self, frozen: Callable[[str], bool]) -> None:
        self.hold = HoldGuard()
        self.windows = WindowGuards()
        self._frozen = frozen

    def __enter__(self) -> Guards:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.hold.close()  # an early failure may leave it standing
        for vm in self.windows.vms():
            if not self._frozen(vm):
                self.windows.close(vm)
        gc.unfreeze()  # what the guards' forks froze
