"""`make bench`'s pure parts, without devices: ratios, the JSON's shape, the table, the plots,
what is read from a run record (window, skew, step times)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hvlab.bench import __main__ as bench
from hvlab.bench import flow as bench_flow
from hvlab.bench import plots as bench_plots
from hvlab.bench import report as bench_report
from hvlab.lab.record import Event


def _floor(*ns: int) -> dict[str, Any]:
    return {"counts": {str(n): {"ioctl": {"median_s": 0.001 * n},
                                "dmsetup": {"median_s": 0.1 * n}} for n in ns}}


def _results() -> dict[str, Any]:
    jobs: list[dict[str, Any]] = [{"vms": 1, "wall_s": 10.0, "windows_s": {"vm01": 0.2},
                                   "walls_s": [9.5, 10.0, 12.25], "quiet_wall_s": 5.0},
                                  {"vms": 4, "wall_s": 30.0, "windows_s": {f"vm0{i}": 0.2 + i / 100
                                                                           for i in range(1, 5)}},
                                  {"vms": 8, "wall_s": None, "error": "FlowFailed: boom"}]
    bench_report.job_ratios(jobs)
    return {
        "meta": {"kernel": "6.1.0", "runner": "uml lab VM", "date": "2026-11-29",
                 "git_commit": "abc", "quick": False,
                 "machine": {"cpus": 2, "cpu_model": "Xeon", "mem_bytes": 4 << 30}},
        "floor": _floor(1, 8),
        "window": {"limit_s": 10.0, "disk_size": "64M", "profile": "windows", "points": [
            {"disks": 1, "window_s": 0.25, "floor_s": 0.001, "skew": {"disk0": 0.0},
             "wall_s": 9.0, "class": "application-consistent", "error": None},
            {"disks": 8, "window_s": 10.4, "floor_s": 0.008, "skew": None, "wall_s": 40.0,
             "error": "FlowFailed: freeze window 10.40 s exceeds"}]},
        "jobs": {"points": jobs},
        "steps": {"vm": "vm01", "wall_s": 20.0, "steps_s": 3.0, "steps": [
            {"step": 4, "name": "quiesce", "vm": "vm01", "seconds": 1.0},
            {"step": 13, "name": "read", "vm": None, "seconds": 2.0}]},
        "reader": {"virtual_bytes": 1 << 30, "mapped_bytes": 100 << 20, "extents": 7,
                   "repeat": 3, **bench_report.reader_summary(100 << 20, [1.0, 2.0, 1.5],
                                                              [1.0, 1.0, 1.2])},
        "incremental": {"disk_bytes": 1 << 30, "files_bytes": 384 << 20, "goal": 1.1,
                        "points": [{"share": 0.01, "changed_bytes": 10 << 20,
                                    "read_bytes": 11 << 20, "ratio": 1.1, "extents": 9,
                                    "thin_delta_s": 0.2, "read_s": 0.1},
                                   {"share": 0.1, "changed_bytes": 100 << 20,
                                    "read_bytes": 120 << 20, "ratio": 1.2, "extents": 90,
                                    "thin_delta_s": 0.3, "read_s": 1.0}]},
        "errors": {"jobs": "FlowFailed: boom"},
        "goals": [],
    }


def test_ratio_math() -> None:
    assert bench_report.ratio(3.0, 2.0) == 1.5
    assert bench_report.ratio(None, 2.0) is None
    assert bench_report.ratio(1.0, 0.0) is None
    assert bench_report.mib_s(10 << 20, 2.0) == 5.0
    r = bench_report.reader_summary(100 << 20, [2.0, 1.0, 4.0], [1.0, 1.0, 1.0])
    assert r["ours_median_s"] == 2.0 and r["dd_median_s"] == 1.0
    assert r["ours_MiB_s"] == 50.0 and r["dd_MiB_s"] == 100.0
    assert r["ratio"] == 0.5 and r["goal"] == 0.9
    assert bench_report.reader_summary(1, [], [])["ratio"] is None


def test_job_ratios_against_one_vm() -> None:
    pts: list[dict[str, Any]] = [{"vms": 1, "wall_s": 10.0, "quiet_wall_s": 4.0},
                                 {"vms": 4, "wall_s": 25.0, "quiet_wall_s": 10.0},
                                 {"vms": 8, "wall_s": 99.0, "error": "x"}]
    bench_report.job_ratios(pts)
    assert [p["ratio_to_one"] for p in pts] == [1.0, 2.5, None]
    assert [p["quiet_ratio"] for p in pts] == [1.0, 2.5, None]
    failed_one: list[dict[str, Any]] = [{"vms": 1, "wall_s": 10.0, "error": "x"},
                                        {"vms": 4, "wall_s": 25.0}]
    bench_report.job_ratios(failed_one)
    assert failed_one[1]["ratio_to_one"] is None


def test_floor_lookup() -> None:
    assert bench_report.floor_s(_floor(1, 2), 2) == 0.002
    assert bench_report.floor_s(_floor(1), 8) is None
    assert bench_report.floor_s(None, 1) is None


def test_json_shape() -> None:
    res = _results()
    assert bench_report.check_shape(res) == []
    assert json.loads(json.dumps(res)) == res  # plain JSON all through
    del res["meta"]["runner"], res["reader"]
    assert bench_report.check_shape(res) == ["no reader", "no meta.runner"]


def test_table_text() -> None:
    text = bench_report.render_text(_results())
    assert "kernel 6.1.0, runner uml lab VM, 2 cpus (Xeon), 4096 MiB" in text
    assert "commit abc" in text
    for want in ("1. freeze window", "0.25 s", "1.0 ms", "250x", "FAILED: FlowFailed",
                 "2a. job wall time", "3.00x", "0.21-0.24 s",
                 "9.50 / 10.00 / 12.25", "writers paused", "5.00 s", "2b. steps", "quiesce",
                 "3. full-backup reader vs dd", "67", "100", "0.67x",
                 "goals (issues 10 and 11)", "MISSED", "not measured",
                 "FAILED part jobs: FlowFailed: boom"):
        assert want in text, want
    res = _results()
    res["jobs"]["points"][2]["error"] = ("FlowFailed: run r1 failed and was unwound: "
                                         "HvlabError: vm01: freeze window 13.64 s exceeds 10 s")
    assert "FAILED: HvlabError: vm01: freeze window 13.64 s exceeds 10 s" in \
        bench_report.render_text(res)
    # an empty run (every part failed before measuring) still renders
    empty = {"meta": {}, "errors": {"floor": "OSError: x"}}
    assert "FAILED part floor" in bench_report.render_text(empty)


def test_goals() -> None:
    res = _results()
    res["jobs"]["points"][2].update(wall_s=85.0, error=None)
    bench_report.job_ratios(res["jobs"]["points"])
    got = {g["what"]: (g["measured"], g["ok"]) for g in bench_report.goals(res)}
    assert got == {
        "freeze window, 1 disk": ("0.25 s", True),
        "freeze window growth, 8 disks": ("-", None),
        "freeze window, 8 disks": ("-", None),  # failed: no window to hold against a goal
        "job wall time, one VM of 8 disks": ("-", None),
        "job wall time, default vm01": ("20.00 s", True),
        "job of 8 one-disk VMs vs one VM": ("8.50x", True),
        "reader vs dd, same extents + sha256": ("0.67x", False),
        "incremental, 1% changed: bytes read / changed": ("1.10x", True),
        "incremental, 10% changed: bytes read / changed": ("1.20x", False)}
    res["window"]["points"][1].update(window_s=0.6, error=None)
    got = {g["what"]: (g["measured"], g["ok"]) for g in bench_report.goals(res)}
    assert got["freeze window, 8 disks"] == ("0.60 s", True)
    assert [g for g in bench_report.goals(res) if g["goal"] == "<= 1-disk + 420 ms"] == [
        {"what": "freeze window growth, 8 disks", "goal": "<= 1-disk + 420 ms",
         "measured": "0.60 s", "ok": True}]
    assert got["job wall time, one VM of 8 disks"] == ("40.00 s", True)
    assert bench_report.goals({"meta": {}}) == []


def test_plots(tmp_path: Path) -> None:
    made = bench_plots.plots(_results(), tmp_path)
    assert [p.name for p in made] == list(bench_plots.PLOTS)
    for p in made:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert bench_plots.plots({"meta": {}}, tmp_path / "none") == []


def test_skew_and_steps_from_a_record() -> None:
    vm = {"disks": {"disk0": {"skew": 0.001}, "disk1": {"skew_s": 0.002, "B": "x"}},
          "window": {"seconds": 0.3}}
    assert bench_flow.skew_of(vm) == {"disk0": 0.001, "disk1.skew_s": 0.002}
    assert bench_flow.skew_of({"disks": {"disk0": {"B": "x"}}, "window": None}) is None
    evs = [Event.from_dict(e) for e in (
        {"step": 4, "name": "quiesce", "vm": "vm01", "start": 1.0, "end": 1.5},
        {"step": 11, "name": "external snapshot", "vm": None, "start": 2.0, "end": 4.25})]
    assert bench_flow.step_times(evs) == [
        {"step": 4, "name": "quiesce", "vm": "vm01", "seconds": 0.5},
        {"step": 11, "name": "external snapshot", "vm": None, "seconds": 2.25}]


def test_lab_docs_and_args() -> None:
    from hvlab.lab import definition

    d = definition.parse(bench_flow.lab_doc("benchw8", [("vm01", 8)]))
    assert [len(v.disks) for v in d.vms] == [8] and d.vms[0].profile == "windows"
    assert bench.parse_args(["--quick"]).quick
    assert bench.QUICK.window[0] == 1 and bench.FULL.window == (1, 2, 4, 8)
    assert bench.FULL.jobs == (1, 4, 8)
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--bogus"])
    assert e.value.code == 2
