"""A run's one `lvs` report, reused until a command may change it, and the check after an lvm
batch (which exits 0 whatever its commands did). Pure logic: the commands are recorded, not
run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hvlab.errors import CommandError
from hvlab.flow import lvmview
from hvlab.flow.context import Ctx
from hvlab.flow.lvmview import BatchFailed
from hvlab.lab.paths import Names
from hvlab.lab.record import Run
from hvlab.sys import lvm as lvm_mod
from hvlab.sys.lvm import LvRow
from hvlab.sys.run import Result


def _row(name: str, active: bool = True) -> LvRow:
    return LvRow(name, attr="Vwi-a-tz--", pool="pool", active=active,
                 major=253 if active else None, minor=1 if active else None, thin_id=1)


class FakeLab:
    """What a Ctx asks of a lab: names, an Lvm, `lvs()` (counted)."""

    def __init__(self, rows: dict[str, LvRow]) -> None:
        self.names = Names("t")
        self.lvm = lvm_mod.Lvm(Path("/nonexistent"))
        self.rows = rows
        self.reports = 0

    def lvs(self) -> dict[str, LvRow]:
        self.reports += 1
        return dict(self.rows)


REPORTED: dict[str, LvRow] = {}  # what the fake LVM shell's lvs reports


@pytest.fixture
def ran(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[str], str | None]]:
    calls: list[tuple[list[str], str | None]] = []

    def fake_run(argv: list[str], **kw: Any) -> Result:
        calls.append((list(argv), kw.get("input")))
        # A batch ends with an lvs: answer it as LVM's shell does (--nameprefixes lines).
        out = "".join(f"  LVM2_LV_NAME='{r.name}' LVM2_LV_KERNEL_MAJOR='{r.major or -1}' "
                      f"LVM2_LV_TAGS=''\n" for r in REPORTED.values())
        return Result(list(argv), 0, out, "  Volume group \"x\" has insufficient free space\n")

    monkeypatch.setattr(lvm_mod, "run", fake_run)
    return calls


def _ctx(lab: FakeLab) -> Ctx:
    run = Run(id="r1", lab="t", vms=[], dest="/b", created=0.0, vm={})
    return Ctx(lab, run)  # type: ignore[arg-type]


def test_one_report_until_a_command_changes_lvm(ran: list[Any]) -> None:
    lab = FakeLab({"b": _row("b"), "s": _row("s")})
    ctx = _ctx(lab)
    assert ctx.view.exists("b") and ctx.view.exists("s") and not ctx.view.exists("x")
    assert lab.reports == 1
    assert ctx.view.remove_lvs(["s", "x", "s"]) == ["s"]  # only what exists, once, one lvremove
    assert [a for a, _ in ran] == [["lvm", "lvremove", "-q", "-y", "hvlab_t/s"]]
    assert not ctx.view.exists("s") and lab.reports == 1  # lvremove exits 0 only when all went
    assert ctx.view.remove_lvs(["s"]) == [] and len(ran) == 1
    ctx.view.lvm("lvrename", "-q", "hvlab_t", "b", "c")  # anything else: read again when asked
    lab.rows = {"c": _row("c")}
    assert ctx.view.exists("c") and lab.reports == 2


def test_a_batch_is_checked_by_one_report_naming_what_is_missing(ran: list[Any]) -> None:
    lab = FakeLab({"b": _row("b")})
    ctx = _ctx(lab)
    cmds = [["lvcreate", "-n", "s1", "hvlab_t/b"], ["lvcreate", "-n", "s2", "hvlab_t/b"]]
    REPORTED.clear()
    REPORTED.update(lab.rows, s1=_row("s1"), s2=_row("s2", active=False))
    with pytest.raises(BatchFailed) as err:
        ctx.view.batch(cmds, present=["s1", "s2", "s3"], absent=["b"])
    msg = str(err.value)
    assert "s2 inactive" in msg and "s3 missing" in msg and "b still present" in msg
    assert "s1 " not in msg and "insufficient free space" in msg
    (argv, text), = ran  # one lvm process, fed both commands and the report after them
    lines = text.splitlines()
    assert argv == ["lvm"] and lines[:2] == [" ".join(c) for c in cmds]
    assert lines[2].startswith("lvs -a --nameprefixes") and lines[2].endswith(" hvlab_t")
    assert lab.reports == 0  # the batch's own report, no lvs process of its own
    REPORTED["s2"] = _row("s2")
    assert set(ctx.view.batch(cmds, present=["s1", "s2"])) == {"b", "s1", "s2"}
    assert ctx.view.exists("s2") and lab.reports == 0 and len(ran) == 2  # and it is kept
    REPORTED.clear()  # the shell printed no report: the lvs in it failed
    with pytest.raises(CommandError, match="printed no report"):
        ctx.view.batch(cmds)


def test_reports_do_not_invalidate(ran: list[Any]) -> None:
    seen: list[int] = []
    tracked = lvmview.TrackedLvm(Path("/nonexistent"), lambda: seen.append(1))
    tracked("lvs", "--reportformat", "json")
    assert seen == []
    tracked("lvchange", "-ay", "x")
    tracked.batch([["lvremove", "x"]])
    assert seen == [1, 1]


def test_nameprefixes_lines_parse_as_the_json_report_keys_them() -> None:
    out = ("  Logical volume \"s1\" created.\n"
           "  LVM2_LV_NAME='pool' LVM2_LV_TIME='2026-11-30 10:00:00 +0000' LVM2_THIN_ID=''\n"
           "  LVM2_LV_NAME='s1' LVM2_LV_TAGS='hvlab_t,role_base' LVM2_THIN_ID='2'\n")
    rows = lvm_mod.parse_prefixed(out)
    assert rows == [{"lv_name": "pool", "lv_time": "2026-11-30 10:00:00 +0000", "thin_id": ""},
                    {"lv_name": "s1", "lv_tags": "hvlab_t,role_base", "thin_id": "2"}]
    row = LvRow.from_report(rows[1])
    assert row.tags == {"hvlab_t", "role_base"} and row.thin_id == 2
