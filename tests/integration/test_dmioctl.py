"""dmioctl on real device-mapper: what it makes is what `dmsetup` sees, a suspend that cannot
complete is bounded, and a thin pool snapshots its origins by message (issue 10's window) with
the pool's metadata clean and LVM's view intact afterwards."""

from __future__ import annotations

import hashlib
import mmap
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, suppress
from pathlib import Path

import pytest

from hvlab.backup import thinmeta
from hvlab.lab import poolstatus
from hvlab.sys import dmioctl, loop, uevents
from hvlab.sys.dmioctl import DmError, Target
from hvlab.sys.run import run
from hvlab_fixtures.plugin import LabHandle, one_vm_lab, requires
from hvlab_fixtures.waits import wait_for

pytestmark = pytest.mark.integration

ONE_DISK = one_vm_lab()
PREFIX = f"hvlabtest{os.getpid()}_"
CHUNK = 4 << 20


def _majmin(dev: str) -> str:
    rdev = os.stat(dev).st_rdev
    return f"{os.major(rdev)}:{os.minor(rdev)}"


def _sha(dev: str) -> str:
    """sha256 of a block device read with O_DIRECT: another device stacked on the same blocks
    (a controller over an LV) writes past this one's page cache."""
    h = hashlib.sha256()
    buf = mmap.mmap(-1, CHUNK)
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    try:
        off = 0
        while n := os.preadv(fd, [buf], off):
            h.update(buf[:n])
            off += n
    finally:
        os.close(fd)
        buf.close()
    return h.hexdigest()


def _dmsetup(*args: str) -> str:
    return run(["dmsetup", *args]).stdout.strip()


def _ours_left() -> list[str]:
    return [e.name for e in dmioctl.list_names() if e.name.startswith(PREFIX)]


@pytest.fixture
def loop_dev(tmp_path: Path) -> Iterator[str]:
    """A 64 MiB loop device of the test's own; its dm devices (PREFIX) must be gone at the end."""
    requires("root", "loop", "dm-thin")
    img = tmp_path / "lin.img"
    with open(img, "wb") as fh:
        fh.truncate(64 << 20)
    dev = loop.attach(img)
    try:
        yield dev
    finally:
        for name in reversed(_ours_left()):
            with suppress(DmError):
                dmioctl.resume(name)
            dmioctl.remove(name, missing_ok=True)
        loop.detach(dev)
    assert not _ours_left()


def test_create_load_suspend_resume_remove_as_dmsetup_sees_them(loop_dev: str) -> None:
    name, mm = f"{PREFIX}lin", _majmin(loop_dev)
    major, minor = dmioctl.version()[:2]
    assert major == 4 and minor >= 27  # 6.1 has 4.47
    # two targets, one given by path: the kernel answers with major:minor, as dmsetup prints
    made = dmioctl.create(name, [Target(0, 2048, "linear", f"{loop_dev} 0"),
                                 Target(2048, 4096, "linear", f"{mm} 8192")],
                          uuid=f"HVLAB-{PREFIX}lin")
    want = f"0 2048 linear {mm} 0\n2048 4096 linear {mm} 8192"
    assert _dmsetup("table", name) == want
    assert "\n".join(t.line for t in dmioctl.table(name)) == want
    assert _dmsetup("info", "-c", "--noheadings", "--separator", "|", "-o",
                    "name,uuid,major,minor,open", name) == (
        f"{name}|HVLAB-{PREFIX}lin|{made.major}|{made.minor}|0")
    st = os.stat(made.path)  # our node: no udev in the lab VM
    assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (made.major, made.minor)
    assert [line.rstrip() for line in _dmsetup("status", name).splitlines()] == [
        t.line for t in dmioctl.status(name)] == ["0 2048 linear", "2048 4096 linear"]
    listed = {d.name: d for d in dmioctl.list_devices()}
    assert listed[name].uuid == f"HVLAB-{PREFIX}lin" and not listed[name].suspended
    assert {e.name: e.uuid for e in dmioctl.list_names()}[name] == f"HVLAB-{PREFIX}lin"

    # a refused create changes nothing; a refused load leaves the live table alone
    with pytest.raises(DmError, match=rf"create of {name} failed.*EBUSY"):
        dmioctl.create(name, [Target(0, 8, "zero")])
    with pytest.raises(DmError, match=rf"table load of {name} failed.*ENODEV"):
        dmioctl.load(name, [Target(0, 8, "linear", "not-a-device 0")])
    assert dmioctl.table(name, inactive=True) == [] and _dmsetup("table", name) == want

    # load into the inactive slot; suspend with each flag set; the first resume swaps it in
    dmioctl.load(name, [Target(0, 6144, "linear", f"{mm} 0")])
    assert "INACTIVE" in _dmsetup("info", name) and dmioctl.info(name).inactive_table
    for flags in ({}, {"nolockfs": True}, {"noflush": True}, {"nolockfs": True, "noflush": True}):
        dmioctl.suspend(name, **flags)
        assert dmioctl.info(name).suspended and "SUSPENDED" in _dmsetup("info", name)
        dmioctl.suspend(name, **flags)  # already suspended: a no-op, as in the kernel
        assert not dmioctl.resume(name, **flags).suspended
        assert _dmsetup("table", name) == f"0 6144 linear {mm} 0"
    # resume of a running device with a new table: the kernel suspends it itself
    dmioctl.load(name, [Target(0, 4096, "linear", f"{mm} 2048")])
    dmioctl.resume(name, nolockfs=True)
    assert _dmsetup("table", name) == f"0 4096 linear {mm} 2048"
    assert "ACTIVE" in _dmsetup("info", name) and not dmioctl.info(name).inactive_table

    with pytest.raises(DmError, match=rf"message 'hello' of {name} failed.*EINVAL"):
        dmioctl.message(name, "hello")  # linear takes no messages
    fd = os.open(made.path, os.O_RDONLY)
    try:
        with pytest.raises(DmError, match=rf"remove of {name} failed.*EBUSY"):
            dmioctl.remove(name, retries=1)
    finally:
        os.close(fd)
    dmioctl.remove(name)
    assert not dmioctl.exists(name) and not os.path.exists(made.path)
    assert name not in _dmsetup("ls")
    with pytest.raises(DmError, match=rf"remove of {name} failed.*ENXIO"):
        dmioctl.remove(name)
    dmioctl.remove(name, missing_ok=True)


def test_a_suspend_whose_io_never_completes_is_bounded(loop_dev: str) -> None:
    """upper -> lower -> loop, lower suspended, a direct write into upper: upper's suspend
    waits for that write. Bounded, the kernel gives up at the deadline and upper keeps
    running; so does suspend_all, which also resumes what it had suspended."""
    lower, upper, other = f"{PREFIX}lower", f"{PREFIX}upper", f"{PREFIX}other"
    dmioctl.create(lower, [Target(0, 8192, "linear", f"{_majmin(loop_dev)} 0")])
    up = dmioctl.create(upper, [Target(0, 8192, "linear", f"{_majmin(f'/dev/mapper/{lower}')} 0")])
    dmioctl.create(other, [Target(0, 8192, "linear", f"{_majmin(loop_dev)} 8192")])
    buf = mmap.mmap(-1, 4096)
    buf.write(b"x" * 4096)
    done = threading.Event()

    def write() -> None:
        fd = os.open(up.path, os.O_WRONLY | os.O_DIRECT)
        try:
            os.pwritev(fd, [buf], 0)
        finally:
            os.close(fd)
            done.set()

    dmioctl.suspend(lower, nolockfs=True)
    writer = threading.Thread(target=write)
    writer.start()
    try:
        inflight = Path(f"/sys/dev/block/{up.major}:{up.minor}/inflight")
        wait_for(lambda: inflight.read_text().split()[1] != "0", 10,
                 "the write reaching the upper device")
        t = time.monotonic()
        with pytest.raises(dmioctl.SuspendTimeout, match=rf"{upper} did not return within"):
            dmioctl.suspend(upper, nolockfs=True, timeout=0.5)
        assert time.monotonic() - t >= 0.5  # given up at its limit, not at once
        assert not dmioctl.info(upper).suspended
        with pytest.raises(dmioctl.SuspendTimeout, match=upper):
            dmioctl.suspend_all([other, upper], nolockfs=True, noflush=True, timeout=0.3)
        assert not dmioctl.info(other).suspended and not dmioctl.info(upper).suspended
        assert not done.is_set()
    finally:
        dmioctl.resume(lower)
        writer.join(10)
    assert done.is_set()
    with dmioctl.suspended(other, upper, timeout=5):  # nothing in flight now: immediate
        assert dmioctl.info(upper).suspended and dmioctl.info(other).suspended
    assert not dmioctl.info(upper).suspended
    fd = os.open(loop_dev, os.O_RDONLY | os.O_DIRECT)
    try:
        os.preadv(fd, [buf], 0)
    finally:
        os.close(fd)
    assert buf[:4096] == b"x" * 4096  # the write went through once lower resumed
    for name in (upper, other, lower):
        dmioctl.remove(name)


def test_pool_snapshots_by_message_with_metadata_clean_and_lvm_intact(
        lab_factory: Callable[..., LabHandle]) -> None:
    """Issue 10's window on a lab's pool: suspend the origin, create_snap into a free thin id,
    resume; the snapshot, activated by a thin table, holds the origin at that moment while
    the origin moves on. Then the way the flow will use it: LVM allocates a snapshot LV
    before the window (inactive), inside the window the pool re-snapshots the origin into that
    LV's thin id (delete + create_snap); LVM activates, reads and removes it as its own. The
    pool's transaction id never moves, thin_check stays clean, and the plugin checks the
    lab after the test (LVM's and the kernel's transaction ids, thin_check, no stray LV)."""
    h = lab_factory(ONE_DISK)
    n = h.names
    lvm = n.lvm()
    lv = n.lv("vm01", "disk0")
    origin_dm, ctl = n.dm_lv_name(lv), n.ctl("vm01", "disk0")
    pool_dm = f"{n.dm_lv_name(n.pool)}-tpool"
    rows = lvm.lvs(n.vg)
    origin_id = rows[lv].thin_id
    assert origin_id is not None
    new_id = max(r.thin_id for r in rows.values() if r.thin_id is not None) + 1
    sectors = dmioctl.table(origin_dm)[0].length
    tid = poolstatus.transaction_id(n)
    mnt = h.mountpoint("vm01", "disk0")
    snap_dm = f"{n.vg}_dmtest_snap"

    def write(file: str) -> None:
        (mnt / file).write_bytes(os.urandom(1 << 20))
        os.sync()

    write("before.bin")
    with ExitStack() as undo:  # last in, first out: the snapshot's device, then its thin id
        # the controller held: nothing reaches the origin from its filesystem meanwhile
        with dmioctl.suspended(ctl, timeout=10):
            at_t0 = _sha(n.lv_path(lv))
            with dmioctl.suspended(origin_dm, timeout=10):
                dmioctl.message(pool_dm, f"create_snap {new_id} {origin_id}")
            undo.callback(dmioctl.message, pool_dm, f"delete {new_id}")
            with pytest.raises(DmError, match="EEXIST"):  # an id in use is refused
                dmioctl.message(pool_dm, f"create_snap {new_id} {origin_id}")
            snap = dmioctl.create(snap_dm, [Target(0, sectors, "thin",
                                                   f"{_majmin(f'/dev/mapper/{pool_dm}')} "
                                                   f"{new_id}")],
                                  uuid=f"{n.uuid_prefix}dmtest-snap", read_only=True)
            undo.callback(dmioctl.remove, snap_dm)
            assert snap.read_only and _sha(snap.path) == at_t0
        write("after.bin")
        assert _sha(n.lv_path(lv)) != at_t0 and _sha(snap.path) == at_t0
        with pytest.raises(DmError, match="EBUSY"):  # an active thin device is not deleted
            dmioctl.message(pool_dm, f"delete {new_id}")
        assert thinmeta.check(n) == ""
    with thinmeta.metadata_snap(n) as ms:
        assert new_id not in ms.dump()[1] and origin_id in ms.dump()[1]

    # LVM allocates (name, thin id, tags, metadata) before the window; the pool fills it in.
    lvm("lvcreate", "-q", "-s", "-ky", "-n", "dmtest_c", f"{n.vg}/{lv}", "--addtag", n.tag)
    c = lvm.lvs(n.vg)["dmtest_c"]
    assert c.thin_id is not None and c.major is None  # allocated, not active
    tid = poolstatus.transaction_id(n)  # LVM's lvcreate moved it once
    with dmioctl.suspended(ctl, timeout=10):
        at_lvcreate = _sha(n.lv_path(lv))
    write("after-lvcreate.bin")
    with dmioctl.suspended(ctl, timeout=10):
        at_t0 = _sha(n.lv_path(lv))
        with dmioctl.suspended(origin_dm, timeout=10):
            dmioctl.message(pool_dm, f"delete {c.thin_id}")
            dmioctl.message(pool_dm, f"create_snap {c.thin_id} {origin_id}")
    write("after-window.bin")
    assert poolstatus.transaction_id(n) == tid and thinmeta.check(n) == ""
    lvm("lvchange", "-q", "-ay", "-K", f"{n.vg}/dmtest_c")
    try:
        assert _sha(n.lv_path("dmtest_c")) == at_t0 != at_lvcreate
    finally:
        lvm("lvremove", "-q", "-y", f"{n.vg}/dmtest_c")
    assert "dmtest_c" not in lvm.lvs(n.vg) and thinmeta.check(n) == ""
    assert not [d for d in dmioctl.list_names() if "dmtest" in d.name]


def test_the_kept_uevent_socket_survives_an_overflow(loop_dev: str) -> None:
    """The steps' uevent socket stays open between backups and fills up meanwhile; the kernel
    then answers ENOBUFS once. That failed every later backup of the process (CI, 6627a11)."""
    def churn(n: int) -> None:  # three uevents a round: add, change (resume), remove
        for _ in range(n):
            dmioctl.create(f"{PREFIX}churn", [Target(0, 8, "linear", f"{loop_dev} 0")])
            dmioctl.remove(f"{PREFIX}churn")

    with uevents.watch(settle=0):
        pass  # opens the kept socket
    churn(400)  # far past the socket's buffer (rmem_max)
    with uevents.watch(settle=0) as rec:
        dmioctl.create(f"{PREFIX}one", [Target(0, 8, "linear", f"{loop_dev} 0")])
    assert rec.created() == [f"{PREFIX}one"] and not rec.removed()
    with uevents.watch(settle=0) as rec:  # and inside a watch: what was lost is reconciled
        churn(400)
        dmioctl.remove(f"{PREFIX}one")
    assert f"{PREFIX}one" in rec.removed() and f"{PREFIX}one" not in rec.created()
