"""`hvlab up` rolls back what it made when a step fails, on both paths (a new lab, a restart
of a stopped one), and says what the rollback could not undo."""

from __future__ import annotations

from pathlib import Path

import pytest

from hvlab.errors import CommandError, HvlabError
from hvlab.lab import definition, inventory, substrate
from hvlab.lab.paths import Names
from hvlab.lab.state import State

LAB = {"lab": {"name": "rb", "backing_size": "256M"},
       "vm": [{"name": "vm01", "profile": "none",
               "disk": [{"name": "disk0", "size": "64M", "fs": "ext4"}]}]}


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HVLAB_HOME", str(tmp_path))
    return tmp_path


def _attach_then_fail(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The loop is attached (its undo registered), then the next step fails; the undo fails
    too, as a detach of a busy loop does."""
    undone: list[str] = []

    def attach(st: State, names: Names, undo: substrate._Undo) -> list[str]:
        def detach() -> None:
            undone.append("/dev/loop97")
            raise CommandError(["losetup", "-d", "/dev/loop97"], 1,
                               "losetup: /dev/loop97: detach failed: Device or resource busy")

        undo.push("detach /dev/loop97", detach)
        raise CommandError(["pvcreate", "/dev/loop97"], 5, "pvcreate: cannot use /dev/loop97")

    monkeypatch.setattr(substrate, "_attach_all", attach)
    return undone


def test_create_reports_what_its_rollback_left(home: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    undone = _attach_then_fail(monkeypatch)
    with pytest.raises(HvlabError) as info:
        substrate.up(definition.parse(LAB), start_guests=False)
    _says_what_the_rollback_left(info.value, undone)


def _says_what_the_rollback_left(err: HvlabError, undone: list[str]) -> None:
    msg = str(err)
    assert "pvcreate failed" in msg and "rollback left" in msg
    assert "detach /dev/loop97" in msg and "Device or resource busy" in msg
    assert undone == ["/dev/loop97"]
    assert isinstance(err.__cause__, CommandError)


def test_restart_reports_what_its_rollback_left(home: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    defn = definition.parse(LAB)
    names = Names(defn.name)
    names.backing_dir.mkdir(parents=True)
    names.backing_file(0).write_bytes(b"")  # a stopped lab: its data kept, nothing attached
    State(defn, phase="stopped").save()
    undone = _attach_then_fail(monkeypatch)
    with pytest.raises(HvlabError) as info:
        substrate.up(defn, start_guests=False)
    _says_what_the_rollback_left(info.value, undone)


def test_a_clean_rollback_reraises_the_original_error(home: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def attach(st: State, names: Names, undo: substrate._Undo) -> list[str]:
        undo.push("detach /dev/loop97", lambda: None)
        raise CommandError(["pvcreate", "/dev/loop97"], 5, "pvcreate: cannot use /dev/loop97")

    monkeypatch.setattr(substrate, "_attach_all", attach)
    with pytest.raises(CommandError, match="pvcreate failed"):
        substrate.up(definition.parse(LAB), start_guests=False)
    assert not Names("rb").dir.exists()  # the new lab's directory went with the rollback


def test_dm_ownership_is_by_uuid_and_what_lies_below(home: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 9 item 6: a device is the lab's by its uuid (ours) or by LVM's uuid, the VG's
    name and nothing but the lab's loops below it (LVM's); a look-alike name is not enough."""
    from hvlab.sys import dm, loop

    names = Names("hvlab")
    devs = [
        dm.DmDevice("hvlab_hvlab_pv0", 253, 0, 1, False, "HVLAB-hvlab-pv-0"),
        dm.DmDevice("hvlab_hvlab_ctl_vm01_disk0", 253, 5, 1, False,
                    "HVLAB-hvlab-ctl-vm01-disk0"),
        dm.DmDevice("hvlab_hvlab-pool-tpool", 253, 3, 1, False, "LVM-abc-tpool"),
        dm.DmDevice("hvlab_hvlab_foreign", 253, 7, 0, False, ""),
        dm.DmDevice("hvlab_hvlab-foreign2", 253, 8, 0, False, "LVM-xyz"),
        dm.DmDevice("hvlab_hvlab_foreign3", 253, 9, 0, False, "HVLAB-other-ctl-x"),
        dm.DmDevice("hvlab_hvlab-onanotherdisk", 253, 10, 0, False, "LVM-def"),
    ]
    below = {3: {"loop0"}, 8: set(), 10: {"loop0", "sdb"}}
    monkeypatch.setattr(dm, "list_devices", lambda: devs)
    monkeypatch.setattr(dm, "leaves", lambda d: below.get(d.minor, set()))
    ours = [loop.Loop("/dev/loop0", str(names.backing_file(0)), False)]
    got = {d.name for d in inventory.owned_dm(names, ours)}
    assert got == {"hvlab_hvlab_pv0", "hvlab_hvlab_ctl_vm01_disk0", "hvlab_hvlab-pool-tpool"}
