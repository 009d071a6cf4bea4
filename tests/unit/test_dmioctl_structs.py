"""dmioctl's pure parts: the dm-ioctl structs as the kernel lays them out, and the bounded
suspend's thread-and-signal logic (with a blocking libc call standing in for the ioctl)."""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from hvlab.errors import HvlabError
from hvlab.sys import dm, dmioctl, dmwire
from hvlab.sys.dmioctl import DmError, Target


def test_struct_sizes_and_request_codes() -> None:
    # sizeof(struct dm_ioctl) 312, sizeof(struct dm_target_spec) 40 (x86-64 and every 64-bit
    # ABI); the codes as strace prints them (DM_VERSION, DM_TARGET_MSG).
    assert dmwire.HEADER.size == 312
    assert dmwire.SPEC.size == 40
    assert dmwire.request_code(dmwire.VERSION_CMD) == 0xC138FD00
    assert dmwire.request_code(dmwire.DEV_SUSPEND) == 0xC138FD06
    assert dmwire.request_code(dmwire.TARGET_MSG) == 0xC138FD0E


def test_request_header_fields() -> None:
    buf = dmwire.pack_request("vg-lv", "LVM-abc", flags=dmwire.SUSPEND | dmwire.NOFLUSH,
                               out_size=4096)
    assert len(buf) == 312 + 4096
    # offsets of the C struct: version 0, data_size 12, data_start 16, flags 28, name 48,
    # uuid 176
    assert struct.unpack_from("=3I", buf, 0) == (4, 0, 0)
    assert struct.unpack_from("=II", buf, 12) == (312 + 4096, 312)
    assert struct.unpack_from("=I", buf, 28) == (dmwire.SUSPEND | dmwire.NOFLUSH,)
    assert buf[48:54] == b"vg-lv\0" and buf[176:184] == b"LVM-abc\0"
    h = dmwire.unpack_header(buf)
    assert (h.name, h.uuid, h.data_start, h.flags) == (
        "vg-lv", "LVM-abc", 312, dmwire.SUSPEND | dmwire.NOFLUSH)


def test_request_payload_sets_data_size() -> None:
    buf = dmwire.pack_request("x", payload=b"abc\0")
    assert len(buf) == 316 and bytes(buf[312:]) == b"abc\0"
    assert dmwire.unpack_header(buf).data_size == 316


@pytest.mark.parametrize(("name", "uuid"), [("n" * 128, ""), ("", "u" * 129), ("a\0b", "")])
def test_names_the_kernel_would_cut_are_refused(name: str, uuid: str) -> None:
    with pytest.raises(DmError) as exc:
        dmwire.pack_request(name, uuid)
    assert exc.value.errno == errno.EINVAL


def test_longest_names_fit() -> None:
    h = dmwire.unpack_header(dmwire.pack_request("n" * 127, "u" * 128))
    assert (len(h.name), len(h.uuid)) == (127, 128)


def test_targets_for_load_are_aligned_and_chained() -> None:
    raw = dmwire.pack_targets([Target(0, 2048, "linear", "7:0 0"),
                                Target(2048, 100, "error"),
                                Target(2148, 8, "thin-pool", "253:1 253:2 128 0 1 x" * 3)])
    at, seen = 0, []
    for _ in range(3):
        assert at % 8 == 0
        start, length, status, nxt, ttype = dmwire.SPEC.unpack_from(raw, at)
        params = raw[at + 40:at + nxt]
        assert params.endswith(b"\0") and nxt % 8 == 0 and status == 0
        seen.append((start, length, ttype.rstrip(b"\0").decode(),
                     params.split(b"\0", 1)[0].decode()))
        at += nxt  # load direction: from the start of this spec
    assert at == len(raw)
    assert seen == [(0, 2048, "linear", "7:0 0"), (2048, 100, "error", ""),
                    (2148, 8, "thin-pool", "253:1 253:2 128 0 1 x" * 3)]


@pytest.mark.parametrize("ttype", ["", "x" * 16, "a\0"])
def test_bad_target_types_are_refused(ttype: str) -> None:
    with pytest.raises(DmError):
        dmwire.pack_targets([Target(0, 8, ttype)])


def _kernel_status(targets: list[Target]) -> bytes:
    """A DM_TABLE_STATUS answer as retrieve_status() writes it: `next` from the data start."""
    out = bytearray()
    for t in targets:
        at = len(out)
        out += dmwire.SPEC.pack(t.start, t.length, 0, 0, t.type.encode())
        out += t.params.encode() + b"\0"
        out += b"\0" * (dmwire.align8(len(out)) - len(out))
        struct.pack_into("=I", out, at + 20, len(out))
    return bytes(out)


def test_unpack_status_answer() -> None:
    targets = [Target(0, 2048, "thin-pool", "1 10/4096 5/16384 - rw discard_passdown"),
               Target(2048, 8, "linear", "")]
    buf = b"\xff" * 312 + _kernel_status(targets)
    assert dmwire.unpack_targets(buf, 312, 2) == targets


def _kernel_names(rows: list[tuple[str, int, str | None]], *, uuids: bool = True) -> bytes:
    """A DM_LIST_DEVICES answer as list_devices() writes it (5.13+ layout with uuids)."""
    out = bytearray()
    prev = None
    for name, dev, uuid in rows:
        at = len(out)
        if prev is not None:
            struct.pack_into("=I", out, prev + 8, at - prev)
        out += struct.pack("=QI", dev, 0) + name.encode() + b"\0"
        out += b"\0" * (dmwire.align8(len(out)) - len(out))
        flags = 0 if not uuids else (1 if uuid else 2)
        out += struct.pack("=II", 7, flags)
        if uuids and uuid:
            out += uuid.encode() + b"\0"
            out += b"\0" * (dmwire.align8(len(out)) - len(out))
        prev = at
    return bytes(out)


def test_unpack_device_list_with_uuids() -> None:
    rows: list[tuple[str, int, str | None]] = [
        ("hvlab_t-pool-tpool", dmioctl.encode_dev(254, 3), "LVM-" + "x" * 64 + "-tpool"),
        ("a", dmioctl.encode_dev(254, 300), None), ("b" * 127, dmioctl.encode_dev(254, 1), "u")]
    data = _kernel_names(rows)
    got = dmwire.unpack_names(b"\0" * 312 + data, 312, 312 + len(data))
    assert [(e.name, e.dev, e.uuid, e.event_nr) for e in got] == [
        (rows[0][0], rows[0][1], rows[0][2], 7), ("a", rows[1][1], "", 7),
        ("b" * 127, rows[2][1], "u", 7)]


def test_unpack_device_list_old_kernel_and_empty() -> None:
    data = _kernel_names([("a", 65024, "ignored")], uuids=False)
    (entry,) = dmwire.unpack_names(b"\0" * 312 + data, 312, 312 + len(data))
    assert entry.uuid is None  # the kernel did not say: ask DM_DEV_STATUS
    # No device: the kernel writes dev 0 ("flags no data"), or nothing at all.
    assert dmwire.unpack_names(b"\0" * 400, 312, 312 + 16) == []
    assert dmwire.unpack_names(b"\0" * 312, 312, 312) == []


@pytest.mark.parametrize(("major", "minor"), [(254, 0), (7, 3), (254, 255), (254, 256),
                                              (253, 1048575), (4095, 77)])
def test_dev_numbers_match_the_kernel_and_libc(major: int, minor: int) -> None:
    dev = dmioctl.encode_dev(major, minor)
    assert dmioctl.decode_dev(dev) == (major, minor)
    assert (os.major(dev), os.minor(dev)) == (major, minor)  # what mknod takes


def test_message_payload() -> None:
    raw = dmwire.pack_message("create_snap 5 3", 0)
    assert raw == struct.pack("=Q", 0) + b"create_snap 5 3\0"
    with pytest.raises(DmError):
        dmwire.pack_message("  ")


def test_target_lines() -> None:
    t = Target.parse("0 131072 thin 254:3 7")
    assert t == Target(0, 131072, "thin", "254:3 7") and t.line == "0 131072 thin 254:3 7"
    assert Target.parse("0 8 error").line == "0 8 error"


def test_error_names_device_and_errno() -> None:
    text = str(DmError("suspend", "hvlab_t-vm01_disk0", errno.EBUSY))
    assert "suspend of hvlab_t-vm01_disk0" in text and "EBUSY" in text
    assert isinstance(dmioctl.SuspendTimeout("suspend", "x", errno.EINTR), dm.SuspendTimeout)


# ------------------------------------------------------------------ bounded suspends
_libc = ctypes.CDLL(None, use_errno=True)


def _blocking_ioctl_stand_in(calls: list[str], name: str) -> None:
    """Blocks in the kernel until a signal, like a suspend waiting on I/O; fails EINTR."""
    calls.append(name)
    if _libc.pause() == -1:
        raise DmError("suspend", name, ctypes.get_errno())


@pytest.fixture
def fake_dm(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, list[str]]]:
    """dmioctl's suspend and resume ioctls replaced: 'stuck' blocks, others succeed."""
    log: dict[str, list[str]] = {"suspend": [], "resume": []}

    def suspend_now(name: str, flags: int) -> None:
        if name == "stuck":
            _blocking_ioctl_stand_in(log["suspend"], name)
        elif name == "broken":
            raise DmError("suspend", name, errno.EIO)
        else:
            log["suspend"].append(name)

    def resume(name: str, **_: bool) -> None:
        log["resume"].append(name)

    monkeypatch.setattr(dmioctl, "_suspend_now", suspend_now)
    monkeypatch.setattr(dmioctl, "resume", resume)
    yield log


def test_bounded_suspend_interrupts_the_wait_and_rolls_back(
        fake_dm: dict[str, list[str]]) -> None:
    t = time.monotonic()
    with pytest.raises(dmioctl.SuspendTimeout, match=r"stuck did not return within 0\.30 s"):
        dmioctl.suspend_all(["a", "b", "stuck", "c"], timeout=0.3)
    assert 0.3 <= time.monotonic() - t < 2.0
    assert fake_dm == {"suspend": ["a", "b", "stuck"], "resume": ["b", "a"]}
    assert not [th for th in threading.enumerate() if th.name == "dm-suspend"]


def test_a_failed_suspend_resumes_the_others(fake_dm: dict[str, list[str]]) -> None:
    with pytest.raises(DmError, match="EIO"):
        dmioctl.suspend_all(["a", "broken", "c"], timeout=5)
    with pytest.raises(DmError, match="EIO"):
        dmioctl.suspend_all(["x", "broken"])
    assert fake_dm == {"suspend": ["a", "x"], "resume": ["a", "x"]}


def test_suspended_block_resumes_in_reverse(fake_dm: dict[str, list[str]]) -> None:
    with pytest.raises(RuntimeError), dmioctl.suspended("a", "b", timeout=1):
        raise RuntimeError
    assert fake_dm == {"suspend": ["a", "b"], "resume": ["b", "a"]}


def test_bounded_suspend_from_a_thread_needs_the_handler(
        fake_dm: dict[str, list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    old = signal.signal(dmioctl.INTERRUPT, signal.SIG_DFL)
    try:
        seen: list[BaseException] = []

        def worker() -> None:
            try:
                dmioctl.suspend("a", timeout=1)
            except BaseException as exc:
                seen.append(exc)

        th = threading.Thread(target=worker)
        th.start()
        th.join()
        assert len(seen) == 1 and isinstance(seen[0], HvlabError)
        assert "prepare_interrupts" in str(seen[0])
        dmioctl.prepare_interrupts()
        th = threading.Thread(target=worker)
        th.start()
        th.join()
        assert len(seen) == 1 and fake_dm["suspend"] == ["a"]
    finally:
        signal.signal(dmioctl.INTERRUPT, old)
