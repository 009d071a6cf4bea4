"""Kernel block uevents (NETLINK_KOBJECT_UEVENT via pyroute2): wait for nodes, record changes."""

from __future__ import annotations

import os
import select
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyroute2 import UeventSocket

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


def _decode(msg: Any) -> Uevent | None:
    # pyroute2 puts the uevent properties at the top level of the message.
    def prop(key: str) -> str:
        try:
            value = msg.get(key)
        except Exception:
            return ""
        return value if isinstance(value, str) else ""

    if prop("SUBSYSTEM") != "block":
        return None
    return Uevent(prop("ACTION"), prop("DEVNAME"), prop("DM_NAME"), time.time())


def _dm_name(devname: str) -> str:
    p = Path("/sys/class/block") / devname / "dm" / "name"
    try:
        return p.read_text().strip()
    except OSError:
        return ""


_shared: Any = None  # this process's socket for watch(): opening one costs up to 40 ms


def _shared_socket() -> Any:
    """Kept open for the process: a step's watch in the freeze window must cost little. Only
    the main thread watches (a pyroute2 socket must not be read from two threads)."""
    global _shared
    if _shared is None or os.getpid() != _shared_pid[0]:
        _shared, _shared_pid[0] = _own_socket(), os.getpid()
    return _shared


def _own_socket() -> Any:
    sock = UeventSocket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind()
    return sock


_shared_pid = [0]
_active = [0]  # watch blocks running in this process


@contextmanager
def watch(settle: float = 0.25) -> Iterator[Recorder]:
    """Record block uevents for the duration of the block. Degrades to nothing if unavailable.

    The kernel queues the events on our socket; we drain it in this thread when the block ends
    (pyroute2's sockets must not be read from another thread), until `settle` seconds pass
    without one. dm and loop emit their uevents inside the ioctl, so settle=0 (drain what is
    queued) loses nothing from them; it is what the freeze window uses."""
    rec = Recorder()
    nested = _active[0] > 0  # an outer watch reads the shared socket: this one gets its own
    try:
        sock = _own_socket() if nested else _shared_socket()
    except OSError:
        before = _block_devices()
        try:
            yield rec
        finally:
            _reconcile(rec, before)
        return
    while select.select([sock], [], [], 0)[0]:  # from before the block: not its own
        sock.get()
    before = _block_devices()

    def drain(wait: float = 0.0) -> None:
        while select.select([sock], [], [], wait)[0]:
            for msg in sock.get():
                ev = _decode(msg)
                if ev is None:
                    continue
                if ev.devname.startswith("dm-") and not ev.name:
                    name = _dm_name(ev.devname) if ev.action != "remove" else ""
                    ev = Uevent(ev.action, ev.devname, name or before.get(ev.devname, ""),
                                ev.at)
                rec.events.append(ev)

    rec.drain = drain
    _active[0] += 1
    try:
        yield rec
    finally:
        _active[0] -= 1
        try:
            drain(settle)
        finally:
            rec.drain = lambda: None
            if nested:
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
        sock = UeventSocket()
        sock.bind()
    except OSError:
        sock = None
    try:
        while time.monotonic() < deadline:
            if sock is not None:
                r, _, _ = select.select([sock], [], [], 0.2)
                if r:
                    sock.get()
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
