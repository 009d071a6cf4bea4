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
def hg(monkeypatch: pytest.MonkeyPatch) -> Iterator[holdguard.HoldGuard]:
    monkeypatch.setattr(holdguard, "_release", lambda devices: None)  # nothing is held here
    g = holdguard.HoldGuard()
    yield g
    g.close()


@pytest.fixture
def after(tmp_path: Path) -> Path:
    return tmp_path


def test_one_guard_stands_for_every_vm_of_a_job(hg: holdguard.HoldGuard, after: Path) -> None:
    hg.standby(lambda vm: (after / vm).touch())
    pid = hg.pid
    assert pid is not None
    for vm in ("vm01", "vm02", "vm03"):
        hg.standby(lambda vm: (after / vm).touch())  # no new fork
        with hg.guard(vm, ["dev-a", "dev-b"], 5.0, lambda v: None):
            pass
    assert hg.pid == pid
    hg.close()
    assert hg.pid is None and not list(after.iterdir())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_hold_past_its_deadline_fails_and_the_next_vm_gets_a_new_guard(
        hg: holdguard.HoldGuard, after: Path) -> None:
    hg.standby(lambda vm: (after / vm).touch())
    first = hg.pid
    with pytest.raises(holdguard.GuardFired, match="vm02"), \
            hg.guard("vm02", ["dev-a"], 0.1, lambda v: None):
        time.sleep(0.6)  # past the deadline: what the test is about
    assert (after / "vm02").exists()  # the guard ran `after` for the VM it resumed
    assert hg.pid is None
    hg.standby(lambda vm: (after / vm).touch())
    assert hg.pid not in (None, first)
