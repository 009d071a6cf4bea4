"""The sys layer's in-process stand-ins for commands, on their pure parts: loops read from a
sysfs-shaped tree (as `losetup -l` reads it), dm tables as dmsetup prints and takes them,
`dmsetup targets` from its ioctl answer, and a thaw of what cannot be thawed."""

from __future__ import annotations

import errno
import struct
from pathlib import Path

import pytest

from hvlab.errors import HvlabError
from hvlab.sys import dm, dmioctl, dmwire, fs, loop
from hvlab.sys.dmioctl import Target


def _loop_dir(root: Path, n: int, back: str | None, ro: str = "0") -> None:
    d = root / f"loop{n}"
    d.mkdir()
    (d / "ro").write_text(f"{ro}\n")
    if back is not None:  # the kernel adds loop/ only while something is attached
        (d / "loop").mkdir()
        (d / "loop" / "backing_file").write_text(f"{back}\n")


def test_loops_from_sysfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _loop_dir(tmp_path, 10, "/lab/backing/pv0.img")
    _loop_dir(tmp_path, 2, "/lab/backing/pv 1.img (deleted)", ro="1")  # unlinked since
    _loop_dir(tmp_path, 3, None)  # free
    (tmp_path / "loop-control").mkdir()  # not a loop
    (tmp_path / "sda").mkdir()
    monkeypatch.setattr(loop, "SYS_BLOCK", tmp_path)
    assert loop.list_loops() == [loop.Loop("/dev/loop2", "/lab/backing/pv 1.img", True),
                                 loop.Loop("/dev/loop10", "/lab/backing/pv0.img", False)]
    assert loop.attached("/dev/loop10") and not loop.attached("/dev/loop3")
    assert not loop.attached("/dev/loop99")
    assert [lo.name for lo in loop.loops_under(Path("/lab/backing"))] == ["/dev/loop2",
                                                                        "/dev/loop10"]
    assert loop.loops_under(Path("/lab/back")) == []  # a prefix of the name is not inside


def test_no_sysfs_no_loops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loop, "SYS_BLOCK", tmp_path / "absent")
    assert loop.list_loops() == []


def test_backing_path_keeps_what_only_looks_like_a_suffix() -> None:
    assert loop.backing_path("/a/b (deleted)\n") == "/a/b"
    assert loop.backing_path("/a/b (deleted) x\n") == "/a/b (deleted) x"
    assert loop.backing_path("/a/b \n") == "/a/b "


def test_tables_round_trip_as_dmsetup_prints_them() -> None:
    text = "0 8192 linear 7:0 0\n8192 100 error\n"
    targets = dm.parse_table(text)
    assert targets == [Target(0, 8192, "linear", "7:0 0"), Target(8192, 100, "error")]
    assert dm.table_text(targets) == text
    assert dm.parse_table("0 8192 linear 7:0 0") == targets[:1]  # as --table takes it
    assert dm.table_text([]) == ""


@pytest.mark.parametrize("bad", ["0 x linear 7:0 0", "linear", "0 8"])
def test_a_malformed_table_is_one_error(bad: str) -> None:
    with pytest.raises(HvlabError, match="not a device-mapper table"):
        dm.parse_table(bad)


def test_message_answer_is_a_line(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[tuple[str, str]] = []

    def message(name: str, text: str, *, sector: int = 0) -> str:
        sent.append((name, text))
        return "" if text == "enable" else "3 bad blocks"

    monkeypatch.setattr(dmioctl, "message", message)
    assert dm.message("pv0", "enable") == ""
    assert dm.message("pv0", "countbadblocks") == "3 bad blocks\n"
    dm.message("pv0", "addbadblock", "17")
    assert sent[-1] == ("pv0", "addbadblock 17")


def test_target_of_names_the_mapped_device(monkeypatch: pytest.MonkeyPatch) -> None:
    tables = {"ctl": [Target(0, 8, "linear", "253:4 0")], "empty": []}
    monkeypatch.setattr(dmioctl, "table", lambda name, **_: tables[name])
    assert dm.target_of("ctl") == "253:4"
    with pytest.raises(dmioctl.DmError, match="no live table"):
        dm.target_of("empty")


def _versions(*entries: tuple[str, tuple[int, int, int]]) -> bytes:
    """struct dm_target_versions records as the kernel lays them out, 8-byte aligned."""
    out = bytearray()
    for i, (name, v) in enumerate(entries):
        raw = name.encode() + b"\0"
        size = dmwire.align8(16 + len(raw))
        nxt = 0 if i == len(entries) - 1 else size
        out += struct.pack("=4I", nxt, *v) + raw + b"\0" * (size - 16 - len(raw))
    return bytes(out)


def test_target_versions() -> None:
    data = _versions(("linear", (1, 4, 0)), ("thin-pool", (1, 22, 0)), ("dust", (1, 0, 0)))
    buf = bytes(312) + data
    got = dmwire.unpack_versions(buf, 312, len(buf))
    assert got == {"linear": (1, 4, 0), "thin-pool": (1, 22, 0), "dust": (1, 0, 0)}
    assert dmwire.unpack_versions(bytes(312), 312, 312) == {}
    assert dmwire.request_code(dmwire.LIST_VERSIONS) == 0xC138FD0D


def test_suspend_timeout_is_one_class() -> None:
    """dm re-exports dmioctl's: an `except dm.SuspendTimeout` catches a bounded suspend's."""
    assert dm.SuspendTimeout is dmioctl.SuspendTimeout
    exc = dmioctl.SuspendTimeout("suspend", "x", errno.EINTR)
    assert isinstance(exc, HvlabError) and exc.name == "x"


def test_thaw_of_what_cannot_be_thawed_is_false(tmp_path: Path) -> None:
    """Not a directory, gone, or not frozen (EINVAL): False, as fsfreeze -u failed."""
    f = tmp_path / "file"
    f.write_text("")
    assert fs.thaw(f) is False
    assert fs.thaw(tmp_path / "gone") is False
    assert fs.thaw(tmp_path) is False  # tmp is not frozen (or not ours to thaw)


def test_mount_and_umount_calls_name_what_the_kernel_refused(tmp_path: Path) -> None:
    # no such device (ENOENT as root, EPERM otherwise): an OSError naming device and place
    with pytest.raises(OSError, match=r"mount /no/such/dev on .* \(ext4\)"):
        fs.mount_call("/no/such/dev", tmp_path, "ext4")
    with pytest.raises(OSError, match=f"umount {tmp_path}: ") as exc:
        fs.umount_call(tmp_path)  # not a mount point (EINVAL), or not allowed (EPERM)
    assert exc.value.errno in (errno.EINVAL, errno.EPERM)
