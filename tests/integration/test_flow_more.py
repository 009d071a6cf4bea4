"""More of issue 4 on real devices: a backup under full write load, and pausing after every
step where a pause is allowed, continued by --resume and unwound by --abort."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from fixtures.plugin import LabHandle
from harness.backup import restore as rst
from harness.flow import engine, runs
from harness.guest.client import GuestClient
from harness.lab import guests

pytestmark = pytest.mark.integration

ONE_VM: dict[str, Any] = {
    "lab": {"name": "x", "backing_size": "512M"},
    "vm": [{"name": "vm01", "profile": "windows",
            "disk": [{"name": "disk0", "size": "64M", "fs": "ext4"}]}],
}
ALLOWED = [1, 2, 3, 8, 9, 10, 11, 12, 13]


def test_backup_while_the_guest_writes_at_full_rate(lab_factory: Callable[..., LabHandle]
                                                   ) -> None:
    h = lab_factory(ONE_VM, start_guests=True)
    client = GuestClient(guests.socket_path(h.names, "vm01"))
    client.workload(ops_per_s=2000)  # as fast as the guest can go
    before = client.status()["committed_txid"]
    run_ = engine.start(h.defn.name, ["vm01"], fingerprints=False)
    assert run_["state"] == "done"
    after = client.status()["committed_txid"]
    assert after > before, "the guest kept committing through the backup"
    report = rst.verify(h.defn.name, run_["id"])
    assert report["ok"], report
    assert h.controller_maps_base("vm01", "disk0")


@pytest.mark.parametrize("step", ALLOWED)
def test_pause_after_each_step_then_resume_or_abort(lab_factory: Callable[..., LabHandle],
                                                    step: int) -> None:
    h = lab_factory(ONE_VM, start_guests=True)
    lab = h.defn.name
    pre = h.lv_names()
    client = GuestClient(guests.socket_path(h.names, "vm01"))

    paused = engine.start(lab, ["vm01"], pause_after=step, fingerprints=False)
    assert paused["state"] == "paused"
    assert not client.status()["frozen"], "a paused run never holds the guest frozen"
    marker = h.mountpoint("vm01", "disk0") / f"written-while-paused-{step}"
    marker.write_text("live write\n")
    engine.abort(lab, paused["id"])
    assert runs.load(h.names, paused["id"])["state"] == "aborted"
    assert h.lv_names() == pre and h.controller_maps_base("vm01", "disk0")
    assert marker.read_text() == "live write\n", "abort must keep the live writes"

    paused = engine.start(lab, ["vm01"], pause_after=step, fingerprints=False)
    done = engine.resume(lab, paused["id"], fingerprints=False)
    assert done["state"] == "done"
    assert h.lv_names() == pre and h.controller_maps_base("vm01", "disk0")
    assert marker.read_text() == "live write\n"
    assert rst.verify(lab, done["id"])["ok"]
