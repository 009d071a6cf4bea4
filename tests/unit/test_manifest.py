"""The backup manifest as restore and verify read it: a missing field or one of the wrong type
is one line naming the manifest and the field (exit 2), never a KeyError or TypeError; the
image checks say which image is bad and why."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from hvlab.backup import manifest
from hvlab.backup.restore import check_images, image_problems
from hvlab.errors import BadInput
from hvlab.lab.paths import Names

SHA = hashlib.sha256(b"").hexdigest()
GOOD: dict[str, Any] = {
    "version": 1, "lab": "t", "run": "r20250101120000abcd", "mode": "full", "created": 1.0,
    "vms": [{"name": "vm01", "profile": "windows", "consistency": "application-consistent",
             "disks": [{"name": "disk0", "fs": "ext4", "size": 67108864, "image": "vm01_disk0.img",
                        "sha256": SHA, "block_bytes": 65536},
                       {"name": "disk1", "fs": "xfs", "size": 314572800,
                        "image": "vm01_disk1.img", "sha256": SHA, "block_bytes": 65536}]}],
    "events": [],
}


def test_a_good_manifest_passes() -> None:
    assert manifest.check(copy.deepcopy(GOOD), Path("/b/manifest.json")) == GOOD


def _at(path: str) -> tuple[list[str | int], str | int]:
    parts: list[str | int] = [int(p) if p.isdigit() else p for p in path.split(".")]
    return parts[:-1], parts[-1]


def _mutated(path: str, value: Any) -> dict[str, Any]:
    """GOOD with one field set (or removed when value is DROP)."""
    d = copy.deepcopy(GOOD)
    parents, last = _at(path)
    node: Any = d
    for p in parents:
        node = node[p]
    if value is DROP:
        del node[last]
    else:
        node[last] = value
    return d


DROP = object()
BAD: list[tuple[str, Any, str]] = [
    ("lab", DROP, "lab is missing"),
    ("lab", 3, "lab is 3"),
    ("lab", "Bad_Lab", "lab is 'Bad_Lab'"),
    ("run", DROP, "run is missing"),
    ("run", None, "run is None"),
    ("run", "r1/../x", "run is 'r1/../x'"),
    ("vms", DROP, "vms is missing"),
    ("vms", {}, "vms is {}"),
    ("vms", [], "vms is []"),
    ("vms", "vm01", "vms is 'vm01'"),
    ("vms.0", "vm01", "vms[0] is 'vm01'"),
    ("vms.0.name", DROP, "vms[0].name is missing"),
    ("vms.0.name", ["vm01"], "vms[0].name is ['vm01']"),
    ("vms.0.consistency", DROP, "vms[0].consistency is missing"),
    ("vms.0.consistency", "very-consistent", "vms[0].consistency is 'very-consistent'"),
    ("vms.0.consistency", None, "vms[0].consistency is None"),
    ("vms.0.disks", DROP, "vms[0].disks is missing"),
    ("vms.0.disks", [], "vms[0].disks is []"),
    ("vms.0.disks", {"name": "disk0"}, "vms[0].disks is {'name': 'disk0'}"),
    ("vms.0.disks.0", 7, "vms[0].disks[0] is 7"),
    ("vms.0.disks.0.name", DROP, "vms[0].disks[0].name is missing"),
    ("vms.0.disks.0.name", "disk1", "a disk name not already in this VM"),
    ("vms.0.disks.0.name", "d_0", "vms[0].disks[0].name is 'd_0'"),
    ("vms.0.disks.0.name", "tmeta", "vms[0].disks[0].name is 'tmeta'"),
    ("vms.0.disks.0.fs", "ntfs", "vms[0].disks[0].fs is 'ntfs'"),
    ("vms.0.disks.0.fs", DROP, "vms[0].disks[0].fs is missing"),
    ("vms.0.disks.0.size", "64M", "vms[0].disks[0].size is '64M'"),
    ("vms.0.disks.0.size", -512, "vms[0].disks[0].size is -512"),
    ("vms.0.disks.0.size", 1000, "vms[0].disks[0].size is 1000"),
    ("vms.0.disks.0.size", True, "vms[0].disks[0].size is True"),
    ("vms.0.disks.0.size", 1.5e9, "vms[0].disks[0].size is 1500000000.0"),
    ("vms.0.disks.0.image", DROP, "vms[0].disks[0].image is missing"),
    ("vms.0.disks.0.image", None, "vms[0].disks[0].image is None"),
    ("vms.0.disks.0.image", "../../etc/shadow", "vms[0].disks[0].image is '../../etc/shadow'"),
    ("vms.0.disks.0.image", "/etc/shadow", "vms[0].disks[0].image is '/etc/shadow'"),
    ("vms.0.disks.0.image", "..", "vms[0].disks[0].image is '..'"),
    ("vms.0.disks.0.image", "", "vms[0].disks[0].image is ''"),
    ("vms.0.disks.0.image", "manifest.json", "vms[0].disks[0].image is 'manifest.json'"),
    ("vms.0.disks.0.sha256", DROP, "vms[0].disks[0].sha256 is missing"),
    ("vms.0.disks.0.sha256", "abc", "vms[0].disks[0].sha256 is 'abc'"),
    ("vms.0.disks.0.sha256", SHA.upper(), "vms[0].disks[0].sha256 is"),
    ("vms.0.disks.0.sha256", 0, "vms[0].disks[0].sha256 is 0"),
    ("vms.0.disks.0.block_bytes", DROP, "vms[0].disks[0].block_bytes is missing"),
    ("vms.0.disks.0.block_bytes", 0, "vms[0].disks[0].block_bytes is 0"),
    ("vms.0.disks.0.block_bytes", "65536", "vms[0].disks[0].block_bytes is '65536'"),
]


@pytest.mark.parametrize(("path", "value", "message"), BAD,
                         ids=[f"{p}={'DROP' if v is DROP else repr(v)}"[:50] for p, v, _ in BAD])
def test_a_bad_field_is_one_line_naming_it(path: str, value: Any, message: str) -> None:
    with pytest.raises(BadInput) as info:
        manifest.check(_mutated(path, value), Path("/b/manifest.json"))
    text = str(info.value)
    assert text.startswith("malformed manifest /b/manifest.json: ") and message in text, text
    assert "\n" not in text and len(text) < 400


@pytest.mark.parametrize("data", [None, [], "manifest", 3, [GOOD]])
def test_a_manifest_that_is_no_object(data: Any) -> None:
    with pytest.raises(BadInput, match="the manifest is"):
        manifest.check(data, Path("/b/manifest.json"))


def test_huge_values_are_cut_in_the_message() -> None:
    with pytest.raises(BadInput) as info:
        manifest.check(_mutated("run", "x" * 100000), Path("/b/manifest.json"))
    assert len(str(info.value)) < 300


@pytest.mark.parametrize(("content", "message"), [
    (b"{not json", "unreadable manifest"),
    (b"\xff\xfe\x00garbage", "unreadable manifest"),
    (b"[" * 100000 + b"]" * 100000, "unreadable manifest"),
    (b"[]", "the manifest is []"),
    (json.dumps({"lab": "t", "run": "r1", "vms": [{"name": "vm01"}]}).encode(),
     "vms[0].consistency is missing"),
])
def test_locate_reads_a_bad_manifest_as_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 content: bytes, message: str) -> None:
    monkeypatch.setenv("HVLAB_HOME", str(tmp_path / "home"))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "manifest.json").write_bytes(content)
    with pytest.raises(BadInput, match=message.replace("[", r"\[")) as info:
        manifest.locate(Names("t"), str(tmp_path / "b"))
    assert "\n" not in str(info.value)


def _backup(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    b = tmp_path / "b"
    b.mkdir()
    vm = copy.deepcopy(GOOD["vms"][0])
    for d in vm["disks"]:
        data = bytes(range(256)) * 4 + bytes(1 << 16)
        (b / d["image"]).write_bytes(data)
        d["size"], d["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    return b, vm


def test_image_checks_name_the_damaged_image(tmp_path: Path) -> None:
    b, vm = _backup(tmp_path)
    assert all(c["ok"] and c["problem"] is None for c in check_images(b, vm))
    img = b / vm["disks"][1]["image"]
    raw = bytearray(img.read_bytes())
    raw[100] ^= 0x01  # one flipped bit
    img.write_bytes(bytes(raw))
    checks = check_images(b, vm)
    assert [c["ok"] for c in checks] == [True, False]
    assert checks[1]["problem"] == "checksum mismatch"
    assert image_problems(checks) == f"{img}: checksum mismatch"


@pytest.mark.parametrize(("damage", "problem"), [
    (lambda p: p.unlink(), "missing"),
    (lambda p: (p.unlink(), p.mkdir()), "not a regular file"),
    (lambda p: (p.unlink(), p.symlink_to("/etc/passwd")), "not a regular file"),
    (lambda p: p.write_bytes(p.read_bytes() + b"x"), "size"),
])
def test_image_checks_other_damage(tmp_path: Path, damage: Any, problem: str) -> None:
    b, vm = _backup(tmp_path)
    damage(b / vm["disks"][0]["image"])
    checks = check_images(b, vm)
    assert not checks[0]["ok"] and problem in checks[0]["problem"] and checks[1]["ok"]
