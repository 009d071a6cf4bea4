"""A VM of 8 disks (issue 10), in each Hyper-V generation: checkpointed (or, in 2012, its own
shadow copy taken) application-consistent inside the 10 s window, every disk at one instant
(its controllers held together), and the backup verifies."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from hvlab.backup import restore as rst
from hvlab.flow import consistency as C
from hvlab.flow import engine
from hvlab.flow import steps as S
from hvlab.guest.client import GuestClient
from hvlab.lab import guests
from hvlab_fixtures.plugin import LabHandle, one_vm_lab

pytestmark = pytest.mark.integration

DISKS = 8
EIGHT = one_vm_lab(DISKS, backing="1536M")


@pytest.mark.parametrize("model", list(S.MODELS))
def test_a_vm_of_eight_disks(lab_factory: Callable[..., LabHandle], model: str) -> None:
    h = lab_factory(EIGHT, start_guests=True)
    client = GuestClient(guests.socket_path(h.names, "vm01"))
    before = client.status()["committed_txid"]
    run_ = engine.start(h.defn.name, ["vm01"], fingerprints=False, model=model)
    assert run_.state == "done", run_.error
    vm = run_.vm["vm01"]
    # Inside the window: a window over 10 s, or a guest that thawed itself, fails the job.
    assert vm.cls == C.APP and vm.window is not None and vm.window.thawed_at is not None
    if "C" in S.model(model).artifacts:  # each C's lag behind the VM's first
        skews = [d.skew_s for d in vm.disks.values()]
        assert len(skews) == DISKS and all(s is not None and s >= 0 for s in skews)
        assert min(s or 0.0 for s in skews) == 0.0
    else:  # 2012: every disk's shadow copy rolled back in the host's
        assert all(d.reverted is not None for d in vm.disks.values())
    report = rst.verify(h.defn.name, run_.id)
    assert report["ok"], report
    assert all(h.controller_maps_base("vm01", f"disk{i}") for i in range(DISKS))
    assert client.status()["committed_txid"] > before
