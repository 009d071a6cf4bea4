"""The guest emulator in-process on plain directories, fsfreeze faked: its state machine and
channel without root or devices. (Not conftest.py: imported by the modules that use it.)"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from hvlab.guest.client import GuestClient
from hvlab.guest.config import GuestConfig
from hvlab.guest.emulator import Guest
from hvlab.guest.protocol import Server
from hvlab.guest.quiesce import FreezeError


class FakeFreezer:
    def __init__(self) -> None:
        self.frozen: list[str] = []
        self.calls: list[tuple[str, list[str]]] = []
        self.fail = False
        self.delay = 0.0  # a slow FIFREEZE: widens the window for concurrent requests

    def freeze(self, mountpoints: Sequence[Path]) -> list[str]:
        self.calls.append(("freeze", [str(m) for m in mountpoints]))
        time.sleep(self.delay)
        if self.fail:
            raise FreezeError("freeze of x failed: injected")
        self.frozen = [str(m) for m in mountpoints]
        return self.frozen

    def thaw(self, mountpoints: Sequence[Path]) -> list[str]:
        self.calls.append(("thaw", [str(m) for m in mountpoints]))
        done, self.frozen = self.frozen, []
        return done


class Running:
    def __init__(self, guest: Guest, client: GuestClient, freezer: FakeFreezer) -> None:
        self.guest, self.client, self.freezer = guest, client, freezer


def make_guest(profile: str = "windows", **extra: Any) -> Iterator[Running]:
    base = Path(tempfile.mkdtemp(prefix="hvg-", dir="/tmp"))
    disks = []
    for n in ("d0", "d1"):
        (base / n).mkdir()
        disks.append({"name": n, "mountpoint": str(base / n)})
    cfg = GuestConfig.from_dict(
        {
            "vm": "vm1",
            "profile": profile,
            "run_dir": str(base / "run"),
            "socket": str(base / "run" / "g.sock"),
            "disks": disks,
            "workload": {"ops_per_s": 200, "append_ops_per_s": 100, "scratch_ops_per_s": 50},
            **extra,
        }
    )
    cfg.run_dir.mkdir()
    freezer = FakeFreezer()
    guest = Guest(cfg, freezer)
    guest.start()
    assert cfg.socket is not None
    server = Server(cfg.socket, guest.handle)
    t = threading.Thread(
        target=server.serve, args=(guest.stop_event.is_set, guest.write_status, 0.2)
    )
    t.start()
    try:
        yield Running(guest, GuestClient(cfg.socket, timeout=10), freezer)
    finally:
        guest.stop_event.set()
        t.join(5)
        server.close()
        guest.shutdown()
        shutil.rmtree(base)


@pytest.fixture
def g() -> Iterator[Running]:
    yield from make_guest()
