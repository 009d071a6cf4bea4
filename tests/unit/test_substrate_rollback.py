"""`hvlab up` rolls back what it made when a step fails, on both paths (a new lab, a restart
of a stopped one), and says what the rollback could not undo."""

from __future__ import annotations

from pathlib import Path

import pytest

from hvlab.errors import CommandError, HvlabError
from hvlab.lab import definition, substrate
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
    msg = str(info.value)
    assert "pvcreate failed" in msg and "rollback left" in msg
    assert "detach /dev/loop97" in msg and "Device or resource busy" in msg
    assert undone == ["/dev/loop97"]
    assert isinstance(info.value.__cause__, CommandError)


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
    msg = str(info.value)
    assert "pvcreate failed" in msg and "rollback left" in msg
    assert "detach /dev/loop97" in msg and "Device or resource busy" in msg
    assert undone == ["/dev/loop97"]
    assert isinstance(info.value.__cause__, CommandError)


def test_a_clean_rollback_reraises_the_original_error(home: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def attach(st: State, names: Names, undo: substrate._Undo) -> list[str]:
        undo.push("detach /dev/loop97", lambda: None)
        raise CommandError(["pvcreate", "/dev/loop97"], 5, "pvcreate: cannot use /dev/loop97")

    monkeypatch.setattr(substrate, "_attach_all", attach)
    with pytest.raises(CommandError, match="pvcreate failed"):
        substrate.up(definition.parse(LAB), start_guests=False)
    assert not Names("rb").dir.exists()  # the new lab's directory went with the rollback
