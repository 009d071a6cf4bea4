"""The guest emulator's process: its log, pid file, signals and the channel it serves."""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any, Protocol

import psutil

from hvlab.guest import autorecovery
from hvlab.guest.config import GuestConfig
from hvlab.guest.protocol import Server


class Guest(Protocol):
    """What of the emulator's Guest this module runs (emulator.py imports this module)."""

    cfg: GuestConfig
    stop_event: threading.Event
    server: Server | None

    def start(self) -> None: ...
    def handle(self, op: str, args: dict[str, Any]) -> dict[str, Any]: ...
    def write_status(self, final: bool = False) -> None: ...
    def shutdown(self) -> None: ...

log = logging.getLogger("hvlab.guest")


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def pid_line() -> str:
    """guest.pid: the pid and its start time (supervise tells a recycled pid by it)."""
    return f"{os.getpid()} {psutil.Process().create_time()!r}\n"


def run(guest: Guest) -> None:
    """Serve the guest's channel (or, profile none, only its workloads) until SIGTERM/SIGINT;
    the pid file exists exactly while it runs."""
    cfg = guest.cfg
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        filename=cfg.run_dir / "guest.log",
        level=logging.INFO,
        format="%(asctime)s %(process)d %(threadName)s %(levelname)s %(name)s: %(message)s",
    )
    for left in autorecovery.clean_stale_ar_mounts(cfg.run_dir):
        log.warning("unmounted an auto-recovery mount a killed guest left: %s", left)
    signal.signal(signal.SIGTERM, lambda *_: guest.stop_event.set())
    signal.signal(signal.SIGINT, lambda *_: guest.stop_event.set())
    pid_file = cfg.run_dir / "guest.pid"
    atomic_write(pid_file, pid_line())
    server: Server | None = None
    try:
        guest.start()
        if cfg.socket is not None and cfg.profile != "none":
            server = guest.server = Server(cfg.socket, guest.handle, cfg.limits)
        guest.write_status()
        if server is not None:
            server.serve(guest.stop_event.is_set, guest.write_status, cfg.status_every_s)
        else:
            while not guest.stop_event.wait(cfg.status_every_s):
                guest.write_status()
        log.info("stopping on request")
    except Exception:
        log.exception("guest failed")
        raise
    finally:
        if server is not None:
            server.close()
        guest.shutdown()
        pid_file.unlink(missing_ok=True)
