"""The engine's pure pieces: the step registry, the unwind plan for every state of a run, the
fault point parser, the typed run record's round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hvlab.errors import BadInput
from hvlab.flow import faults
from hvlab.flow.steps import ACTIONS, STEPS
from hvlab.flow.unwind import Facts, Undo, plan
from hvlab.lab import runs
from hvlab.lab.paths import Names
from hvlab.lab.record import Disk, Run, Vm, Window
from hvlab.report import explain


def test_every_step_has_exactly_one_action() -> None:
    assert sorted(ACTIONS) == [s.number for s in STEPS] == list(range(1, 15))


def _run(**disk: object) -> Run:
    d = Disk(B="vm01_disk0", ctl="ctl0", size=1, fs="ext4")
    for k, v in disk.items():
        setattr(d, k, v)
    return Run(id="r1", lab="t", vms=["vm01"], dest="/b/r1", created=0.0, dest_made=True,
               vm={"vm01": Vm(profile="windows", disks={"disk0": d})})


def _facts(lvs: set[str], mapped: str | None = "vm01_disk0", live: str | None = None,
           ar: set[str] | None = None, base_tags: frozenset[str] = frozenset(),
           owned: bool = True, exists: bool = True) -> Facts:
    return Facts(lvs=frozenset(lvs | {"vm01_disk0"}), mapped={"vm01/disk0": mapped},
                 live={"vm01/disk0": live}, ar_devices=frozenset(ar or set()),
                 base_tags={"vm01_disk0": base_tags}, dest_owned=owned, dest_exists=exists)


def kinds(steps: list[Undo]) -> list[tuple[str, str]]:
    return [(u.kind, u.lv) for u in steps]


def test_unwind_before_anything_was_made_removes_only_the_partial_backup() -> None:
    assert kinds(plan(_run(), _facts(set()), was_done=False)) == [("remove-dest", "/b/r1")]


def test_unwind_removes_a_c_that_never_went_live() -> None:
    run = _run(C="c", C_exists=True)
    assert ("remove", "c") in kinds(plan(run, _facts({"c"}), was_done=False))


def test_unwind_merges_a_mapped_c() -> None:
    run = _run(C="c", C_exists=True, A="a", A_exists=True)
    steps = kinds(plan(run, _facts({"c", "a"}, mapped="c"), was_done=False))
    assert steps[:2] == [("remove", "a"), ("promote", "c")]


def test_unwind_merges_a_c_recorded_live_even_if_not_mapped_now() -> None:
    # a power loss: the record says the guest wrote to C; never remove it as unwritten
    run = _run(C="c", C_exists=True)
    steps = kinds(plan(run, _facts({"c"}, mapped=None, live="c"), was_done=False))
    assert ("promote", "c") in steps and ("remove", "c") not in steps


def test_unwind_after_the_external_snapshot_removes_s_and_a_then_merges() -> None:
    run = _run(C="c", A="a", S_B="sb", S_A="sa", ar_ctl="ar0")
    steps = kinds(plan(run, _facts({"c", "a", "sb", "sa"}, mapped="c", ar={"ar0"}),
                       was_done=False))
    assert steps == [("detach", "ar0"), ("remove", "sa"), ("remove", "sb"), ("remove", "a"),
                     ("promote", "c"), ("remove-dest", "/b/r1")]


def test_unwind_finishes_a_merge_killed_between_rename_and_retag() -> None:
    run = _run(C="c")
    steps = kinds(plan(run, _facts(set(), base_tags=frozenset({"run_r1"})), was_done=False))
    assert ("retag", "vm01_disk0") in steps


def test_unwind_never_removes_a_finished_backup_or_a_foreign_directory() -> None:
    assert plan(_run(), _facts(set()), was_done=True) == []
    assert [u.kind for u in plan(_run(), _facts(set(), owned=False),
                                 was_done=False)] == ["keep-dest"]
    assert plan(_run(), _facts(set(), owned=False, exists=False), was_done=False) == []


def test_fault_points_parse_and_refuse_bad_input() -> None:
    assert faults.parse("step-05:kill, s14-renamed:raise") == {"step-05": "kill",
                                                               "s14-renamed": "raise"}
    with pytest.raises(BadInput, match="unknown fault point 'step-99'"):
        faults.parse("step-99:kill")
    with pytest.raises(BadInput, match="unknown fault action 'boom'"):
        faults.parse("step-05:boom")
    assert set(faults.BOUNDARIES) == {f"step-{n:02d}" for n in range(1, 15)} | {"finish"}


def test_raise_at_an_armed_point_and_nothing_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(faults.ENV, "s11-one:raise")
    monkeypatch.setattr(faults, "_fired", set())
    faults.point("s12-one")
    with pytest.raises(faults.InjectedFault, match="s11-one"):
        faults.point("s11-one")
    faults.point("s11-one")  # fires once per process


def test_run_record_round_trips_through_json() -> None:
    run = _run(C="c", C_exists=True, redirected=True)
    run.vm["vm01"].cls = "application-consistent"
    run.vm["vm01"].window = Window(freeze_start=1.0, seconds=0.4)
    data = json.loads(json.dumps(run.to_dict()))
    assert data["vm"]["vm01"]["class"] == "application-consistent"
    again = Run.from_dict(data)
    assert again == run
    assert Run.from_dict({**data, "unknown_future_field": 1}) == run


def test_a_background_hash_is_folded_into_its_steps_event(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HVLAB_HOME", str(tmp_path))
    names = Names("t")
    runs.run_dir(names, "r1").mkdir(parents=True)
    for ev in ({"step": 8, "vm": "vm01", "start": 0.0, "end": 1.0, "fingerprints": None},
               {"step": 9, "vm": "vm01", "start": 1.0, "end": 2.0},
               {"step": 8, "vm": "vm01", "supplement": "fingerprints",
                "fingerprints": {"vm01/disk0": {"B": {"sha256": "ab"}}},
                "fingerprints_note": "T0"}):
        runs.append_event(names, "r1", ev)
    evs = runs.events(names, "r1")
    assert [e.step for e in evs] == [8, 9]
    assert (evs[0].fingerprints or {})["vm01/disk0"]["B"]["sha256"] == "ab"
    assert explain.time_cost(evs) == "time: steps' own 2.0 s, wall 2.0 s (1.00x)"


def test_a_suspend_timeout_does_not_ask_the_pool() -> None:
    """After a suspend that timed out the disk below does not complete writes: the pool's
    status would wait for its metadata commit there (minutes, measured under dm-delay), so the
    failure is said without it and the unwind starts at once."""
    from hvlab.flow import engine
    from hvlab.sys.dmioctl import SuspendTimeout

    asked: list[str] = []

    class Spy:
        @property
        def names(self) -> Names:
            asked.append("names")
            raise AssertionError("the pool was asked")

    exc = SuspendTimeout("suspend", "ctl0", 4, "suspend of ctl0 did not return within 4.00 s")
    assert engine._pool_state(Spy(), exc) == ""  # type: ignore[arg-type]
    assert asked == []
    engine._pool_state(Spy(), RuntimeError("other"))  # type: ignore[arg-type]
    assert asked  # any other failure: the pool is asked (and a failure to ask is quiet)
