"""Symlinks where the lab writes or removes (issue 9): the pure checks, on plain folders.
HVLAB_HOME itself may be a symlink (resolved once); nothing below it may be. A --dest of
your own may sit below symlinks of yours, but is never one itself, never a file, never
another run's backup or inside one, and inside HVLAB_HOME only below its backups folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hvlab.errors import BadInput
from hvlab.flow import dest
from hvlab.lab import runs
from hvlab.lab.inventory import resolve_name
from hvlab.lab.paths import Names, backups_root, home, refuse_links, refuse_links_in_lab
from hvlab.sys import private


@pytest.fixture
def real(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HVLAB_HOME = tmp/home, a symlink to tmp/real (allowed); returns tmp/real."""
    (tmp_path / "real").mkdir()
    (tmp_path / "home").symlink_to(tmp_path / "real")
    monkeypatch.setenv("HVLAB_HOME", str(tmp_path / "home"))
    return tmp_path / "real"


def test_hvlab_home_is_resolved_once_and_may_be_a_symlink(real: Path) -> None:
    assert home() == real and Names("t").dir == real / "t"
    assert backups_root() == real / "backups"
    refuse_links(Path(os.environ["HVLAB_HOME"]) / "t" / "runs", "runs folder")  # no refusal


@pytest.mark.parametrize("planted", ["t", "t/runs", "backups", "backups/t"])
def test_a_symlink_below_hvlab_home_is_refused(real: Path, tmp_path: Path, planted: str) -> None:
    (tmp_path / "away").mkdir()
    link = real / planted
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(tmp_path / "away")
    for spelled in (real, Path(os.environ["HVLAB_HOME"])):  # by the real path or through home
        with pytest.raises(BadInput, match=f"{link} is a symlink .*remove the link") as info:
            refuse_links(spelled / planted / "x" / "y", "backup directory")
        assert "\n" not in str(info.value)


def test_symlinks_of_your_own_outside_hvlab_home_are_followed(real: Path, tmp_path: Path
                                                               ) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "mine")
    refuse_links(tmp_path / "link" / "new" / "b", "backup directory")
    # ... but not into a link planted inside HVLAB_HOME
    (tmp_path / "away").mkdir()
    (real / "backups").symlink_to(tmp_path / "away")
    (tmp_path / "sneaky").symlink_to(real)
    with pytest.raises(BadInput, match=f"{real / 'backups'} is a symlink"):
        refuse_links(tmp_path / "sneaky" / "backups" / "t", "backups folder")
    (tmp_path / "rel").symlink_to(Path("sneaky") / "backups")  # relative, resolved the same
    with pytest.raises(BadInput, match=f"{real / 'backups'} is a symlink"):
        refuse_links(tmp_path / "rel" / "t", "backups folder")


def test_dotdot_and_relative_paths_are_walked_as_the_kernel_does(
        real: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "away").mkdir()
    (real / "t").mkdir()
    (real / "t" / "runs").symlink_to(tmp_path / "away")
    monkeypatch.chdir(real / "t")
    with pytest.raises(BadInput, match="is a symlink"):
        refuse_links(Path("runs/r1"), "run folder")
    with pytest.raises(BadInput, match="is a symlink"):
        refuse_links(Path("../t/./runs/r1"), "run folder")
    with pytest.raises(BadInput, match="is a symlink"):  # the kernel goes through runs too
        refuse_links(Path("runs/../x"), "folder")
    (real / "t" / "sub").mkdir()
    refuse_links(Path("sub/../x"), "folder")


def test_a_file_where_a_folder_must_be_and_symlink_loops(real: Path, tmp_path: Path) -> None:
    (real / "t").write_text("")
    with pytest.raises(BadInput, match=f"{real / 't'} is not a folder"):
        refuse_links(real / "t" / "runs", "runs folder")
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(BadInput, match="too many levels of symlinks"):
        refuse_links(tmp_path / "a" / "x", "backup directory")


def test_the_lab_folder_is_walked_for_planted_links(real: Path, tmp_path: Path) -> None:
    names = Names("t")
    refuse_links_in_lab(names)  # no folder yet: nothing to refuse
    for d in ("runs/r1", "guests/vm01", "lvm/backup", "backing"):
        (names.dir / d).mkdir(parents=True)
    (names.dir / "state.json").write_text("{}")
    refuse_links_in_lab(names)
    (names.dir / "guests" / "vm01" / "guest.pid").symlink_to("/etc/hostname")
    with pytest.raises(BadInput, match=r"guests/vm01/guest\.pid is a symlink"):
        refuse_links_in_lab(names)
    (names.dir / "guests" / "vm01" / "guest.pid").unlink()
    (real / "u").write_text("")
    with pytest.raises(BadInput, match=r"lab folder .*/u is not a folder"):
        refuse_links_in_lab(Names("u"))


def _check(d: Path) -> str:
    with pytest.raises(BadInput) as info:
        dest.check(d)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_backup_directories_that_are_refused(real: Path, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    (tmp_path / "away").mkdir()
    (tmp_path / "dlink").symlink_to(tmp_path / "away")
    (tmp_path / "dangling").symlink_to(tmp_path / "nothing")
    other = tmp_path / "other"
    private.make_dir(other)
    private.write_text(other / dest.MARK, "r20260101000000abcd\n")
    (real / "t").mkdir()
    assert "is a symlink" in _check(tmp_path / "dlink")
    assert "is a symlink" in _check(tmp_path / "dangling")
    assert "already exists as a file" in _check(tmp_path / "afile")
    assert "is not a folder" in _check(tmp_path / "afile" / "b")
    assert "the backup of run r20260101000000abcd" in _check(other)
    assert "inside" in _check(other / "a" / "b") and "r20260101000000abcd" in _check(other / "x")
    assert "already exists" in _check(tmp_path / "away")
    assert "not below" in _check(real / "t" / "mine")
    assert "not below" in _check(Path(os.environ["HVLAB_HOME"]) / "mine")
    assert not (tmp_path / "away").is_symlink() or not os.listdir(tmp_path / "away")
    dest.check(real / "backups" / "t" / "r1")  # the default place
    dest.check(tmp_path / "dlink" / "new")  # below a link of your own


def test_claim_and_owns_never_follow_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "away").mkdir()
    (tmp_path / "d").symlink_to(tmp_path / "away")
    with pytest.raises(BadInput, match="already exists"):
        dest.claim(tmp_path / "d", "r1")
    assert not os.listdir(tmp_path / "away")
    dest.claim(tmp_path / "b", "r1")
    assert dest.owns(tmp_path / "b", "r1")
    (tmp_path / "b").rename(tmp_path / "b2")
    (tmp_path / "b").symlink_to(tmp_path / "b2")  # swapped for a link to the real thing
    assert not dest.owns(tmp_path / "b", "r1")


def test_make_dirs_does_not_follow_a_dangling_symlink(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FileExistsError):
        private.make_dirs(tmp_path / "a" / "b")
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize("run_id", ["", ".", "..", "../x", "a/b", "R1", "r1\n", "r" * 65,
                                    "r 1", "r\u0661"])
def test_run_ids_name_a_folder_and_nothing_else(run_id: str) -> None:
    with pytest.raises(BadInput, match="invalid run id"):
        runs.check_id(run_id)
    with pytest.raises(BadInput, match="invalid run id"):
        runs.load(Names("t"), run_id)


def test_an_empty_lab_name_is_refused_not_the_default_lab(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    monkeypatch.delenv("HVLAB_LAB", raising=False)
    with pytest.raises(BadInput, match="invalid lab name ''"):
        resolve_name("")
    monkeypatch.setenv("HVLAB_LAB", "Bad")
    with pytest.raises(BadInput, match="invalid lab name 'Bad'"):
        resolve_name(None)


def test_claim_of_a_full_destination_leaves_nothing(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC already when the run's mark is written: one line, and no folder left."""
    import errno

    def full(path: Path, text: str) -> None:
        path.write_text("")  # made, then the write fails, as on a full filesystem
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(private, "write_text", full)
    with pytest.raises(BadInput, match="No space left on device"):
        dest.claim(tmp_path / "full", "r1")
    assert not (tmp_path / "full").exists()
