"""The guest emulator: one process per VM, `python -m hvlab.guest.emulator --config FILE.json`.

Profiles:
- windows: VSS-aware ledger (holds one txn open at freeze) + scratch + appender; auto-recovery.
- linux: hv_vss_daemon-like: no application writers, fsfreeze only, no auto-recovery. The ledger
  and appender still run but are not quiesced: their writes just block on the frozen fs, so a
  checkpoint is filesystem-consistent and the ledger may hold an in-flight txn (crash-consistent
  for the application, rolled back when it next starts).
- none: no integration services: workloads run, no socket; the host must fall back to crash-
  consistent backups.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import stat
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hvlab.errors import BadInput, CommandError, HvlabError
from hvlab.guest import ledger, quiesce
from hvlab.guest.protocol import ProtocolError, Server, one_line
from hvlab.guest.writers import (
    AppendWriter,
    LedgerWriter,
    ScratchWriter,
    Workload,
    Writer,
    WriterError,
)
from hvlab.sys import fs
from hvlab.sys.run import run

AR_PREFIX = "ar-"  # auto-recovery mounts: <run_dir>/ar-XXXX/<disk>

log = logging.getLogger("hvlab.guest")

PROFILES = ("windows", "linux", "none")
FLUSH_WRITES_TIMEOUT = "VSS_E_FLUSH_WRITES_TIMEOUT"


@dataclass
class GuestConfig:
    vm: str
    profile: str
    run_dir: Path
    disks: list[tuple[str, Path]]
    socket: Path | None = None
    workload: Workload = field(default_factory=Workload)
    freeze_timeout_s: float = 10.0  # flush-and-hold, as VSS
    writer_timeout_s: float = 60.0  # writer freeze-to-thaw
    status_every_s: float = 1.0

    @staticmethod
    def from_dict(d: dict[str, Any]) -> GuestConfig:
        try:
            profile = str(d.get("profile", "windows"))
            if profile not in PROFILES:
                raise BadInput(f"unknown guest profile {profile!r} (one of {', '.join(PROFILES)})")
            disks = [(str(x["name"]), Path(x["mountpoint"])) for x in d["disks"]]
            if not disks:
                raise BadInput("a guest needs at least one disk")
            wl = dict(d.get("workload", {}))
            if "seed" in d:
                wl.setdefault("seed", int(d["seed"]))
            sock = d.get("socket")
            if sock is None and profile != "none":
                raise BadInput(f"profile {profile} needs a socket path")
            cfg = GuestConfig(
                vm=str(d["vm"]),
                profile=profile,
                run_dir=Path(d["run_dir"]),
                disks=disks,
                socket=Path(sock) if sock else None,
                workload=Workload.from_dict(wl),
                freeze_timeout_s=float(d.get("freeze_timeout_s", 10.0)),
                writer_timeout_s=float(d.get("writer_timeout_s", 60.0)),
                status_every_s=float(d.get("status_every_s", 1.0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BadInput(f"bad guest config: {one_line(exc)}") from exc
        return cfg

    @staticmethod
    def load(path: Path) -> GuestConfig:
        try:
            return GuestConfig.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            raise BadInput(f"cannot read guest config {path}: {one_line(exc)}") from exc


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


class Guest:
    """State machine of the guest's VSS side. Ops run in the server thread; the watchdog in a
    timer thread; `_lock` serialises the state changes of both."""

    def __init__(self, cfg: GuestConfig, freezer: quiesce.Freezer | None = None) -> None:
        self.cfg = cfg
        self.freezer: quiesce.Freezer = freezer or quiesce.FsFreezer()
        self.roots = {name: mnt for name, mnt in cfg.disks}
        self.mounts = [mnt for _, mnt in cfg.disks]
        self.state = "idle"  # idle | prepared | frozen | thawed
        self.frozen_at: float | None = None
        self.thawed_at: float | None = None
        self.pending_timeout: dict[str, Any] | None = None
        self._gen = 0
        self._timer: threading.Timer | None = None
        self._lock = threading.RLock()
        self.writers: list[Writer] = []
        self.stop_event = threading.Event()

    @property
    def auto_recovery(self) -> bool:
        return self.cfg.profile == "windows"

    @property
    def vss_writers(self) -> list[Writer]:
        return [w for w in self.writers if w.vss_aware]

    @property
    def ledger_writer(self) -> LedgerWriter | None:
        return next((w for w in self.writers if isinstance(w, LedgerWriter)), None)

    def start(self) -> None:
        wl = self.cfg.workload
        windows = self.cfg.profile == "windows"
        self.writers = [LedgerWriter(self.roots, wl, vss_aware=windows, seed=wl.seed)]
        if windows:
            self.writers.append(ScratchWriter(self.mounts, wl, seed=wl.seed + 1))
        self.writers.append(AppendWriter(self.mounts[0], wl, seed=wl.seed + 2))
        for w in self.writers:
            w.pause(wl.paused)
            w.start()
        log.info(
            "guest %s (%s) started with %d writers",
            self.cfg.vm,
            self.cfg.profile,
            len(self.writers),
        )

    def shutdown(self) -> None:
        with self._lock:
            if self.state == "frozen":
                self._thaw_now()
        for w in self.writers:
            w.thaw()
            w.stop()
        self.write_status(final=True)

    # --- ops
    def handle(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        fn = getattr(self, "op_" + op)
        try:
            result: dict[str, Any] = fn(**args)
        except TypeError as exc:
            if "argument" in str(exc):
                raise ProtocolError("bad_args", f"{op}: {exc}") from exc
            raise
        except (HvlabError, OSError) as exc:
            raise ProtocolError("failed", f"{op}: {exc}") from exc
        finally:
            self.write_status()
        return result

    def op_identify(self) -> dict[str, Any]:
        return {
            "vm": self.cfg.vm,
            "profile": self.cfg.profile,
            "auto_recovery": self.auto_recovery,
            "disks": [{"name": n, "mountpoint": str(m)} for n, m in self.cfg.disks],
            "writers": [
                {
                    "name": w.wname,
                    "kind": w.kind,
                    "vss_aware": w.vss_aware,
                    "components": w.components(),
                }
                for w in self.writers
            ],
            "freeze_timeout_s": self.cfg.freeze_timeout_s,
            "writer_timeout_s": self.cfg.writer_timeout_s,
            "pid": os.getpid(),
        }

    def op_prepare(self) -> dict[str, Any]:
        with self._lock:
            if self.state == "frozen":
                raise ProtocolError("bad_state", "prepare while frozen")
            self.state = "prepared"
            return {"state": self.state, "writers": [w.status() for w in self.writers]}

    def op_freeze(self, timeout_s: float | None = None) -> dict[str, Any]:
        t = self.cfg.freeze_timeout_s if timeout_s is None else timeout_s
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0 < t <= 60:
            raise ProtocolError("bad_args", "timeout_s must be a number in (0, 60]")
        t = min(float(t), self.cfg.writer_timeout_s)
        with self._lock:
            if self.state == "frozen":
                raise ProtocolError("bad_state", "already frozen")
            t0: dict[str, Any] = {}
            held: list[Writer] = []
            try:
                for w in self.vss_writers:
                    t0[w.wname] = w.freeze(self.cfg.writer_timeout_s)
                    held.append(w)
                quiesce.write_marker(self.cfg.run_dir, self.mounts)
                try:
                    self.freezer.freeze(self.mounts)
                except BaseException:
                    quiesce.remove_marker(self.cfg.run_dir)
                    raise
            except (WriterError, quiesce.FreezeError, OSError) as exc:
                for w in held:
                    w.thaw()
                self.state = "idle"
                raise ProtocolError("failed", f"freeze failed: {exc}") from exc
            self.state, self.frozen_at, self.pending_timeout = "frozen", time.time(), None
            self._gen += 1
            self._timer = threading.Timer(t, self._watchdog, args=(self._gen,))
            self._timer.daemon = True
            self._timer.start()
            lw = self.ledger_writer
            open_txid = t0.get("ledger", {}).get("open_txid")
            log.info("frozen %s for at most %gs (open txn %s)", self.mounts, t, open_txid)
            return {
                "frozen_at": self.frozen_at,
                "frozen": [str(m) for m in self.mounts],
                "timeout_s": t,
                "t0": t0,
                "open_txid": open_txid,
                "ledger_last_txid": lw.ledger.last_txid if lw else None,
            }

    def _thaw_now(self) -> float:
        """Thaw filesystems (disk order), then let writers finish their held work."""
        self._gen += 1
        if self._timer is not None:
            self._timer.cancel()
        self.freezer.thaw(self.mounts)
        self.thawed_at = time.time()
        self.state = "thawed"
        quiesce.remove_marker(self.cfg.run_dir)
        for w in self.vss_writers:
            w.thaw()
        return self.thawed_at - (self.frozen_at or self.thawed_at)

    def _watchdog(self, gen: int) -> None:
        with self._lock:
            if gen != self._gen or self.state != "frozen":
                return
            try:
                frozen_for = self._thaw_now()
            except Exception:
                log.exception("watchdog thaw failed")
                return
            # Set after the thaw, under the lock status() also takes: a reader never sees
            # "timed out" together with "frozen".
            self.pending_timeout = {
                "error_code": FLUSH_WRITES_TIMEOUT,
                "thawed_at": self.thawed_at,
                "frozen_for_s": frozen_for,
            }
            log.warning("flush-and-hold timeout: thawed by the watchdog after %.2fs", frozen_for)
        self.write_status()

    def op_thaw(self) -> dict[str, Any]:
        with self._lock:
            if self.state == "frozen":
                frozen_for = self._thaw_now()
                reply = {
                    "thawed_at": self.thawed_at,
                    "frozen_for_s": frozen_for,
                    "timed_out": False,
                }
            elif self.pending_timeout is not None:
                reply = {**self.pending_timeout, "timed_out": True}
                self.pending_timeout = None
            else:
                raise ProtocolError("bad_state", f"thaw without freeze (state {self.state})")
            lw = self.ledger_writer
            reply["ledger_last_txid"] = lw.ledger.last_txid if lw else None
            return reply

    def op_abort(self) -> dict[str, Any]:
        with self._lock:
            thawed = self.state == "frozen"
            if thawed:
                self._thaw_now()
            for w in self.writers:
                w.thaw()
            self.state = "idle"
            return {"thawed": thawed, "state": self.state}

    def op_status(self) -> dict[str, Any]:
        return self.status()

    def op_workload(
        self, pause: bool | None = None, ops_per_s: float | None = None, writer: str | None = None
    ) -> dict[str, Any]:
        targets = [w for w in self.writers if writer is None or w.wname == writer]
        if not targets:
            raise ProtocolError("bad_args", f"no writer named {writer!r}")
        if ops_per_s is not None and (not isinstance(ops_per_s, int | float) or ops_per_s <= 0):
            raise ProtocolError("bad_args", "ops_per_s must be > 0")
        for w in targets:
            if pause is not None:
                w.pause(bool(pause))
            if ops_per_s is not None:
                w.ops_per_s = float(ops_per_s)
        return {"writers": [w.status() for w in self.writers]}

    def op_post_snapshot(self, devices: dict[str, str] | None = None) -> dict[str, Any]:
        with self._lock:
            if self.state == "frozen":
                raise ProtocolError("bad_state", "post_snapshot while frozen")
        if not isinstance(devices, dict) or not devices:
            raise ProtocolError("bad_args", "devices must be a non-empty {disk: /dev/path} map")
        for disk, dev in devices.items():
            if disk not in self.roots:
                raise ProtocolError("bad_args", f"unknown disk {disk!r}")
            try:
                if not stat.S_ISBLK(os.stat(str(dev)).st_mode):
                    raise ProtocolError("bad_args", f"{dev} is not a block device")
            except OSError as exc:
                raise ProtocolError("bad_args", f"no such device {dev}: {exc.strerror}") from exc
        if not self.auto_recovery:
            return {
                "auto_recovery": False,
                "repaired": None,
                "note": f"profile {self.cfg.profile} has no auto-recovery",
            }
        return {"auto_recovery": True, **self._auto_recover(devices)}

    def _auto_recover(self, devices: dict[str, str]) -> dict[str, Any]:
        """Mount the auto-recovery image's disks privately, run the writers' repair, unmount."""
        order = [n for n, _ in self.cfg.disks if n in devices]
        mounted: list[Path] = []
        roots: dict[str, Path] = {}
        # Under the run dir (inside the lab dir), so a mount left by a killed guest is found
        # and removed by the next guest start or by `hvlab down`.
        base = Path(tempfile.mkdtemp(prefix=AR_PREFIX, dir=self.cfg.run_dir))
        try:
            for name in order:
                dev = devices[name]
                fstype = run(["blkid", "-o", "value", "-s", "TYPE", dev], check=False).stdout
                mnt = base / name
                mnt.mkdir()
                argv = ["mount"]
                if fstype.strip() == "xfs":
                    argv += ["-o", "nouuid"]  # the live disk with the same UUID is mounted
                run([*argv, dev, str(mnt)])
                mounted.append(mnt)
                roots[name] = mnt
            first, last = self.cfg.disks[0][0], self.cfg.disks[-1][0]
            if first in roots and last in roots:
                rep = ledger.recover(roots)
                result = ledger.check(roots)
                repaired: dict[str, Any] = rep.to_dict()
            else:
                repaired = {
                    "removed": ledger.remove_excluded(roots),
                    "note": "ledger disks not all given: ledger not repaired",
                }
                result = None
            os.sync()
        except CommandError as exc:
            raise ProtocolError("failed", f"auto-recovery mount failed: {exc}") from exc
        finally:
            errors = []
            for mnt in reversed(mounted):
                try:
                    run(["umount", str(mnt)])
                except CommandError as exc:
                    errors.append(str(exc))
            for d in [*(base / n for n in order), base]:
                with contextlib.suppress(OSError):
                    d.rmdir()
            if errors:
                log.error("auto-recovery unmount failed: %s", errors)
        return {
            "repaired": repaired,
            "check": result.to_dict() if result else None,
            "devices": dict(devices),
        }

    # --- status
    def status(self) -> dict[str, Any]:
        with self._lock:
            return self._status()

    def _status(self) -> dict[str, Any]:
        lw = self.ledger_writer
        return {
            "vm": self.cfg.vm,
            "profile": self.cfg.profile,
            "pid": os.getpid(),
            "state": self.state,
            "frozen": self.state == "frozen",
            "frozen_at": self.frozen_at if self.state == "frozen" else None,
            "timed_out": self.pending_timeout is not None,
            "timeout": self.pending_timeout,
            "committed_txid": lw.ledger.last_txid if lw else None,
            "committed_hash": lw.ledger.last_hash if lw else None,
            "ops_per_s": round(sum(w.status()["ops_per_s"] for w in self.writers), 2),
            "writers": [w.status() for w in self.writers],
            "socket": str(self.cfg.socket) if self.cfg.socket else None,
            "clock": time.time(),
        }

    def write_status(self, final: bool = False) -> None:
        st = self.status()
        if final:
            st["state"] = "stopped"
        try:
            _atomic_write(self.cfg.run_dir / "status.json", json.dumps(st, indent=1))
        except OSError:
            log.exception("cannot write status.json")


def clean_stale_ar_mounts(run_dir: Path) -> list[str]:
    """Unmount and remove auto-recovery mount dirs a killed guest left in run_dir."""
    done = []
    for m in sorted(fs.mounts_under(run_dir), key=lambda m: -len(m.target)):
        if Path(m.target).parent.name.startswith(AR_PREFIX):
            fs.umount(Path(m.target))
            done.append(m.target)
    for d in run_dir.glob(f"{AR_PREFIX}*"):
        for sub in d.iterdir():
            with contextlib.suppress(OSError):
                sub.rmdir()
        with contextlib.suppress(OSError):
            d.rmdir()
    return done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hvlab.guest.emulator")
    ap.add_argument("--config", required=True, type=Path)
    ns = ap.parse_args(argv)
    cfg = GuestConfig.load(ns.config)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        filename=cfg.run_dir / "guest.log",
        level=logging.INFO,
        format="%(asctime)s %(process)d %(threadName)s %(levelname)s %(name)s: %(message)s",
    )
    for left in clean_stale_ar_mounts(cfg.run_dir):
        log.warning("unmounted an auto-recovery mount a killed guest left: %s", left)
    guest = Guest(cfg)
    signal.signal(signal.SIGTERM, lambda *_: guest.stop_event.set())
    signal.signal(signal.SIGINT, lambda *_: guest.stop_event.set())
    pid_file = cfg.run_dir / "guest.pid"
    _atomic_write(pid_file, f"{os.getpid()}\n")
    server: Server | None = None
    try:
        guest.start()
        if cfg.socket is not None and cfg.profile != "none":
            server = Server(cfg.socket, guest.handle)
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
