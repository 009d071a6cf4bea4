"""The power-cut soak's pure parts: where a cut landed (from its journal and the run's record)
and what a restart may find before `hvlab recover`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hvlab.bench.soakcuts import LEFT_BY_A_RUN, journal, moment
from hvlab.lab.paths import Names


@pytest.fixture()
def names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Names:
    monkeypatch.setenv("HVLAB_HOME", str(tmp_path))
    return Names("soak")


def _run(names: Names, rid: str, state: str, last: int | None) -> None:
    d = names.runs_dir / rid
    d.mkdir(parents=True)
    (d / "run.json").write_text(json.dumps({"id": rid, "state": state, "last_step": last}))


START = {"cycle": 3, "event": "start", "acked": {"vm01": 7}, "runs": 1}


def test_a_cut_is_placed_by_the_cycles_run(names: Names) -> None:
    _run(names, "r20261206100000aaaa", "done", 14)  # an earlier cycle's
    assert moment([START], 3, names) == "before the backup"
    _run(names, "r20261206100100bbbb", "running", 4)
    assert moment([START], 3, names) == "step  5"
    _run(names, "r20261206100200cccc", "running", 14)
    assert moment([START], 3, names) == "finishing"


def test_after_the_run_and_after_the_cycle(names: Names) -> None:
    _run(names, "r20261206100000aaaa", "done", 14)
    _run(names, "r20261206100100bbbb", "aborted", 9)
    assert moment([START], 3, names).startswith("after a aborted run")
    end = {"cycle": 3, "event": "end", "result": {}}
    assert moment([START, end], 3, names) == "between cycles"


def test_a_torn_last_line_is_not_read(tmp_path: Path) -> None:
    p = tmp_path / "j.jsonl"
    p.write_text(json.dumps(START) + "\n" + '{"cycle": 3, "acked": {"vm01": 7}')
    assert journal(p) == [START]
    assert journal(tmp_path / "none") == []


@pytest.mark.parametrize(("problem", "allowed"), [
    ("LV vm01_disk0_c_r1 (backup checkpoint C)", True),
    ("LV vm01_disk0 is tagged as a backup run's C", True),
    ("missing LV vm01_disk1", True),
    ("LV zfill", False),
    ("pool transaction id: LVM 3, kernel 4", False),
    ("thin_check of the pool's metadata: bad", False),
    ("missing controller hvlab_soak_ctl_vm01_disk0", False),
])
def test_only_what_a_dead_run_left_may_be_found(problem: str, allowed: bool) -> None:
    assert bool(LEFT_BY_A_RUN.match(problem)) is allowed
