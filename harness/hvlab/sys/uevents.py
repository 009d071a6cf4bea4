"""Kernel block uevents (NETLINK_KOBJECT_UEVENT): wait for nodes, record changes."""

from __future__ import annotations

import errno
import os
import select
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from hvlab.sys import dmioctl


@dataclass(frozen=True)
class Uevent:
    action: str  # add, remove, change
    devname: str  # loop3, dm-4 ...
    name: str  # dm name where known
    at: float


@dataclass
class Recorder:
    """Block uevents seen while a `with watch()` block ran (filled in when the block ends)."""

    events: list[Uevent] = field(default_factory=list)
    # Read what is queued so far (the block goes on): a step whose last part must be quick
    # (the freeze request) reads the events of its slow part before it.
    drain: Callable[[], None] = lambda: None

    def created(self) -> list[str]:
        return list(dict.fromkeys(e.name or e.devname for e in self.events if e.action == "add"))

    def removed(self) -> list[str]:
        return list(dict.fromkeys(
            e.name or e.devname for e in self.events if e.action == "remove"))


NETLINK_KOBJECT_UEVENT = 15  # linux/netlink.h; the socket module names neither
SO_RCVBUFFORCE = 33


def _open() -> socket.socket:
    """The kernel's uevent multicast group, read with a plain netlink socket. pyroute2 0.9's
    UeventSocket ran an asyncio loop: up to 40 ms to open (too dear for the freeze window), and
    its transport died for good on the ENOBUFS a full buffer reports."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK
                         | socket.SOCK_CLOEXEC, NETLINK_KOBJECT_UEVENT)
    try:
        # root may pass rmem_max: a step that makes a VM's devices sends hundreds of events
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 4 << 20)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    try:
        sock.bind((0, 1))  # group 1: the kernel's own events (udev re-sends on group 2)
    except OSError:
        sock.close()
        raise
    return sock


def _read(sock: socket.socket) -> Iterator[dict[str, str]]:
    """What is queued, each as its KEY=VALUE properties ("add@/devices/..." line skipped)."""
    while True:
        try:
            data = sock.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError as e:
            if e.errno == errno.ENOBUFS:
                continue  # the kernel dropped some; watch() reconciles with sysfs
            raise
        yield dict(f.split("=", 1) for f in data.decode(errors="replace").split("\0")
                   if "=" in f)


def _decode(props: dict[str, str]) -> Uevent | None:
    if props.get("SUBSYSTEM") != "block":
        return None
    return Uevent(props.get("ACTION", ""), props.get("DEVNAME", ""), props.get("DM_NAME", ""),
                  time.time())


def _dm_name(devname: str) -> str:
    p = Path("/sys/class/block") / devname / "dm" / "name"
    try:
        return p.read_text().strip()
    except OSError:
        return ""


@contextmanager
def watch(settle: float = 0.25) -> Iterator[Recorder]:
    """Record block uevents for the duration of the block. Degrades to sysfs if unavailable.

    The kernel queues the events on our socket; we read it when the block ends, until `settle`
    seconds pass without one. dm and loop emit their uevents inside the ioctl, so settle=0
    (read what is queued) loses nothing from them; it is what the freeze window uses."""
    rec = Recorder()
    try:
        sock = _open()
    except OSError:
        sock = None
    before = _block_devices()

    def drain(wait: float = 0.0) -> None:
        while sock is not None and select.select([sock], [], [], wait)[0]:
            for props in _read(sock):
                ev = _decode(props)
                if ev is None:
                    continue
                if ev.devname.startswith("dm-") and not ev.name:
                    name = _dm_name(ev.devname) if ev.action != "remove" else ""
                    ev = Uevent(ev.action, ev.devname, name or before.get(ev.devname, ""),
                                ev.at)
                rec.events.append(ev)

    rec.drain = drain
    try:
        yield rec
    finally:
        try:
            drain(settle)
        finally:
            rec.drain = lambda: None
            if sock is not None:
                sock.close()
            _reconcile(rec, before)


def _block_devices() -> dict[str, str]:
    """Block devices now -> dm name or ''. One listdir and one DM_LIST_DEVICES: cheap enough
    for the freeze window, where reading each dm device's name from sysfs cost 30 ms."""
    try:
        devs = os.listdir("/sys/class/block")
    except OSError:
        return {}
    try:
        dm_names = {f"dm-{dmioctl.decode_dev(e.dev)[1]}": e.name for e in dmioctl.list_names()}
    except dmioctl.DmError:  # no device-mapper here
        dm_names = {}
    return {d: dm_names.get(d) or (_dm_name(d) if d.startswith("dm-") else "") for d in devs}


def _reconcile(rec: Recorder, before: dict[str, str]) -> None:
    """Add what the sysfs before/after difference shows but no uevent reported: the kernel
    does not announce every dm device it adds (an LV that lvcreate activates comes with a
    `change` on its origin, not an `add` of its own)."""
    after = _block_devices()
    seen = {(e.action, e.devname) for e in rec.events}
    now = time.time()
    for dev in sorted(set(after) - set(before)):
        if ("add", dev) not in seen:
            rec.events.append(Uevent("add", dev, after[dev], now))
    for dev in sorted(set(before) - set(after)):
        if ("remove", dev) not in seen:
            rec.events.append(Uevent("remove", dev, before[dev], now))


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Wait on uevents (not blind sleeps) until predicate() holds."""
    if predicate():
        return
    deadline = time.monotonic() + timeout
    try:
        sock: socket.socket | None = _open()
    except OSError:
        sock = None
    try:
        while time.monotonic() < deadline:
            if sock is not None:
                if select.select([sock], [], [], 0.2)[0]:
                    for _ in _read(sock):
                        pass
            else:
                time.sleep(0.05)
            if predicate():
                return
    finally:
        if sock is not None:
            sock.close()
    raise TimeoutError(f"timed out waiting for {what or 'device'}")


def wait_node(path: str, *, present: bool = True, timeout: float = 10.0) -> None:
    wait_for(lambda: os.path.exists(path) == present, timeout, path)
