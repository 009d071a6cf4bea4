"""The lanes picture of `hvlab explain`, from a synthetic run record (pure logic)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from rich.console import Console

from hvlab.lab.record import Event, Run
from hvlab.report.explain import lane_rows, render_explain

RUN = Run.from_dict({
    "id": "r1", "lab": "t", "vms": ["vm01"], "dest": "/nowhere", "created": 0.0,
    "state": "done",
    "vm": {"vm01": {"profile": "windows", "class": "application-consistent", "t0": 1.0,
                    "window": {"freeze_start": 0.5, "seconds": 0.5},
                    "disks": {"disk0": {"B": "b", "C": "c", "A": "a", "S_B": "sb", "S_A": "sa",
                                        "ctl": "ctl", "size": 1, "fs": "ext4"}}}},
})


def _arts(*pairs: str) -> list[dict[str, str]]:
    return [{"vm": "vm01", "disk": "disk0", "artifact": a, "lv": a.lower()} for a in pairs]


def _ev(step: int, writes: str, detail: dict[str, Any] | None = None,
        fp: dict[str, str] | None = None, in_freeze: bool = False) -> Event:
    return Event(run="r1", step=step, name=f"step {step}", vm="vm01" if step <= 10 else None,
                 start=0.0, end=0.1, in_freeze=in_freeze, detail=detail or {},
                 writes_to={"vm01/disk0": {"artifact": writes}},
                 fingerprints=None if in_freeze else
                 {"vm01/disk0": {k: {"sha256": v, "mapped_blocks": 1}
                                 for k, v in (fp or {}).items()}})


EVENTS = [
    _ev(3, "B", fp={"B": "b1"}),
    _ev(4, "B", in_freeze=True),
    _ev(5, "C", {"made": _arts("C")}, in_freeze=True),
    _ev(6, "C", {"made": _arts("A")}, in_freeze=True),
    _ev(8, "C", fp={"B": "b2", "C": "c1", "A": "b2"}),
    _ev(10, "C", fp={"B": "b2", "C": "c2", "A": "a2"}),
    _ev(11, "C", {"made": _arts("S_B", "S_A")}, fp={"B": "b2", "C": "c3", "A": "a2", "S_B": "b2",
                                             "S_A": "a2"}),
    _ev(12, "C", {"removed": _arts("A")}, fp={"B": "b2", "C": "c3", "S_B": "b2", "S_A": "a2"}),
    _ev(14, "B", {"removed": _arts("S_B", "S_A"), "merged": _arts("C")}, fp={"B": "c3"}),
]


def _present(cells: list[str]) -> list[bool]:
    return ["██" in c for c in cells]


def test_lanes_show_each_artifact_only_while_it_exists() -> None:
    rows = lane_rows(RUN, EVENTS)
    assert _present(rows["vm01/disk0 B"]) == [True] * 9
    assert _present(rows["vm01/disk0 C"]) == [False, False, True, True, True, True, True, True,
                                              False]
    assert _present(rows["vm01/disk0 A"]) == [False, False, False, True, True, True, True, False,
                                              False]
    assert _present(rows["vm01/disk0 S_A"]) == [False] * 6 + [True, True, False]


def test_lanes_mark_changes_freeze_and_writes() -> None:
    rows = lane_rows(RUN, EVENTS)
    changed_a = ["*" in c for c in rows["vm01/disk0 A"]]
    assert changed_a[5] and not changed_a[6], "auto-recovery (step 10) changed A, step 11 not"
    assert ["❄" in c for c in rows["vm01 guest"]] == [False, True, True, True] + [False] * 5
    assert ["C" in c for c in rows["vm01/disk0 writes"]] == [False] * 2 + [True] * 6 + [False]


def test_render_explain_records_an_svg(tmp_path: Path) -> None:
    con = Console(record=True, width=160, file=io.StringIO())
    render_explain(RUN, EVENTS, con)
    svg = tmp_path / "x.svg"
    con.save_svg(str(svg))
    text = svg.read_text()
    assert text.startswith("<svg") and "exists" in text and "after" in text


def test_kernel_note_names_this_disks_devices() -> None:
    from hvlab.report.explain import kernel_note

    ev = _ev(5, "C")
    ev.devices_created = ["hvlab_t-vm01_disk0_c_r1", "hvlab_t-vm01_disk1_c_r1", "loop3"]
    ev.devices_removed = ["hvlab_t_ar_vm01_disk0"]
    assert kernel_note(ev, "vm01", "disk0") == "+vm01_disk0_c_r1 -ar_vm01_disk0"
    assert kernel_note(_ev(5, "C"), "vm01", "disk0") == ""


def test_a_vms_writes_lane_holds_between_its_own_steps() -> None:
    # A VM's step records its own disks only: vm02's lane is B until its step 5, C after,
    # also through vm01's steps, which say nothing of vm02.
    d = RUN.to_dict()
    d["vms"] = ["vm01", "vm02"]
    d["vm"]["vm02"] = d["vm"]["vm01"]
    run = Run.from_dict(d)

    def ev(step: int, vm: str | None, writes: dict[str, str]) -> Event:
        return Event(run="r1", step=step, name="", vm=vm, start=0.0, end=0.0,
                     writes_to={k: {"artifact": v} for k, v in writes.items()})

    events = [ev(5, "vm01", {"vm01/disk0": "C"}), ev(5, "vm02", {"vm02/disk0": "C"}),
              ev(14, None, {"vm01/disk0": "B", "vm02/disk0": "B"})]
    rows = lane_rows(run, events)
    assert [c.count("C") for c in rows["vm02/disk0 writes"]] == [0, 1, 0]
    assert ["B" in c for c in rows["vm02/disk0 writes"]] == [True, False, True]
    assert ["C" in c for c in rows["vm01/disk0 writes"]] == [True, True, False]
