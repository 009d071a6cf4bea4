"""Incremental chains' pure parts: when a disk gets an incremental and why not, what
thin_delta's answer means for the read, and the links a restore follows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hvlab.backup import chain, thinmeta
from hvlab.lab.paths import REFERENCE_TAG
from hvlab.sys.lvm import LvRow

REF = "vm01_disk0_ref_r1"


def _row(name: str, *tags: str, active: bool = True) -> LvRow:
    return LvRow(name=name, attr="", origin="", pool="pool", tags=frozenset(tags),
                 major=253 if active else None, minor=1 if active else None, thin_id=7)


def _rec(tmp_path: Path, **over: Any) -> dict[str, Any]:
    (tmp_path / "manifest.json").write_text('{"run": "r1"}')
    return {"generation": "g1", "run": "r1", "dest": str(tmp_path), "size": 1 << 26,
            "reference": REF, **over}


def _rows(*tags: str) -> dict[str, LvRow]:
    return {REF: _row(REF, REFERENCE_TAG, "vm_vm01", "disk_disk0", *tags)}


def test_incremental_when_every_link_holds(tmp_path: Path) -> None:
    p = chain.decide(_rec(tmp_path), _rows("gen_g1"), 1 << 26, True)
    assert (p.kind, p.generation, p.reference) == ("incremental", "g1", REF)
    assert p.parent == {"run": "r1", "dest": str(tmp_path)}


@pytest.mark.parametrize("case, why", [
    ("not asked", "not asked"),
    ("new disk", "no earlier backup of this disk"),
    ("lost", "is gone"),
    ("foreign", "belongs to another chain (generation g9, the chain's is g1)"),
    ("resized", "size changed from 67108864 to 134217728"),
    ("backup gone", "last backup (r1"),
])
def test_full_and_why(tmp_path: Path, case: str, why: str) -> None:
    rec: dict[str, Any] | None = _rec(tmp_path)
    rows, size, wanted = _rows("gen_g1"), 1 << 26, True
    if case == "not asked":
        wanted = False
    elif case == "new disk":
        rec = None
    elif case == "lost":
        rows = {}
    elif case == "foreign":
        rows = _rows("gen_g9")
    elif case == "resized":
        size = 1 << 27
    else:
        (tmp_path / "manifest.json").unlink()
    p = chain.decide(rec, rows, size, wanted)
    assert p.kind == "full" and why in p.reason
    # a full in a chain starts a new generation; a plain full starts none
    assert (p.generation is None) == (case == "not asked") and p.generation != "g1"


def test_changed_from_thin_delta() -> None:
    read, gone = chain.changed({"different": [(4, 2)], "right_only": [(6, 1), (0, 1)],
                                "left_only": [(9, 3)], "same": [(1, 3)]})
    assert read == [(0, 1), (4, 3)] and gone == [(9, 3)]


def test_links_follow_parents_to_the_full(tmp_path: Path) -> None:
    def man(run: str, kind: str, parent: str | None, gen: str = "g1") -> dict[str, Any]:
        c = {"kind": kind, "generation": gen,
             "parent": {"run": parent, "dest": str(tmp_path / parent)} if parent else None}
        return {"run": run, "vms": [{"name": "vm01", "disks": [{"name": "disk0", "chain": c}]},
                                    {"name": "vm02", "disks": [{"name": "disk0", "chain": None}]}]}

    mans = {"f": man("f", "full", None), "i1": man("i1", "incremental", "f"),
            "i2": man("i2", "incremental", "i1")}
    links = chain.links_of(tmp_path / "i2", "vm01", "disk0", lambda p: mans[p.name])
    assert [p.name for p, _ in links] == ["f", "i1", "i2"]
    # a parent folder that now holds another run, or another chain, is refused
    mans["f"] = man("x", "full", None)
    with pytest.raises(ValueError, match=r"holds run x .*not the parent f"):
        chain.links_of(tmp_path / "i2", "vm01", "disk0", lambda p: mans[p.name])
    mans["f"] = man("f", "full", None, gen="g2")
    with pytest.raises(ValueError, match="generation g2"):
        chain.links_of(tmp_path / "i2", "vm01", "disk0", lambda p: mans[p.name])
    mans["f"] = man("f", "incremental", "i2")  # a loop is refused, never followed forever
    with pytest.raises(ValueError, match="loops"):
        chain.links_of(tmp_path / "i2", "vm01", "disk0", lambda p: mans[p.name])
    with pytest.raises(ValueError, match="no disk vm03/disk0"):
        chain.links_of(tmp_path / "i2", "vm03", "disk0", lambda p: mans[p.name])


def test_delta_from_a_dump_says_what_thin_delta_says() -> None:
    # virtual -> data: 0-2 shared, 3 remapped, 4-5 only left, 7 only right, 9 remapped
    left = [(0, 10), (1, 11), (2, 12), (3, 13), (4, 14), (5, 15), (9, 19)]
    right = [(0, 10), (1, 11), (2, 12), (3, 23), (7, 27), (9, 29)]
    dump: thinmeta.Dump = (65536, {1: left, 2: right})
    assert thinmeta.delta_in(dump, 1, 2) == {"different": [(3, 1), (9, 1)],
                                             "left_only": [(4, 2)], "right_only": [(7, 1)]}
    assert thinmeta.delta_in(dump, 1, 1) == {"different": [], "left_only": [],
                                             "right_only": []}
    assert thinmeta.delta_in(dump, 1, 3)["left_only"] == [(0, 6), (9, 1)]  # 3: no such device
