"""The hold guard's life across a job, with no device held (its resume is stubbed): one
process stands for every VM's holds, a disarm in time is answered, a block that overruns its
deadline learns that the guard fired (and the guard ran `after` for that VM), and the next
standby forks a new guard."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hvlab.flow import holdguard


@pytest.fixture
def after(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setattr(holdguard, "_release", lambda devices: None)  # nothing is held here
    yield tmp_path
    holdguard.close()


def test_one_guard_stands_for_every_vm_of_a_job(after: Path) -> None:
    holdguard.standby(lambda vm: (after / vm).touch())
    pid = holdguard._standby[0].pid
    for vm in ("vm01", "vm02", "vm03"):
        holdguard.standby(lambda vm: (after / vm).touch())  # no new fork
        with holdguard.guard(vm, ["dev-a", "dev-b"], 5.0, lambda v: None):
            pass
    assert [g.pid for g in holdguard._standby] == [pid]
    holdguard.close()
    assert not holdguard._standby and not list(after.iterdir())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_hold_past_its_deadline_fails_and_the_next_vm_gets_a_new_guard(after: Path) -> None:
    holdguard.standby(lambda vm: (after / vm).touch())
    first = holdguard._standby[0].pid
    with pytest.raises(holdguard.GuardFired, match="vm02"), \
            holdguard.guard("vm02", ["dev-a"], 0.1, lambda v: None):
        time.sleep(0.6)
    assert (after / "vm02").exists()  # the guard ran `after` for the VM it resumed
    assert not holdguard._standby
    holdguard.standby(lambda vm: (after / vm).touch())
    assert holdguard._standby[0].pid != first
