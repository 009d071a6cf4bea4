"""doctor's probes: classifying a dm suspend of a frozen device, the report lines, the JSON that
comes back from the lab VM, and what counts as a failure. No devices."""

from __future__ import annotations

import pytest

from hvlab.lab import doctor, probe
from hvlab.lab.probe import ProbeResult

EBUSY_6_1 = ("device-mapper: suspend ioctl on hvlab-doctor-7  failed: Device or resource busy\n"
             "Command failed.\n")


@pytest.mark.parametrize(("rc", "stderr", "timed_out", "verdict", "detail"), [
    (0, "", False, "nests", "suspended"),
    (1, EBUSY_6_1, False, "no-nest", "EBUSY"),
    (-1, "timed out after 10.0s", True, "unknown", "did not return within 10 s"),
    (1, "device-mapper: suspend ioctl failed: No such device or address\nCommand failed.\n",
     False, "unknown", "dmsetup suspend failed: Command failed."),
    (5, "", False, "unknown", "exit 5"),
])
def test_classify_suspend(rc: int, stderr: str, timed_out: bool, verdict: str,
                          detail: str) -> None:
    got_verdict, got_detail = probe.classify_suspend(rc, stderr, timed_out)
    assert got_verdict == verdict and detail in got_detail


def test_lines_say_where_and_what() -> None:
    vm = ProbeResult("nesting", "no-nest", "EBUSY", "6.1.176", True)
    assert vm.line() == ("nesting: in the lab VM (Linux 6.1.176): "
                         "user freeze + dm suspend do not nest (EBUSY)")
    here = ProbeResult("nesting", "nests", "suspended", "6.8.0-31-generic", False)
    assert here.line() == ("nesting: on this kernel (Linux 6.8.0-31-generic): "
                           "user freeze + dm suspend nest (the suspend succeeded)")
    ok = ProbeResult("freeze", "works", "frozen and thawed", "6.1.176", True)
    assert ok.line() == ("fsfreeze: in the lab VM (Linux 6.1.176): "
                         "freeze + thaw of a scratch ext4 works")
    bad = ProbeResult("freeze", "fails", "fsfreeze -u failed", "6.1.176", False)
    assert "FAILED: fsfreeze -u failed" in bad.line()
    leak = ProbeResult("freeze", "works", "", "6.1.176", False, ("loop /dev/loop3",))
    assert leak.line().endswith("LEFT BEHIND: loop /dev/loop3") and not leak.ok


def test_results_round_trip_through_json() -> None:
    results = [ProbeResult("freeze", "works", "frozen and thawed", "6.1.176", True),
               ProbeResult("nesting", "unknown", "x", "6.1.176", True, ("dm device d",))]
    assert probe.from_json(probe.to_json(results)) == results


def test_from_json_rejects_garbage() -> None:
    with pytest.raises((ValueError, TypeError)):
        probe.from_json('[{"name": "freeze"}]')


def test_freeze_must_work_nesting_is_information() -> None:
    works = ProbeResult("freeze", "works", "", "6.1.176", True)
    assert doctor.probes_ok([works, ProbeResult("nesting", "no-nest", "EBUSY", "6.1.176", True)])
    assert doctor.probes_ok([works, ProbeResult("nesting", "unknown", "?", "6.1.176", True)])
    assert not doctor.probes_ok([ProbeResult("freeze", "fails", "", "6.1.176", True)])
    leaky = ProbeResult("nesting", "nests", "", "6.8.0", False, ("mount /tmp/x/mnt",))
    assert not doctor.probes_ok([works, leaky])


def test_probes_need_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    results, notes = doctor.probes("uml")
    assert results == [] and "need root" in notes[0]
