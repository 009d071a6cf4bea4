"""Unit tests (no root): the step table, the planner, thin metadata parsing, explain."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from hvlab.backup.thinmeta import merge, parse_delta, parse_dump
from hvlab.errors import BadInput
from hvlab.flow import consistency as C
from hvlab.flow import steps as S
from hvlab.lab.record import Event, Run
from hvlab.report import explain


def test_step_table_is_veeams_fourteen() -> None:
    assert [s.number for s in S.STEPS] == list(range(1, 15))
    assert {4, 5, 6, 7} == S.FREEZE_STEPS
    assert all(s.per_vm for s in S.STEPS[:10]) and not any(s.per_vm for s in S.STEPS[10:])
    assert "GUID.avhdx" in S.step(5).veeam and "external snapshot" in S.step(11).veeam
    assert all(s.lab for s in S.STEPS)


def test_plan_per_vm_then_job() -> None:
    p = S.plan(["a", "b"])
    assert p[:10] == [(n, "a") for n in range(1, 11)]
    assert p[10:20] == [(n, "b") for n in range(1, 11)]
    assert p[20:] == [(n, None) for n in range(11, 15)]


def test_pause_position() -> None:
    assert S.pause_position(["a", "b"], None) is None
    assert S.pause_position(["a", "b"], 3) == 12  # after the last VM's step 3
    assert S.pause_position(["a"], 11) == 10
    for bad in (4, 5, 6, 7):
        with pytest.raises(BadInput, match="freeze window"):
            S.pause_position(["a"], bad)
    for bad in (0, 14, 15):
        with pytest.raises(BadInput):
            S.pause_position(["a"], bad)


def test_consistency_classes() -> None:
    assert C.consistency_for("windows", True) == C.APP
    assert C.consistency_for("linux", True) == C.FS
    assert C.consistency_for("windows", False) == C.CRASH
    assert C.consistency_for("none", True) == C.CRASH


DUMP = """<superblock uuid="" time="2" transaction="3" flags="0" version="2"
 data_block_size="128" nr_data_blocks="0">
  <device dev_id="1" mapped_blocks="6">
    <range_mapping origin_begin="0" data_begin="131" length="4" time="0"/>
    <single_mapping origin_block="4" data_block="7" time="0"/>
    <single_mapping origin_block="9" data_block="8" time="0"/>
  </device>
</superblock>"""

DELTA = """<superblock uuid="" time="2" transaction="3" data_block_size="128" nr_data_blocks="0">
  <diff left="1" right="2">
    <different begin="0" length="1"/>
    <same begin="1" length="3"/>
    <right_only begin="136" length="2"/>
  </diff>
</superblock>"""


def test_parse_thin_dump_and_delta() -> None:
    bs, devs = parse_dump(DUMP)
    assert bs == 64 << 10
    assert devs[1][:5] == [(0, 131), (1, 132), (2, 133), (3, 134), (4, 7)]
    assert merge(v for v, _ in devs[1]) == [(0, 5), (9, 1)]
    d = parse_delta(DELTA)
    assert d == {"different": [(0, 1)], "left_only": [], "right_only": [(136, 2)]}


def test_explain_renders_a_timeline() -> None:
    fp = {"sha256": "ab" * 32, "mapped_blocks": 3, "thin_id": 1}
    fp2 = {"sha256": "cd" * 32, "mapped_blocks": 4, "thin_id": 2}
    run = Run.from_dict({
        "id": "r1", "lab": "t", "vms": ["vm01"], "dest": "/x", "state": "done", "created": 0,
        "vm": {"vm01": {"class": C.APP, "t0": 1.0, "profile": "windows",
                        "window": {"freeze_start": 0.5, "seconds": 0.5},
                        "disks": {"disk0": {"B": "b", "ctl": "x", "size": 1, "fs": "ext4"}}}},
        "images": {"vm01/disk0": {"file": "vm01_disk0.img", "sha256": "ef" * 32,
                                     "auto_recovery_ranges": [{"length": 65536}]}}})
    evs = [Event.from_dict(e) for e in (
        {"step": 3, "vm": "vm01", "name": "guest requestor", "start": 0, "end": 1,
         "writes_to": {"vm01/disk0": {"artifact": "B", "lv": "vm01_disk0"}},
         "fingerprints": {"vm01/disk0": {"B": fp}}},
        {"step": 5, "vm": "vm01", "name": "backup checkpoint", "start": 1, "end": 2,
         "writes_to": {"vm01/disk0": {"artifact": "C", "lv": "c"}}, "fingerprints": None},
        {"step": 8, "vm": "vm01", "name": "snapshot to HV-IC", "start": 2, "end": 3,
         "writes_to": {"vm01/disk0": {"artifact": "C", "lv": "c"}},
         "fingerprints": {"vm01/disk0": {"B": fp2, "C": fp2, "A": fp2}}},
    )]
    buf = io.StringIO()
    explain.render_explain(run, evs, Console(file=buf, width=220))
    out = buf.getvalue()
    assert "abababab/3" in out and "cdcdcdcd/4 *" in out and "~" in out
    assert "auto-recovery changed 65536 bytes" in out
    assert explain.runs_table([run]).row_count == 1
