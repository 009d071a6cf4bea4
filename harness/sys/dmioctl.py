"""Device-mapper through the kernel's own interface: ioctls on /dev/mapper/control (dm-ioctl 4.x).

Why: in the lab VM one `dmsetup` exec costs ~0.14 s, and a freeze window that suspends, snapshots
and resumes N disks needs ~3N of them. An ioctl costs microseconds, so the window can be done from
one process at kernel speed (issue 10).

Why raw ioctls and not a binding: Debian has no Python binding of libdevmapper's dm API
(python3-blockdev's dm plugin only makes and removes linear maps: no suspend, message or
multi-target load; lvm2's own Python binding, of liblvm2app, went with lvm2 2.03; PyPI's lvm2py
binds that same dead library). ctypes over libdevmapper.so would bring its udev cookies,
semaphores and node rules, which the lab VM (no udev) would have to switch off call by call.
The ioctl ABI is small and stable (version 4 since 2003): struct dm_ioctl, then the payload,
laid out as linux/include/uapi/linux/dm-ioctl.h says. `struct` packs it; `fcntl.ioctl` sends it.

Nodes: the lab VM has no udev, so `create` makes /dev/mapper/NAME (mknod with the dev_t the kernel
returns) and `remove` unlinks it, as `dmsetup mknodes` does.

A suspend waits, interruptibly, for the I/O in flight below the device: a device below that never
completes a write holds it forever. `suspend(timeout=...)` runs the ioctl in a worker thread and,
at the deadline, signals that thread (SIGURG with a no-op handler) until the kernel gives up: the
ioctl fails with EINTR, the kernel has undone the suspend and the device keeps running.
"""

from __future__ import annotations

import contextvars
import errno
import fcntl
import os
import signal
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from hvlab.errors import HvlabError
from hvlab.sys import run as runner

CONTROL = "/dev/mapper/control"
MAPPER = Path("/dev/mapper")

# struct dm_ioctl: version[3], data_size, data_start, target_count, open_count, flags, event_nr,
# padding, dev, name[128], uuid[129], data[7]. Native byte order, no implicit padding: 312 bytes.
HEADER = struct.Struct("=3IIIIiIIIQ128s129s7s")
# struct dm_target_spec: sector_start, length, status, next, target_type[16]; params follow.
SPEC = struct.Struct("=QQiI16s")
NAME_LEN, UUID_LEN, TYPE_LEN = 128, 129, 16
VERSION = (4, 0, 0)  # the oldest 4.x we speak; the kernel answers with its own

# Commands (the enum in dm-ioctl.h).
VERSION_CMD, LIST_DEVICES, DEV_CREATE, DEV_REMOVE = 0, 2, 3, 4
DEV_SUSPEND, DEV_STATUS, TABLE_LOAD, TABLE_CLEAR, TABLE_STATUS = 6, 7, 9, 10, 12
LIST_VERSIONS, TARGET_MSG = 13, 14
QUERIES = frozenset({VERSION_CMD, LIST_DEVICES, DEV_STATUS, TABLE_STATUS, LIST_VERSIONS})

# Flags.
READONLY = 1 << 0
SUSPEND = 1 << 1
STATUS_TABLE = 1 << 4
ACTIVE_PRESENT = 1 << 5
INACTIVE_PRESENT = 1 << 6
BUFFER_FULL = 1 << 8
SKIP_LOCKFS = 1 << 10
NOFLUSH = 1 << 11
QUERY_INACTIVE_TABLE = 1 << 12
UUID = 1 << 14
DATA_OUT = 1 << 16
NAME_LIST_HAS_UUID = 1

OUT_BUFFER = 16 << 10  # first try for commands that answer with data; doubled when full
MAX_BUFFER = 16 << 20


def request_code(cmd: int) -> int:
    """_IOWR(0xfd, cmd, struct dm_ioctl)."""
    return (3 << 30) | (HEADER.size << 16) | (0xFD << 8) | cmd


def align8(n: int) -> int:
    return (n + 7) & ~7


def decode_dev(dev: int) -> tuple[int, int]:
    """The kernel's huge_encode_dev (new_encode_dev) -> (major, minor)."""
    return (dev & 0xFFF00) >> 8, (dev & 0xFF) | ((dev >> 12) & 0xFFF00)


def encode_dev(major: int, minor: int) -> int:
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


class DmError(HvlabError):
    """A device-mapper ioctl failed: what, on which device, and the kernel's errno."""

    def __init__(self, op: str, name: str, err: int, detail: str = "") -> None:
        self.op, self.name, self.errno = op, name, err
        code = errno.errorcode.get(err, str(err))
        hint = {errno.ENXIO: "no such device",
                errno.EBUSY: "device is in use",
                errno.EEXIST: "already exists",
                errno.EINVAL: "refused by the kernel (its log says why)"}.get(err, "")
        super().__init__(detail or (f"device-mapper {op} of {name or '(none)'} failed: "
                                    f"{os.strerror(err)} ({code}){': ' + hint if hint else ''}"))


class SuspendTimeout(DmError):
    """A suspend did not complete in time: the I/O in flight below the device does not.
    (dm.SuspendTimeout is this class.)"""


@dataclass(frozen=True)
class Header:
    version: tuple[int, int, int]
    data_size: int
    data_start: int
    target_count: int
    open_count: int
    flags: int
    event_nr: int
    dev: int
    name: str
    uuid: str


@dataclass(frozen=True)
class Target:
    """One line of a table (or of a status): sectors, target type, its parameters."""

    start: int
    length: int
    type: str
    params: str = ""

    @property
    def line(self) -> str:
        """As `dmsetup table` prints it."""
        return f"{self.start} {self.length} {self.type} {self.params}".rstrip()

    @classmethod
    def parse(cls, line: str) -> Target:
        start, length, ttype, *rest = line.split(maxsplit=3)
        return cls(int(start), int(length), ttype, rest[0].strip() if rest else "")


@dataclass(frozen=True)
class NameEntry:
    """A row of DM_LIST_DEVICES. uuid is None when the kernel does not say (older than 5.13)."""

    name: str
    dev: int
    event_nr: int
    uuid: str | None


@dataclass(frozen=True)
class Info:
    """DM_DEV_STATUS of one device (dmsetup info)."""

    name: str
    uuid: str
    major: int
    minor: int
    open_count: int
    target_count: int
    event_nr: int
    flags: int

    @property
    def suspended(self) -> bool:
        return bool(self.flags & SUSPEND)

    @property
    def read_only(self) -> bool:
        return bool(self.flags & READONLY)

    @property
    def live_table(self) -> bool:
        return bool(self.flags & ACTIVE_PRESENT)

    @property
    def inactive_table(self) -> bool:
        return bool(self.flags & INACTIVE_PRESENT)

    @property
    def devno(self) -> int:
        return os.makedev(self.major, self.minor)

    @property
    def path(self) -> str:
        return str(MAPPER / self.name)


# ------------------------------------------------------------------------ packing (pure)
def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode()


def _cstr_at(buf: bytes | bytearray, at: int) -> str:
    """The NUL-terminated string at offset `at` (to the end of buf when unterminated)."""
    end = buf.find(b"\0", at)
    return bytes(buf[at:end if end >= 0 else len(buf)]).decode()


def _fixed(text: str, size: int, what: str) -> bytes:
    raw = text.encode()
    if len(raw) >= size or b"\0" in raw:
        raise DmError("request", text[:40], errno.EINVAL,
                      f"device-mapper {what} {text[:40]!r}... is longer than {size - 1} bytes"
                      if len(raw) >= size else f"device-mapper {what} {text!r} contains NUL")
    return raw


def pack_request(name: str = "", uuid: str = "", *, flags: int = 0, payload: bytes = b"",
                 target_count: int = 0, dev: int = 0, out_size: int = 0) -> bytearray:
    """struct dm_ioctl followed by payload, in a buffer of at least out_size bytes of data
    (for the commands that answer with data)."""
    start = HEADER.size  # 312: already 8-aligned, where the kernel puts its answers too
    size = start + max(len(payload), out_size)
    buf = bytearray(size)
    HEADER.pack_into(buf, 0, *VERSION, size, start, target_count, 0, flags, 0, 0, dev,
                     _fixed(name, NAME_LEN, "name"), _fixed(uuid, UUID_LEN, "uuid"), b"")
    buf[start:start + len(payload)] = payload
    return buf


def unpack_header(buf: bytes | bytearray) -> Header:
    (v0, v1, v2, data_size, data_start, target_count, open_count, flags, event_nr, _pad, dev,
     name, uuid, _data) = HEADER.unpack_from(buf, 0)
    return Header((v0, v1, v2), data_size, data_start, target_count, open_count, flags,
                  event_nr, dev, _cstr(name), _cstr(uuid))


def pack_targets(targets: Sequence[Target]) -> bytes:
    """dm_target_spec + NUL-terminated params, each padded to 8 bytes; `next` counts from the
    start of this spec to the start of the next one (the load direction)."""
    out = bytearray()
    for t in targets:
        ttype = t.type.encode()
        if not ttype or len(ttype) >= TYPE_LEN or b"\0" in ttype:
            raise DmError("table load", "", errno.EINVAL,
                          f"device-mapper target type {t.type!r}: 1 to {TYPE_LEN - 1} bytes")
        params = t.params.encode()
        if b"\0" in params:
            raise DmError("table load", "", errno.EINVAL,
                          f"device-mapper target params {t.params!r} contain NUL")
        params += b"\0" * (align8(len(params) + 1) - len(params))
        out += SPEC.pack(t.start, t.length, 0, SPEC.size + len(params), ttype) + params
    return bytes(out)


def unpack_targets(buf: bytes | bytearray, data_start: int, count: int) -> list[Target]:
    """The answer of DM_TABLE_STATUS: `next` counts from the start of the data."""
    out: list[Target] = []
    off = 0
    for _ in range(count):
        at = data_start + off
        start, length, _status, nxt, ttype = SPEC.unpack_from(buf, at)
        params = _cstr_at(buf, at + SPEC.size)
        out.append(Target(start, length, _cstr(ttype), params))
        off = nxt
    return out


def unpack_names(buf: bytes | bytearray, data_start: int, data_size: int) -> list[NameEntry]:
    """The answer of DM_LIST_DEVICES: struct dm_name_list records (dev, next, name), each name
    followed, at the next 8-byte boundary, by event_nr, flags and (flag 1) the uuid."""
    if data_size <= data_start:
        return []
    out: list[NameEntry] = []
    at = data_start
    while True:
        dev, nxt = struct.unpack_from("=QI", buf, at)
        if dev == 0 and not out:
            return []  # "flags no data": the kernel found no device
        name = _cstr_at(buf, at + 12)
        extra = align8(at + 12 + len(name.encode()) + 1)
        event_nr, flags = struct.unpack_from("=II", buf, extra)
        uuid: str | None = None
        if flags & NAME_LIST_HAS_UUID:
            uuid = _cstr_at(buf, extra + 8)
        elif flags:
            uuid = ""  # DOESNT_HAVE_UUID
        out.append(NameEntry(name, dev, event_nr, uuid))
        if nxt == 0:
            return out
        at += nxt


def unpack_versions(buf: bytes | bytearray, data_start: int,
                    data_size: int) -> dict[str, tuple[int, int, int]]:
    """The answer of DM_LIST_VERSIONS: struct dm_target_versions records (next, version[3],
    name), `next` counting from the start of this record to the next one; 0 ends the list."""
    out: dict[str, tuple[int, int, int]] = {}
    at = data_start
    while data_size >= at + 16:
        nxt, v0, v1, v2 = struct.unpack_from("=4I", buf, at)
        out[_cstr_at(buf, at + 16)] = (v0, v1, v2)
        if nxt == 0:
            break
        at += nxt
    return out


def pack_message(text: str, sector: int = 0) -> bytes:
    """struct dm_target_msg: the sector that picks the target, then the NUL-terminated text."""
    raw = text.encode()
    if not raw.strip() or b"\0" in raw:
        raise DmError("message", "", errno.EINVAL, f"device-mapper message {text!r}: empty or NUL")
    return struct.pack("=Q", sector) + raw + b"\0"


def info_of(h: Header) -> Info:
    major, minor = decode_dev(h.dev)
    return Info(h.name, h.uuid, major, minor, h.open_count, h.target_count, h.event_nr, h.flags)


# ------------------------------------------------------------------------ the control device
_fd_lock = threading.Lock()
_fd: int | None = None


def _after_fork() -> None:
    """A forked child (flow/holdguard.py's guard) keeps the open fd; a lock some other thread
    of the parent held at the fork would never be released in the child."""
    global _fd_lock
    _fd_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork)


def _control() -> int:
    global _fd
    with _fd_lock:
        if _fd is None:
            try:
                _fd = os.open(CONTROL, os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                raise DmError("open", CONTROL, exc.errno or errno.ENODEV,
                              f"cannot open {CONTROL}: {exc.strerror} (a kernel without "
                              f"device-mapper? run it in the lab VM)") from None
        return _fd


def available() -> bool:
    return os.path.exists(CONTROL)


def _call(cmd: int, op: str, name: str = "", *, flags: int = 0, payload: bytes = b"",
          target_count: int = 0, uuid: str = "", answers: bool = False) -> tuple[Header, bytearray]:
    """One ioctl; commands that answer with data are retried with a bigger buffer while the
    kernel says it was too small."""
    out_size = OUT_BUFFER if answers else 0
    start = time.monotonic()
    while True:
        buf = pack_request(name, uuid, flags=flags, payload=payload,
                           target_count=target_count, out_size=out_size)
        try:
            fcntl.ioctl(_control(), request_code(cmd), buf, True)
        except OSError as exc:
            _note(cmd, op, name or uuid, exc.errno or errno.EIO, start)
            raise DmError(op, name or uuid, exc.errno or errno.EIO) from None
        _note(cmd, op, name or uuid, 0, start)
        h = unpack_header(buf)
        if not (answers and h.flags & BUFFER_FULL):
            return h, buf
        if out_size >= MAX_BUFFER:
            raise DmError(op, name, errno.EOVERFLOW)
        out_size *= 2


def _note(cmd: int, op: str, name: str, err: int, start: float) -> None:
    """Changes go in the program log (a step's event says what it did to which device);
    queries do not: they change nothing and would crowd it."""
    if cmd not in QUERIES:
        runner.note(["dm-ioctl", op, name], err, time.monotonic() - start)


# ------------------------------------------------------------------------ operations
def version() -> tuple[int, int, int]:
    """The kernel's dm-ioctl interface version."""
    return _call(VERSION_CMD, "version")[0].version


def targets() -> dict[str, tuple[int, int, int]]:
    """The target types the kernel has loaded, with their versions (dmsetup targets)."""
    h, buf = _call(LIST_VERSIONS, "targets", answers=True)
    return unpack_versions(buf, h.data_start, h.data_size)


def list_names() -> list[NameEntry]:
    """Every dm device: name, dev_t, uuid (one ioctl; the uuid comes with it on kernels >= 5.13,
    else it is None)."""
    h, buf = _call(LIST_DEVICES, "list", flags=UUID, answers=True)
    return unpack_names(buf, h.data_start, h.data_size)


def info(name: str) -> Info:
    """DM_DEV_STATUS: numbers, open count, suspended, tables present. DmError ENXIO if absent."""
    return info_of(_call(DEV_STATUS, "info", name)[0])


def exists(name: str) -> bool:
    try:
        info(name)
    except DmError as exc:
        if exc.errno == errno.ENXIO:
            return False
        raise
    return True


def list_devices() -> list[Info]:
    """Every dm device with its uuid, open count and state (DM_LIST_DEVICES, then
    DM_DEV_STATUS of each: microseconds each; one that went away meanwhile is left out)."""
    out: list[Info] = []
    for entry in list_names():
        try:
            out.append(info(entry.name))
        except DmError as exc:
            if exc.errno != errno.ENXIO:
                raise
    return out


def create(name: str, targets: Sequence[Target] = (), *, uuid: str = "",
           read_only: bool = False) -> Info:
    """Create NAME (with uuid) and its /dev/mapper node; with targets, load and resume them
    too. Nothing is left if a step fails."""
    h, _ = _call(DEV_CREATE, "create", name, uuid=uuid)
    try:
        if targets:
            load(name, targets, read_only=read_only)
            resume(name)
        made = info(name)
        _make_node(name, made.devno)
    except BaseException:
        _remove_quietly(name, os.makedev(*decode_dev(h.dev)))
        raise
    return made


def load(name: str, targets: Sequence[Target], *, read_only: bool = False) -> None:
    """Load a table into the inactive slot; it goes live at the next resume."""
    if not targets:
        raise DmError("table load", name, errno.EINVAL, f"device-mapper table load of {name}: "
                      "no targets")
    _call(TABLE_LOAD, "table load", name, flags=READONLY if read_only else 0,
          payload=pack_targets(targets), target_count=len(targets))


def clear(name: str) -> None:
    """Drop the inactive table (undo a load that will not be resumed)."""
    _call(TABLE_CLEAR, "table clear", name)


def _suspend_flags(nolockfs: bool, noflush: bool) -> int:
    return (SKIP_LOCKFS if nolockfs else 0) | (NOFLUSH if noflush else 0)


def _suspend_now(name: str, flags: int) -> None:
    _call(DEV_SUSPEND, "suspend", name, flags=SUSPEND | flags)


def suspend(name: str, *, nolockfs: bool = False, noflush: bool = False,
            timeout: float | None = None) -> None:
    """Suspend NAME (no-op when it already is). nolockfs: do not freeze a filesystem on it
    (`dmsetup --nolockfs`); noflush: targets that can push their queued I/O back do so instead
    of completing it. With a timeout, SuspendTimeout when the I/O in flight does not complete
    in time; the device is then left running."""
    flags = _suspend_flags(nolockfs, noflush)
    if timeout is None:
        _suspend_now(name, flags)
        return
    suspend_all([name], nolockfs=nolockfs, noflush=noflush, timeout=timeout)


def resume(name: str, *, nolockfs: bool = False, noflush: bool = False) -> Info:
    """Resume NAME, first swapping in the inactive table if one was loaded (the flags apply to
    the suspend the kernel does itself when the device was not suspended)."""
    return info_of(_call(DEV_SUSPEND, "resume", name, flags=_suspend_flags(nolockfs, noflush))[0])


def suspend_all(names: Sequence[str], *, nolockfs: bool = False, noflush: bool = False,
                timeout: float | None = None) -> None:
    """Suspend every device, in order. If one fails or the timeout passes, those already
    suspended are resumed (in reverse) before the error is raised: all or none."""
    flags = _suspend_flags(nolockfs, noflush)
    done: list[str] = []

    def work() -> None:
        for n in names:
            _suspend_now(n, flags)
            done.append(n)

    try:
        if timeout is None:
            work()
        else:
            _bounded(work, timeout, lambda: names[len(done)] if len(done) < len(names) else "")
    except BaseException:
        for n in reversed(done):
            with suppress(DmError):  # the first error is the one to report
                resume(n)
        raise


@contextmanager
def suspended(*names: str, nolockfs: bool = True, noflush: bool = False,
              timeout: float | None = None) -> Iterator[None]:
    """Hold every named device suspended for the block; all are resumed, in reverse, however
    the block ends. `timeout` bounds the suspends together."""
    suspend_all(names, nolockfs=nolockfs, noflush=noflush, timeout=timeout)
    try:
        yield
    finally:
        errors: list[DmError] = []
        for n in reversed(names):
            try:
                resume(n)
            except DmError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]


def message(name: str, text: str, *, sector: int = 0) -> str:
    """Send a message to the target at `sector` (thin-pool: `create_snap 5 3`, `delete 5`,
    `reserve_metadata_snap`, ...). Returns what the target answered ('' for most)."""
    h, buf = _call(TARGET_MSG, f"message '{text}'", name, payload=pack_message(text, sector),
                   answers=True)
    if h.flags & DATA_OUT:
        return _cstr_at(buf[:h.data_size], h.data_start)
    return ""


def status(name: str, *, noflush: bool = False) -> list[Target]:
    """dmsetup status: one status line per target. noflush: a thin pool does not commit its
    metadata first (a status must not wait on the disk)."""
    h, buf = _call(TABLE_STATUS, "status", name, flags=NOFLUSH if noflush else 0, answers=True)
    return unpack_targets(buf, h.data_start, h.target_count)


def table(name: str, *, inactive: bool = False) -> list[Target]:
    """dmsetup table (--inactive): the loaded targets. [] when that slot is empty."""
    flags = STATUS_TABLE | (QUERY_INACTIVE_TABLE if inactive else 0)
    h, buf = _call(TABLE_STATUS, "table", name, flags=flags, answers=True)
    present = INACTIVE_PRESENT if inactive else ACTIVE_PRESENT
    if not h.flags & present:
        return []
    return unpack_targets(buf, h.data_start, h.target_count)


def remove(name: str, *, missing_ok: bool = False, retries: int = 5) -> None:
    """Remove NAME and its node. EBUSY (an opener that is just going away) is retried a few
    times, 50 ms apart, as `dmsetup remove --retry` does."""
    try:
        devno: int | None = info(name).devno  # DM_DEV_REMOVE does not say which device it was
    except DmError as exc:
        if exc.errno != errno.ENXIO or not missing_ok:
            raise DmError("remove", name, exc.errno) from None
        devno = None
    for attempt in range(retries + 1):
        try:
            _call(DEV_REMOVE, "remove", name)
            break
        except DmError as exc:
            if exc.errno == errno.ENXIO and missing_ok:
                break
            if exc.errno != errno.EBUSY or attempt == retries:
                raise
            time.sleep(0.05)
    _drop_node(name, devno)


def _remove_quietly(name: str, devno: int) -> None:
    try:
        _call(DEV_REMOVE, "remove", name)
    except DmError:
        return
    _drop_node(name, devno)


# ------------------------------------------------------------------------ /dev/mapper nodes
def _make_node(name: str, devno: int) -> None:
    """The node udev would make. One already there for this device is kept; a stale one (of a
    device since removed) is replaced, as libdevmapper does."""
    path = MAPPER / name
    try:
        st = os.stat(path)
        if stat.S_ISBLK(st.st_mode) and st.st_rdev == devno:
            return
        os.unlink(path)
    except FileNotFoundError:
        pass
    os.mknod(path, stat.S_IFBLK | 0o600, devno)


def _drop_node(name: str, devno: int | None) -> None:
    """Unlink /dev/mapper/NAME when it is a block node of the removed device (or any block
    node, when the device was already gone): never a node of another device."""
    path = MAPPER / name
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISBLK(st.st_mode):
        return  # a udev symlink: udev removes it
    if devno is None or st.st_rdev == devno:
        path.unlink(missing_ok=True)


# ------------------------------------------------------------------------ bounded waits
INTERRUPT = signal.SIGURG  # ignored by default: a stray one harms nothing
GIVE_UP_AFTER = 5.0  # seconds of signalling before declaring the thread stuck


def _noop(signum: int, frame: FrameType | None) -> None:
    """Runs in the main thread; the signal's only job was to interrupt the ioctl."""


def prepare_interrupts() -> None:
    """Install the no-op handler bounded suspends rely on. Must run in the main thread (Python
    installs handlers only there); a bounded suspend from the main thread calls it itself."""
    if not callable(signal.getsignal(INTERRUPT)):
        signal.signal(INTERRUPT, _noop)


def _bounded(work: Callable[[], None], timeout: float, current: Callable[[], str]) -> None:
    """Run work in a thread; at the deadline signal that thread until its ioctl returns.
    A suspend interrupted that way fails with EINTR: reported as SuspendTimeout."""
    if not callable(signal.getsignal(INTERRUPT)):
        if threading.current_thread() is not threading.main_thread():
            raise HvlabError("a bounded device-mapper suspend from a thread needs "
                             "dmioctl.prepare_interrupts() called in the main thread first")
        prepare_interrupts()
    failed: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as exc:
            failed.append(exc)

    # In this context: the thread's ioctls go to the caller's program log.
    t = threading.Thread(target=contextvars.copy_context().run, args=(run,), name="dm-suspend",
                         daemon=True)
    t.start()
    t.join(timeout)
    give_up = time.monotonic() + GIVE_UP_AFTER
    while t.is_alive():
        if time.monotonic() > give_up:
            raise SuspendTimeout("suspend", current(), errno.ETIMEDOUT,
                                 f"suspend of {current()} did not return within {timeout:.2f} s "
                                 "and is not interruptible: its state is unknown")
        assert t.ident is not None
        with suppress(ProcessLookupError):  # it ended meanwhile
            signal.pthread_kill(t.ident, INTERRUPT)
        t.join(0.01)
    if not failed:
        return  # done, if late: the devices are suspended
    exc = failed[0]
    if isinstance(exc, DmError) and exc.errno == errno.EINTR:
        raise SuspendTimeout("suspend", exc.name, errno.EINTR,
                             f"suspend of {exc.name} did not return within {timeout:.2f} s: I/O "
                             "below it does not complete; the kernel gave up and left it "
                             "running") from None
    raise exc
