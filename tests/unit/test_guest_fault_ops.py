"""The guest's fault op (a writer's veto, a request left unanswered) and auto-recovery's
filesystem lookup, in-process (fake_guest)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fake_guest import Running, g

from hvlab.guest import autorecovery
from hvlab.guest.client import GuestError

__all__ = ["g"]  # the fixture, imported for pytest


def test_fault_veto_fails_the_next_freeze_once(g: Running) -> None:
    """A writer's veto: the writers frozen before it are let go, nothing is frozen."""
    assert g.client.fault(veto="scratch")["armed"] == {"veto": "scratch"}
    assert g.client.status()["faults"] == {"veto": "scratch"}
    with pytest.raises(GuestError, match="writer scratch vetoed the freeze: "
                                         "VSS_E_WRITERERROR_RETRYABLE"):
        g.client.freeze()
    assert g.freezer.calls == [] and not (g.guest.cfg.run_dir / "frozen").exists()
    st = g.client.status()
    assert st["faults"] == {} and st["state"] == "idle"
    assert all(w["state"] == "running" for w in st["writers"]), st["writers"]
    g.client.freeze()  # fired once
    assert g.client.thaw()["timed_out"] is False


def test_fault_mute_leaves_the_next_request_unanswered_once(g: Running) -> None:
    from hvlab.guest.client import GuestTimeout

    g.client.fault(mute="freeze")
    with pytest.raises(GuestTimeout):
        g.client.freeze(wait_s=0.5)
    assert g.client.status()["state"] != "frozen" and g.freezer.calls == []
    assert g.client.status()["faults"] == {}
    g.client.freeze()
    g.client.abort()


@pytest.mark.parametrize("args", [{"veto": "appender"}, {"veto": "nope"}, {"veto": 3},
                                  {"mute": "fault"}, {"mute": "format_c"}, {"mute": ["freeze"]},
                                  {"veto": "ledger", "what": 1}])
def test_fault_bad_args(g: Running, args: dict[str, Any]) -> None:
    with pytest.raises(GuestError) as ei:
        g.client.request("fault", **args)
    assert ei.value.code == "bad_args" and "\n" not in str(ei.value)
    assert g.client.fault()["armed"] == {}, "nothing armed by a bad request"


def test_auto_recovery_reads_a_live_disks_filesystem_type_from_the_mount_table() -> None:
    root = next(ln.split()[2] for ln in Path("/proc/self/mounts").read_text().splitlines()
                if ln.split()[1] == "/")
    assert autorecovery.fs_type_of(Path("/")) == root
    assert autorecovery.fs_type_of(Path("/no/such/mount/point")) is None
