"""A VM of 8 disks (issue 10): checkpointed application-consistent inside the 10 s window,
every disk at one instant (its origins held together), and the backup verifies."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from hvlab.backup import restore as rst
from hvlab.flow import consistency as C
from hvlab.flow import engine
from hvlab.guest.client import GuestClient
from hvlab.lab import guests
from hvlab_fixtures.plugin import LabHandle, one_vm_lab

pytestmark = pytest.mark.integration

DISKS = 8
EIGHT = one_vm_lab(DISKS, backing="1536M")


def test_a_vm_of_eight_disks(lab_factory: Callable[..., LabHandle]) -> None:
    h = lab_factory(EIGHT, start_guests=True)
    client = GuestClient(guests.socket_path(h.names, "vm01"))
    before = client.status()["committed_txid"]
    run_ = engine.start(h.defn.name, ["vm01"], fingerprints=False)
    assert run_.state == "done", run_.error
    vm = run_.vm["vm01"]
    # Inside the window: a window over 10 s, or a guest that thawed itself, fails the job.
    assert vm.cls == C.APP and vm.window is not None and vm.window.thawed_at is not None
    skews = [d.skew_s for d in vm.disks.values()]
    assert len(skews) == DISKS and all(s is not None and s >= 0 for s in skews)
    assert min(s or 0.0 for s in skews) == 0.0
    report = rst.verify(h.defn.name, run_.id)
    assert report["ok"], report
    assert all(h.controller_maps_base("vm01", f"disk{i}") for i in range(DISKS))
    assert client.status()["committed_txid"] > before
