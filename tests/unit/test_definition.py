"""Lab definitions: every bad input is one clear BadInput naming the value and the rule."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from hvlab.errors import BadInput
from hvlab.fixtures.plugin import TEST_LAB
from hvlab.lab import definition
from hvlab.lab.definition import LabDef


def doc(**changes: Any) -> dict[str, Any]:
    d = copy.deepcopy(TEST_LAB)
    d.update(changes)
    return d


def test_default_lab_has_two_vms_and_three_disks() -> None:
    defn = definition.load()
    assert [v.name for v in defn.vms] == ["vm01", "vm02"]
    assert len(defn.disks()) == 3
    assert {d.fs for _, d in defn.disks()} == {"ext4", "xfs"}


def test_round_trip_through_state_dict() -> None:
    defn = definition.parse(TEST_LAB)
    assert LabDef.from_dict(defn.to_dict()) == defn


def test_workload_knobs_reach_the_guest_config() -> None:
    from hvlab.lab import guests
    from hvlab.lab.paths import Names

    d = copy.deepcopy(TEST_LAB)
    d["vm"][0]["workload"] = {"ops_per_s": 25, "seed": 3, "paused": True}
    defn = definition.parse(d)
    assert LabDef.from_dict(defn.to_dict()) == defn
    cfg = guests.config_for(defn, Names(defn.name), d["vm"][0]["name"])
    assert cfg["workload"] == {"ops_per_s": 25, "seed": 3, "paused": True}


def test_flags_override_file() -> None:
    defn = definition.parse(TEST_LAB, name="other", backing_size="2G")
    assert defn.name == "other" and defn.backing_size == 2 << 30


@pytest.mark.parametrize("name", ["", "A", "1abc", "a_b", "a-b", "a.b", "x" * 13, "ü"])
def test_bad_lab_names(name: str) -> None:
    with pytest.raises(BadInput, match="invalid lab name"):
        definition.parse(TEST_LAB, name=name)


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: d["vm"].append(copy.deepcopy(d["vm"][0])), "duplicate VM name 'vm01'"),
    (lambda d: d["vm"][0]["disk"].append(dict(d["vm"][0]["disk"][0])),
     "duplicate disk name 'disk0'"),
    (lambda d: d["vm"][0].update(name="VM-1"), "invalid VM name"),
    (lambda d: d["vm"][0]["disk"][0].update(name="d_0"), "invalid disk name"),
    (lambda d: d["vm"][0]["disk"][0].update(size="1M"), "below the ext4 minimum"),
    (lambda d: d["vm"][0]["disk"][1].update(size="100M"), "below the xfs minimum"),
    (lambda d: d["vm"][0]["disk"][0].update(size="5G"), "beyond the backing size"),
    (lambda d: d["vm"][0]["disk"][0].update(size="lots"), "invalid size 'lots'"),
    (lambda d: d["vm"][0]["disk"][0].update(fs="ntfs"), "invalid filesystem 'ntfs'"),
    (lambda d: d["vm"][0].update(profile="macos"), "invalid profile 'macos'"),
    (lambda d: d["vm"][0].update(disk=[]), "has no disks"),
    (lambda d: d.update(vm=[]), "at least one"),
    (lambda d: d["lab"].update(backing_size="1M"), "out of range"),
    (lambda d: d["lab"].update(backing_files=0), "invalid backing_files"),
    (lambda d: d["lab"].update(colour="red"), "unknown key 'colour'"),
    (lambda d: d["vm"][0].update(cpus=2), "unknown key 'cpus'"),
    (lambda d: d["vm"][0].update(workload={"ops_per_s": 0}), "invalid workload ops_per_s 0"),
    (lambda d: d["vm"][0].update(workload={"seed": "x"}), "invalid workload seed 'x'"),
    (lambda d: d["vm"][0].update(workload={"paused": 1}), "invalid workload paused 1"),
    (lambda d: d["vm"][0].update(workload={"speed": 1}), "unknown key 'speed'"),
    (lambda d: d["vm"][0].update(workload=3), "must be a table"),
])
def test_bad_definitions(mutate: Any, message: str) -> None:
    d = copy.deepcopy(TEST_LAB)
    mutate(d)
    with pytest.raises(BadInput, match=message.replace("(", r"\(")):
        definition.parse(d)


def test_malformed_toml(tmp_path: Any) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[lab\nname = 1\n")
    with pytest.raises(BadInput, match="malformed lab file"):
        definition.load(bad)


def test_missing_file(tmp_path: Any) -> None:
    with pytest.raises(BadInput, match="cannot read lab file"):
        definition.load(tmp_path / "nope.toml")


def test_error_is_one_line() -> None:
    with pytest.raises(BadInput) as info:
        definition.parse(doc(vm=[]))
    assert "\n" not in str(info.value)
