"""Lab definitions: every bad input is one clear BadInput naming the value and the rule."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from hvlab.errors import BadInput
from hvlab.lab import definition
from hvlab.lab.definition import LabDef
from hvlab_fixtures.plugin import TEST_LAB


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


# --- issue 9: every field wrong in type, range, charset and length ----------------------------
def _set(path: str, value: Any) -> Any:
    """A mutation of TEST_LAB: 'lab.name', 'vm.0.name', 'vm.0.disk.1.size', 'vm.0.workload.seed'."""
    def mutate(d: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = d
        for p in parents:
            node = node[int(p)] if p.isdigit() else node.setdefault(p, {})
        node[last] = value
    return mutate


BAD_FIELDS: list[tuple[str, Any, str]] = [
    # [lab] name: type, charset, length, a trailing newline, the backups folder
    ("lab.name", 7, "invalid lab name 7"),
    ("lab.name", True, "invalid lab name True"),
    ("lab.name", ["t"], "invalid lab name ['t']"),
    ("lab.name", "", "invalid lab name ''"),
    ("lab.name", "t1\n", "invalid lab name 't1\\n'"),
    ("lab.name", "t1\r\n", "invalid lab name"),
    ("lab.name", "\nt1", "invalid lab name"),
    ("lab.name", "t 1", "invalid lab name"),
    ("lab.name", "T1", "invalid lab name"),
    ("lab.name", "t\x00", "invalid lab name"),
    ("lab.name", "t\u0661", "invalid lab name"),  # an Arabic-Indic digit is not [0-9]
    ("lab.name", "a" * 13, "invalid lab name"),
    ("lab.name", "a" * 10000, "invalid lab name"),
    ("lab.name", "backups", "reserved for the backups folder"),
    # backing_size: type, range, overflow, nonsense
    ("lab.backing_size", 1.5, "invalid size 1.5"),
    ("lab.backing_size", True, "invalid size True"),
    ("lab.backing_size", [4], "invalid size [4]"),
    ("lab.backing_size", "inf", "invalid size 'inf'"),
    ("lab.backing_size", "-inf", "invalid size '-inf'"),
    ("lab.backing_size", "nan", "invalid size 'nan'"),
    ("lab.backing_size", "1e400", "invalid size '1e400'"),
    ("lab.backing_size", "1e3G", "invalid size '1e3G'"),
    ("lab.backing_size", "1_000M", "invalid size '1_000M'"),
    ("lab.backing_size", "4G\n", "invalid size '4G\\n'"),
    ("lab.backing_size", "4 G", "invalid size '4 G'"),
    ("lab.backing_size", "9" * 400, "out of range"),
    ("lab.backing_size", "-1", "invalid size '-1'"),
    ("lab.backing_size", -1, "out of range"),
    ("lab.backing_size", 0, "out of range"),
    ("lab.backing_size", "2T", "out of range"),
    # backing_files
    ("lab.backing_files", "2", "invalid backing_files '2'"),
    ("lab.backing_files", 1.0, "invalid backing_files 1.0"),
    ("lab.backing_files", True, "invalid backing_files True"),
    ("lab.backing_files", 9, "invalid backing_files 9"),
    ("lab.backing_files", -1, "invalid backing_files -1"),
    # VM name: type, charset, length, newline, LVM's reserved names, the lab's own objects
    ("vm.0.name", None, "missing VM name"),
    ("vm.0.name", 1, "invalid VM name 1"),
    ("vm.0.name", "vm1\n", "invalid VM name 'vm1\\n'"),
    ("vm.0.name", "vm_1", "invalid VM name 'vm_1'"),
    ("vm.0.name", "vm-1", "invalid VM name 'vm-1'"),
    ("vm.0.name", "vm.1", "invalid VM name 'vm.1'"),
    ("vm.0.name", "v" * 13, "invalid VM name"),
    ("vm.0.name", "pool", "invalid VM name 'pool'"),
    ("vm.0.name", "pvmove", "invalid VM name 'pvmove'"),
    ("vm.0.name", "pvmove0", "invalid VM name 'pvmove0'"),
    ("vm.0.name", "snapshot", "invalid VM name 'snapshot'"),
    ("vm.0.name", "snapshot1", "invalid VM name 'snapshot1'"),
    ("vm.0.name", "vfy0a1b2c", "invalid VM name 'vfy0a1b2c'"),
    # profile
    ("vm.0.profile", 1, "invalid profile 1"),
    ("vm.0.profile", "Windows", "invalid profile 'Windows'"),
    ("vm.0.profile", "windows\n", "invalid profile 'windows\\n'"),
    ("vm.0.profile", ["windows"], "invalid profile ['windows']"),
    # disk list
    ("vm.0.disk", {"name": "disk0"}, "malformed lab file: disk of VM vm01 must be"),
    ("vm.0.disk", ["disk0"], "disk #1 of vm01 must be a table"),
    ("vm.0.disk", [{"name": f"d{i}", "size": "16M"} for i in range(65)], "at most 64 disks"),
    # disk name: type, charset, length, newline, LVM's reserved component names
    ("vm.0.disk.0.name", None, "missing disk name"),
    ("vm.0.disk.0.name", 0, "invalid disk name 0"),
    ("vm.0.disk.0.name", "disk0\n", "invalid disk name 'disk0\\n'"),
    ("vm.0.disk.0.name", "d" * 13, "invalid disk name"),
    ("vm.0.disk.0.name", "tmeta", "invalid disk name 'tmeta'"),
    ("vm.0.disk.0.name", "tdata", "invalid disk name 'tdata'"),
    ("vm.0.disk.0.name", "rimage", "invalid disk name 'rimage'"),
    ("vm.0.disk.0.name", "rimage0", "invalid disk name 'rimage0'"),
    ("vm.0.disk.0.name", "rmeta1", "invalid disk name 'rmeta1'"),
    ("vm.0.disk.0.name", "mimage", "invalid disk name 'mimage'"),
    ("vm.0.disk.0.name", "mlog", "invalid disk name 'mlog'"),
    ("vm.0.disk.0.name", "pmspare", "invalid disk name 'pmspare'"),
    ("vm.0.disk.0.name", "cdata", "invalid disk name 'cdata'"),
    ("vm.0.disk.0.name", "cmeta", "invalid disk name 'cmeta'"),
    ("vm.0.disk.0.name", "corig", "invalid disk name 'corig'"),
    ("vm.0.disk.0.name", "vdata", "invalid disk name 'vdata'"),
    ("vm.0.disk.0.name", "vorigin", "invalid disk name 'vorigin'"),
    # disk size: type, range, overflow, sector alignment
    ("vm.0.disk.0.size", "inf", "invalid size 'inf' for vm01/disk0"),
    ("vm.0.disk.0.size", "1e400", "invalid size '1e400' for vm01/disk0"),
    ("vm.0.disk.0.size", "Infinity", "invalid size 'Infinity'"),
    ("vm.0.disk.0.size", "NaN", "invalid size 'NaN'"),
    ("vm.0.disk.0.size", float("inf"), "invalid size inf"),
    ("vm.0.disk.0.size", float("nan"), "invalid size nan"),
    ("vm.0.disk.0.size", 64.0, "invalid size 64.0"),
    ("vm.0.disk.0.size", {}, "invalid size {}"),
    ("vm.0.disk.0.size", -(64 << 20), "below the ext4 minimum"),
    ("vm.0.disk.0.size", 0, "below the ext4 minimum"),
    ("vm.0.disk.0.size", (64 << 20) + 1, "not a multiple of 512"),
    ("vm.0.disk.0.size", "64.1M", "not a multiple of 512"),
    ("vm.0.disk.0.size", 1 << 63, "beyond the backing size"),
    # fs
    ("vm.0.disk.0.fs", "EXT4", "invalid filesystem 'EXT4'"),
    ("vm.0.disk.0.fs", 4, "invalid filesystem 4"),
    ("vm.0.disk.0.fs", ["ext4"], "invalid filesystem ['ext4']"),
    # workload knobs: type and range
    ("vm.0.workload.ops_per_s", "10", "invalid workload ops_per_s '10'"),
    ("vm.0.workload.ops_per_s", True, "invalid workload ops_per_s True"),
    ("vm.0.workload.ops_per_s", float("inf"), "invalid workload ops_per_s inf"),
    ("vm.0.workload.ops_per_s", float("nan"), "invalid workload ops_per_s nan"),
    ("vm.0.workload.ops_per_s", 10001, "invalid workload ops_per_s 10001"),
    ("vm.0.workload.append_ops_per_s", -1, "invalid workload append_ops_per_s -1"),
    ("vm.0.workload.scratch_ops_per_s", 1e9, "invalid workload scratch_ops_per_s"),
    ("vm.0.workload.value_size", 0, "invalid workload value_size 0"),
    ("vm.0.workload.value_size", 4097, "invalid workload value_size 4097"),
    ("vm.0.workload.value_size", 64.0, "invalid workload value_size 64.0"),
    ("vm.0.workload.seed", -1, "invalid workload seed -1"),
    ("vm.0.workload.seed", 1.5, "invalid workload seed 1.5"),
    ("vm.0.workload.seed", 1 << 63, "invalid workload seed 9223372036854775808"),
    ("vm.0.workload.paused", "yes", "invalid workload paused 'yes'"),
    ("vm.0.workload.paused", 0, "invalid workload paused 0"),
    # structure
    ("lab", "hvlab", "[lab] must be a table"),
    ("vm", {"name": "vm01"}, "at least one [[vm]]"),
    ("vm", [f"vm{i}" for i in range(2)], "vm #1 must be a table"),
    ("vm", [{"name": f"vm{i}", "disk": [{"name": "d0"}]} for i in range(65)], "at most 64 VMs"),
]


@pytest.mark.parametrize(("path", "value", "message"), BAD_FIELDS,
                         ids=[f"{p}={v!r}"[:60] for p, v, _ in BAD_FIELDS])
def test_every_bad_field_is_one_line_naming_it(path: str, value: Any, message: str) -> None:
    d = copy.deepcopy(TEST_LAB)
    _set(path, value)(d)
    with pytest.raises(BadInput) as info:
        definition.parse(d)
    text = str(info.value)
    assert message in text
    assert "\n" not in text and "\r" not in text and len(text) < 400


def test_disk_sizes_count_against_lvm_sectors() -> None:
    d = copy.deepcopy(TEST_LAB)
    _set("vm.0.disk.0.size", (64 << 20) + 1)(d)
    with pytest.raises(BadInput, match=r"use 67108864 or 67109376"):
        definition.parse(d)


@pytest.mark.parametrize("flag", ["inf", "1e400", "nan", "-inf", "4G\n"])
def test_backing_size_flag_overflow_is_bad_input(flag: str) -> None:
    with pytest.raises(BadInput, match="invalid size"):
        definition.parse(TEST_LAB, backing_size=flag)


@pytest.mark.parametrize("name", ["t1\n", "t1\r", "pool\n", "backups"])
def test_bad_lab_name_flags(name: str) -> None:
    with pytest.raises(BadInput, match="lab name"):
        definition.parse(TEST_LAB, name=name)


@pytest.mark.parametrize("name", ["pool", "snapshot1", "pvmove", "vm1\n", "vfy012abc"])
def test_check_name_refuses_reserved_vm_names(name: str) -> None:
    with pytest.raises(BadInput, match="invalid VM name"):
        definition.check_name("VM", name)


@pytest.mark.parametrize("name", ["pools", "apool", "snapshoe", "pvmov", "vm01", "tmeta",
                                  "vfy", "vfy0a1b2", "vfyserver"])
def test_fine_vm_names(name: str) -> None:
    assert definition.check_name("VM", name) == name


@pytest.mark.parametrize("name", ["disk0", "meta", "data", "atmeta", "image", "rim", "log"])
def test_fine_disk_names(name: str) -> None:
    assert definition.check_name("disk", name) == name


# lvm2's apply_lvname_restrictions (lib/misc/lvm-string.c), written out independently of the
# code under test, and the names of LVs LVM makes itself in a VG with a thin pool
LVM_PREFIXES = ("pvmove", "snapshot")
LVM_STRINGS = ("_cdata", "_cmeta", "_corig", "_mimage", "_mlog", "_pmspare", "_rimage",
               "_rmeta", "_tdata", "_tmeta", "_vdata", "_vorigin")
CANDIDATES = sorted({"vm01", "disk0", "pool", "pools", "lvol0", "c", "a", "sb", "sa", "ctl",
                     "ar", "vfy", "vfy0a1b2c", "tpool", "real", "cow",
                     *LVM_PREFIXES, *(p + "1" for p in LVM_PREFIXES),
                     *(s[1:] for s in LVM_STRINGS), *(s[1:] + "0" for s in LVM_STRINGS),
                     *("x" + s[1:] for s in LVM_STRINGS), "meta0", "tdata0", "tmeta"})


def test_accepted_names_make_only_names_lvm_and_the_lab_allow() -> None:
    """Every (VM, disk) pair the validation accepts: the LVs the lab and a backup run make
    (B, C, A, S_B, S_A) and its controller and auto-recovery devices pass LVM's rules, and
    none equals an LV LVM or the lab makes for itself."""
    from hvlab.lab.paths import KIND, Names

    names = Names("t")
    lvm_own = {"pool", "pool_tdata", "pool_tmeta", "lvol0_pmspare",
               *(f"pool_meta{i}" for i in range(10))}
    accepted = 0
    for vm in CANDIDATES:
        for disk in CANDIDATES:
            try:
                definition.check_name("VM", vm)
                definition.check_name("disk", disk)
            except BadInput:
                continue
            accepted += 1
            lvs = [names.lv(vm, disk), *(names.artifact_lv(vm, disk, a, "r20250101000000abcd")
                                         for a in KIND)]
            for lv in lvs:
                assert not lv.startswith(LVM_PREFIXES), (vm, disk, lv)
                assert not any(s in lv for s in LVM_STRINGS), (vm, disk, lv)
                assert lv not in lvm_own, (vm, disk, lv)
                assert len(lv) < 128
            for dev in (names.ctl(vm, disk), names.ar_ctl(vm, disk),
                        names.dm_lv_name(names.lv(vm, disk))):
                assert len(dev) < 128 and dev.startswith(names.dm_prefixes)
    assert accepted > 20


@pytest.mark.parametrize(("content", "message"), [
    (b"\xff\xfe\x00\x00binary\x00\x01\x02", "not UTF-8"),
    ('[lab]\nname = "caf\xe9"\n'.encode("latin-1"), "not UTF-8"),
    (b"\x00" * 64, "malformed lab file"),
    ("[lab]\nname = \"t\"\n".encode("utf-16"), "not UTF-8"),
])
def test_lab_file_that_is_not_utf8_is_one_line(tmp_path: Any, content: bytes,
                                               message: str) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_bytes(content)
    with pytest.raises(BadInput, match=message) as info:
        definition.load(bad)
    assert "\n" not in str(info.value)


def test_lab_file_too_big_or_not_a_file(tmp_path: Any) -> None:
    big = tmp_path / "big.toml"
    big.write_text("#" * (2 << 20))
    with pytest.raises(BadInput, match="too large"):
        definition.load(big)
    with pytest.raises(BadInput, match="not a regular file"):
        definition.load(tmp_path)
    import os

    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    with pytest.raises(BadInput, match="not a regular file"):
        definition.load(fifo)  # must not block waiting for a writer
