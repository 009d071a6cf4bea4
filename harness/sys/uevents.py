"""Kernel block uevents (NETLINK_KOBJECT_UEVENT via pyroute2): wait for nodes, record changes."""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyroute2 import UeventSocket


@dataclass(frozen=True)
class Uevent:
    action: str  # add, remove, change
    devname: str  # loop3, dm-4 ...
    name: str  # dm name where known
    at: float


@dataclass
class Recorder:
    """Collects block uevents in a background thread while a `with watch()` block runs."""

    events: list[Uevent] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def created(self) -> list[str]:
        return [e.name or e.devname for e in self.events if e.action == "add"]

    def removed(self) -> list[str]:
        return [e.name or e.devname for e in self.events if e.action == "remove"]


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


@contextmanager
def watch() -> Iterator[Recorder]:
    """Record block uevents for the duration of the block. Degrades to nothing if unavailable."""
    rec = Recorder()
    try:
        sock = UeventSocket()
        sock.bind()
    except OSError:
        yield rec
        return

    def loop() -> None:
        while not rec._stop.is_set():
            r, _, _ = select.select([sock], [], [], 0.1)
            if not r:
                continue
            try:
                for msg in sock.get():
                    ev = _decode(msg)
                    if ev is None:
                        continue
                    if ev.action == "add" and ev.devname.startswith("dm-") and not ev.name:
                        ev = Uevent(ev.action, ev.devname, _dm_name(ev.devname), ev.at)
                    rec.events.append(ev)
            except Exception:  # a malformed message must not kill the recorder
                continue

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield rec
    finally:
        time.sleep(0.05)  # let the last events of the block arrive
        rec._stop.set()
        t.join(timeout=2)
        sock.close()


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
