"""sys/dirfd.py on a real filesystem: below a held folder nothing is written through a
symlink planted after the hold, and the held folder stays the one that was checked."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hvlab.sys import dirfd, private


def write(path: Path, text: str) -> None:
    fd = dirfd.open_file(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def test_a_held_folder_swapped_for_a_link_changes_nothing(tmp_path: Path) -> None:
    lab, victim = tmp_path / "lab", tmp_path / "victim"
    victim.mkdir()
    with dirfd.hold(lab):
        dirfd.make_dirs(lab / "runs")
        write(lab / "runs" / "a", "one")
        os.rename(lab, tmp_path / "moved")
        os.symlink(victim, lab)  # the lab's path now points elsewhere
        write(lab / "runs" / "b", "two")
        dirfd.make_dirs(lab / "live")
        write(lab / "live" / "tmp", "three")
        dirfd.replace(lab / "live" / "tmp", lab / "live" / "rec")
        dirfd.fsync_dir(lab / "live")
    assert list(victim.iterdir()) == []
    assert (tmp_path / "moved" / "runs" / "b").read_text() == "two"
    assert (tmp_path / "moved" / "live" / "rec").read_text() == "three"


@pytest.mark.parametrize("planted", ["folder", "file"])
def test_a_link_planted_below_a_held_folder_is_refused(tmp_path: Path, planted: str) -> None:
    lab, victim = tmp_path / "lab", tmp_path / "victim"
    victim.mkdir()
    (victim / "events.jsonl").write_text("theirs\n")
    with dirfd.hold(lab):
        private.make_dirs(lab / "runs" / "r1")
        if planted == "folder":
            os.rmdir(lab / "runs" / "r1")
            os.symlink(victim, lab / "runs" / "r1")
        else:
            os.symlink(victim / "events.jsonl", lab / "runs" / "r1" / "events.jsonl")
        with pytest.raises(dirfd.PlantedLink, match="never writes through"):
            write(lab / "runs" / "r1" / "events.jsonl", "ours\n")
        with pytest.raises(dirfd.PlantedLink):  # a folder made there: the link is met
            dirfd.make_dirs(lab / "runs" / "r1" / "events.jsonl" / "sub")
    assert (victim / "events.jsonl").read_text() == "theirs\n"


def test_holds_nest_and_end(tmp_path: Path) -> None:
    lab = tmp_path / "lab"
    with dirfd.hold(lab) as outer:
        with dirfd.hold(lab) as inner:
            assert dirfd.held_fd(lab) == inner != outer
        assert dirfd.held_fd(lab) == outer
    assert dirfd.held_fd(lab) is None
    with pytest.raises(OSError):
        os.fstat(outer)


def test_outside_a_held_folder_only_the_last_part_is_checked(tmp_path: Path) -> None:
    real, link = tmp_path / "real", tmp_path / "link"
    real.mkdir()
    os.symlink(real, link)  # the user's own link above the file: followed, as given
    write(link / "f", "x")
    assert (real / "f").read_text() == "x"
    os.symlink(real / "f", real / "g")
    with pytest.raises(dirfd.PlantedLink):
        write(real / "g", "y")
    assert (real / "f").read_text() == "x"


def test_a_proxy_writes_through_the_held_fd(tmp_path: Path) -> None:
    """What the off-host proxy is handed: /proc/self/fd/N of the held backup folder."""
    dest = tmp_path / "dest"
    with dirfd.hold(dest) as fd:
        os.rename(dest, tmp_path / "moved")
        write(Path(f"/proc/self/fd/{fd}") / "disk0.img", "image")
    assert (tmp_path / "moved" / "disk0.img").read_text() == "image"


def test_a_forked_copy_forgets_the_holds(tmp_path: Path) -> None:
    """The hold guard is a fork that closes what it inherited: it must not write through
    a number that names another file there."""
    lab = tmp_path / "lab"
    with dirfd.hold(lab) as fd:
        pid = os.fork()
        if pid == 0:
            os._exit(0 if dirfd.held_fd(lab) is None else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert dirfd.held_fd(lab) == fd
