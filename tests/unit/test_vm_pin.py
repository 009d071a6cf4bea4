"""Which CPU a lab VM gets (vm/pin.py): the choice, and HVLAB_VM_CPU."""

from __future__ import annotations

import os
import subprocess
from collections import Counter

import psutil
import pytest

from hvlab.errors import BadInput
from hvlab.vm import pin


def test_the_cpu_with_fewest_vms_lowest_on_a_tie() -> None:
    assert pin.choose([0, 1], Counter()) == 0
    assert pin.choose([0, 1], Counter({0: 1})) == 1
    assert pin.choose([0, 1], Counter({0: 1, 1: 1})) == 0
    assert pin.choose([2, 3], Counter({2: 2, 3: 1, 0: 0})) == 3


def test_hvlab_vm_cpu_picks_or_turns_off(monkeypatch: pytest.MonkeyPatch) -> None:
    cpus = pin.allowed()
    monkeypatch.setenv(pin.ENV, str(cpus[-1]))
    with pin.starting() as cpu:
        assert cpu == cpus[-1]
    monkeypatch.setenv(pin.ENV, "none")
    with pin.starting() as cpu:
        assert cpu is None
    for bad in ("99999", "-1", "one"):
        monkeypatch.setenv(pin.ENV, bad)
        with pytest.raises(BadInput, match=rf"HVLAB_VM_CPU='{bad}': expected a CPU"), \
                pin.starting():
            pass


@pytest.mark.skipif(os.geteuid() != 0, reason="the lock lives under /run/hvlab")
def test_a_child_runs_on_the_chosen_cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(pin.ENV, raising=False)
    with pin.starting() as cpu:
        assert cpu in pin.allowed()
        proc = subprocess.Popen(["sleep", "5"], preexec_fn=lambda: pin.apply(cpu))
    try:
        assert psutil.Process(proc.pid).cpu_affinity() == [cpu]
    finally:
        proc.kill()
        proc.wait()
