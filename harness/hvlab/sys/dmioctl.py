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
laid out as linux/include/uapi/linux/dm-ioctl.h says: dmwire.py packs it (pure), this module
sends it with `fcntl.ioctl`.

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
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from types import FrameType

from hvlab.errors import HvlabError
from hvlab.sys import run as runner
from hvlab.sys.dmwire import (
    ACTIVE_PRESENT,
    BUFFER_FULL,
    DATA_OUT,
    DEV_CREATE,
    DEV_REMOVE,
    DEV_STATUS,
    DEV_SUSPEND,
    INACTIVE_PRESENT,
    LIST_DEVICES,
    LIST_VERSIONS,
    MAPPER,
    MAX_BUFFER,
    NOFLUSH,
    OUT_BUFFER,
    QUERIES,
    QUERY_INACTIVE_TABLE,
    READONLY,
    SKIP_LOCKFS,
    STATUS_TABLE,
    SUSPEND,
    TABLE_CLEAR,
    TABLE_LOAD,
    TABLE_STATUS,
    TARGET_MSG,
    UUID,
    VERSION_CMD,
    Header,
    _cstr_at,
    info_of,
    pack_message,
    pack_request,
    pack_targets,
    request_code,
    unpack_header,
    unpack_names,
    unpack_targets,
    unpack_versions,
)
from hvlab.sys.dmwire import (  # re-exported: dmioctl is where callers find them
    DmError as DmError,
)
from hvlab.sys.dmwire import (
    Info as Info,
)
from hvlab.sys.dmwire import (
    NameEntry as NameEntry,
)
from hvlab.sys.dmwire import (
    SuspendTimeout as SuspendTimeout,
)
from hvlab.sys.dmwire import (
    Target as Target,
)
from hvlab.sys.dmwire import (
    decode_dev as decode_dev,
)
from hvlab.sys.dmwire import (
    encode_dev as encode_dev,
)

CONTROL = "/dev/mapper/control"


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
