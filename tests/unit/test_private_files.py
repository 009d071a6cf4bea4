"""Folders 0700 and files 0600 from creation (hvlab.sys.private), whatever the umask."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from hvlab.sys import private


def mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


@pytest.fixture(autouse=True)
def _loose_umask() -> Iterator[None]:
    old = os.umask(0o022)  # the usual default: 0755 folders, 0644 files
    yield
    os.umask(old)


def test_make_dirs_makes_every_missing_folder_0700(tmp_path: Path) -> None:
    (tmp_path / "there").mkdir(mode=0o755)
    private.make_dirs(tmp_path / "there" / "a" / "b" / "c")
    assert mode(tmp_path / "there") == 0o755  # not ours to change
    for p in ("a", "a/b", "a/b/c"):
        assert mode(tmp_path / "there" / p) == 0o700, p
    private.make_dirs(tmp_path / "there" / "a" / "b" / "c")  # idempotent
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError):
        private.make_dirs(tmp_path / "file" / "x")


def test_make_dir_refuses_an_existing_folder(tmp_path: Path) -> None:
    private.make_dir(tmp_path / "p" / "dest")
    assert mode(tmp_path / "p") == mode(tmp_path / "p" / "dest") == 0o700
    with pytest.raises(FileExistsError):
        private.make_dir(tmp_path / "p" / "dest")


def test_files_are_0600_new_or_rewritten(tmp_path: Path) -> None:
    private.write_text(tmp_path / "new", "x")
    assert mode(tmp_path / "new") == 0o600 and (tmp_path / "new").read_text() == "x"
    old = tmp_path / "old"
    old.write_text("loose")
    old.chmod(0o666)
    private.write_text(old, "y")
    assert mode(old) == 0o600 and old.read_text() == "y"


def test_write_text_does_not_follow_a_planted_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("keep")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(OSError):
        private.write_text(tmp_path / "link", "x")
    assert target.read_text() == "keep"


def test_tighten_takes_the_others_bits_only(tmp_path: Path) -> None:
    d, f = tmp_path / "d", tmp_path / "f"
    d.mkdir(mode=0o755)
    f.write_text("")
    f.chmod(0o644)
    private.tighten(d, private.DIR_MODE)
    private.tighten(f, private.FILE_MODE)
    assert mode(d) == 0o700 and mode(f) == 0o600
    target = tmp_path / "t"
    target.write_text("")
    target.chmod(0o644)
    (tmp_path / "l").symlink_to(target)
    private.tighten(tmp_path / "l", private.FILE_MODE)  # a symlink is left alone, and its target
    assert mode(target) == 0o644


def test_json_state_and_manifests_are_written_0600(tmp_path: Path) -> None:
    from hvlab.lab.state import write_json_atomic

    write_json_atomic(tmp_path / "manifest.json", {"a": 1})
    assert mode(tmp_path / "manifest.json") == 0o600


def test_claim_makes_the_backup_directory_0700_and_its_mark_0600(tmp_path: Path) -> None:
    from hvlab.flow import dest

    where = tmp_path / "backups" / "lab" / "r1"
    dest.check(where)
    dest.claim(where, "r1")
    for p in (tmp_path / "backups", tmp_path / "backups" / "lab", where):
        assert mode(p) == 0o700, p
    assert mode(where / dest.MARK) == 0o600 and dest.owns(where, "r1")


def test_backup_images_are_0600(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hvlab.backup import reader
    from hvlab.backup.thinmeta import Mapping

    def ranges(_dev: str, rs: object, bs: int) -> Iterator[tuple[int, bytes]]:
        yield 0, b"\x01" * bs

    monkeypatch.setattr(reader, "read_ranges", ranges)
    img = tmp_path / "vm01_disk0.img"
    res = reader.read_image("/dev/null", Mapping(1, 65536, [(0, 1)], [(0, 0)]), 1 << 20, img)
    assert mode(img) == 0o600 and res["bytes_written"] == 65536
