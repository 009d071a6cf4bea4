"""The power-cut soak's pure parts: where a cut landed (from its journal and the run's record)
and what a restart may find before `hvlab recover`."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest

from hvlab.bench.soak import SoakFailure
from hvlab.bench.soakcuts import GAP, LEFT_BY_A_RUN, journal, lost, moment, plan
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
    assert moment([START], names) == (3, "before the backup")
    _run(names, "r20261206100100bbbb", "running", 4)
    assert moment([START], names) == (3, "step  5")
    _run(names, "r20261206100200cccc", "running", 14)
    assert moment([START], names) == (3, "finishing")


def test_after_the_run_and_after_the_cycle(names: Names) -> None:
    _run(names, "r20261206100000aaaa", "done", 14)
    _run(names, "r20261206100100bbbb", "aborted", 9)
    assert moment([START], names) == (3, "the cycle's recovery and checks (its run aborted)")
    end = {"cycle": 3, "event": "end", "result": {}}
    assert moment([START, end], names) == (3, "between cycles")
    nxt = {**START, "cycle": 4, "runs": 2}
    assert moment([START, end, nxt], names) == (4, "before the backup")


def test_cuts_are_aimed_apart_and_inside_the_soak() -> None:
    for seed in range(50):
        aims = plan(random.Random(seed), 100, 20)
        assert len(aims) == 20 and aims == sorted(aims) and aims[0] >= 0 and aims[-1] < 100
        assert all(b - a > GAP for a, b in itertools.pairwise(aims))
    with pytest.raises(SoakFailure, match="need at least"):
        plan(random.Random(1), 10, 3)


LIVE = {"txid": 40, "hash": "h40", "consistent": True}


@pytest.mark.parametrize(("acked", "ack", "live", "why"), [
    (40, (40, "h40"), LIVE, None),
    (38, (38, "h38"), LIVE, None),  # more survived than was acknowledged: fine
    (41, (41, "h41"), LIVE, "acknowledged txid 41, on the live disks 40"),
    (40, (40, "other"), LIVE, "chain hash h40 on disk, other acknowledged"),
    (40, None, {**LIVE, "consistent": False}, "inconsistent"),
])
def test_what_a_restart_lost(acked: int, ack: tuple[int, str] | None,
                             live: dict[str, object], why: str | None) -> None:
    got = lost({"vm01": acked}, {"vm01": ack}, {"vm01": live})
    assert (why in got["vm01"]) if why else not got


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
