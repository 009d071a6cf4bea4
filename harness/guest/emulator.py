"""The guest emulator: one process per VM, `python -m hvlab.guest.emulator --config FILE.json`.

Profiles:
- windows: VSS-aware ledger (holds one txn open at freeze) + scratch + appender; auto-recovery.
- linux: hv_vss_daemon-like: no application writers, fsfreeze only, no auto-recovery. The ledger
  and appender still run but are not quiesced: their writes just block on the frozen fs, so a
  checkpoint is filesystem-consistent and the ledger may hold an in-flight txn (crash-consistent
  for the application, rolled back when it next starts).
- none: no integration services: workloads run, no socket; the host must fall back to crash-
  consistent backups.

The `fault` op arms the failures a guest shows in the field, each for one time, so a test (or a
curious user) can watch the host's policy deal with them: `veto` names a VSS-aware writer that
fails its next freeze (as a VSS writer answering VSS_E_WRITERERROR_RETRYABLE: the writers
frozen before it are thawed, nothing is frozen), `mute` names an op whose next request the
guest never answers nor carries out (a hung integration service: the host's request times out).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
import math
import os
import signal
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

from hvlab.errors import BadInput, CommandError, HvlabError
from hvlab.guest import ledger, protocol, quiesce
from hvlab.guest.protocol import Limits, ProtocolError, Server, one_line
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
# Ops that change the guest's VSS state: one at a time, in the order they arrive.
STATE_OPS = frozenset({"prepare", "freeze", "thaw", "post_snapshot", "abort"})
OP_WAIT_S = 150.0  # how long a state op waits for the one in progress (post_snapshot <= 120 s)
MAX_OPS_PER_S = 10000.0  # as a lab file's [vm.workload]
WRITER_VETO = "VSS_E_WRITERERROR_RETRYABLE"
MUTED_FOR_S = 600.0  # a muted request is dropped after this (its client gave up long before)
# A thawed VSS session outlives the guest process: the host may resume a backup at its
# post_snapshot (auto-recovery) after the guest restarted. Removed by prepare, freeze, abort.
SESSION = "vss-session.json"


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
    limits: Limits = field(default_factory=Limits)  # per connection of the channel

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
            ch = dict(d.get("channel", {}))
            unknown = set(ch) - set(Limits.__dataclass_fields__)
            if unknown:
                raise BadInput(f"unknown channel limits: {sorted(unknown)}")
            limits = Limits(
                max_line=int(ch.get("max_line", Limits.max_line)),
                max_clients=int(ch.get("max_clients", Limits.max_clients)),
                idle_timeout_s=float(ch.get("idle_timeout_s", Limits.idle_timeout_s)),
                send_timeout_s=float(ch.get("send_timeout_s", Limits.send_timeout_s)),
            )
            if min(limits.max_line, limits.max_clients) < 1 or not (
                0 < min(limits.idle_timeout_s, limits.send_timeout_s) < math.inf
            ):
                raise BadInput(f"channel limits must be positive: {limits}")
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
                limits=limits,
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
    """State machine of the guest's VSS side.

    Requests arrive on many connections at once, one thread each. The ops that change the VSS
    state (STATE_OPS) and the watchdog run one at a time under `_op_lock`, in arrival order.
    A freeze is the guest's, not a connection's: the thaw, post_snapshot or abort that follows
    may come on another connection (the host connects once per request), but a freeze while
    another is in progress or held is refused. `_lock` guards the fields and is only held for
    moments, so status and identify answer at once while a freeze waits for its writers or an
    auto-recovery mounts its disks. Lock order: `_op_lock`, then `_lock`."""

    def __init__(self, cfg: GuestConfig, freezer: quiesce.Freezer | None = None) -> None:
        self.cfg = cfg
        self.freezer: quiesce.Freezer = freezer or quiesce.FsFreezer()
        self.roots = {name: mnt for name, mnt in cfg.disks}
        self.mounts = [mnt for _, mnt in cfg.disks]
        self.state = "idle"  # idle | prepared | frozen | thawed
        self.frozen_at: float | None = None
        self.frozen_by: str | None = None  # the connection that froze, for the log and status
        self.thawed_at: float | None = None
        self.pending_timeout: dict[str, Any] | None = None
        self.busy: str | None = None  # the state op under way
        self.busy_by: str | None = None
        self._gen = 0
        self._timer: threading.Timer | None = None
        self._op_lock = threading.Lock()
        self._lock = threading.RLock()
        self._status_file = threading.Lock()
        self._stopping = False
        self.writers: list[Writer] = []
        self.stop_event = threading.Event()
        self.server: Server | None = None  # the channel, once serving: its connection count
        self.armed: dict[str, str] = {}  # the `fault` op's: "veto" -> writer, "mute" -> op

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
        self._restore_session()
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
        self._stopping = True  # no new state op from here on
        got = self._op_lock.acquire(timeout=10.0)
        if not got:
            log.warning("stopping while %s (from %s) is still under way", self.busy, self.busy_by)
        try:
            with self._lock:
                frozen = self.state == "frozen"
            if frozen:
                self._thaw_now()
        finally:
            if got:
                self._op_lock.release()
        for w in self.writers:
            w.thaw()
            w.stop()
        self.write_status(final=True)

    # --- the session a restart keeps
    def _restore_session(self) -> None:
        path = self.cfg.run_dir / SESSION
        try:
            saved = json.loads(path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("ignoring an unreadable %s: %s", SESSION, one_line(exc))
            return
        if isinstance(saved, dict) and saved.get("state") == "thawed":
            self.state = "thawed"
            at = saved.get("thawed_at")
            self.thawed_at = float(at) if _number(at) else None
            log.info("a thawed VSS session from before a restart: post_snapshot may follow")

    def _save_session(self) -> None:
        try:
            _atomic_write(
                self.cfg.run_dir / SESSION,
                json.dumps({"state": self.state, "thawed_at": self.thawed_at}),
            )
        except OSError as exc:
            log.error("cannot write %s: %s", SESSION, one_line(exc))

    def _drop_session(self) -> None:
        with contextlib.suppress(OSError):
            (self.cfg.run_dir / SESSION).unlink(missing_ok=True)

    # --- ops
    def handle(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        fn = getattr(self, "op_" + op)
        try:
            inspect.signature(fn).bind(**args)
        except TypeError as exc:
            raise ProtocolError("bad_args", f"{op}: {exc}") from None
        if op == "freeze":  # wrong arguments are told so at once, not after a freeze under way
            self._freeze_timeout(args.get("timeout_s"))
        if self._fire("mute", op):
            log.warning("%s from %s: muted (fault armed): no answer", op, protocol.peer())
            self.stop_event.wait(MUTED_FOR_S)
            raise ProtocolError("failed", f"{op}: muted (fault armed)")
        try:
            if op in STATE_OPS:
                with self._one_at_a_time(op):
                    result: dict[str, Any] = fn(**args)
            else:
                result = fn(**args)
        except (HvlabError, OSError) as exc:
            raise ProtocolError("failed", f"{op}: {one_line(exc)}") from exc
        finally:
            if op not in ("status", "identify"):  # read-only: the periodic write covers them
                self.write_status()
        return result

    @contextlib.contextmanager
    def _one_at_a_time(self, op: str) -> Iterator[None]:
        if self._stopping:
            raise ProtocolError("failed", f"{op}: the guest is stopping")
        if not self._op_lock.acquire(blocking=False):
            busy, by = self.busy, self.busy_by
            if op == "freeze" and busy == "freeze":
                raise ProtocolError("busy", f"another freeze is in progress (from {by})")
            log.info("%s from %s waits for %s from %s", op, protocol.peer(), busy, by)
            if not self._op_lock.acquire(timeout=OP_WAIT_S):
                raise ProtocolError(
                    "busy", f"{op}: {self.busy} (from {self.busy_by}) still under way after "
                    f"{OP_WAIT_S:g}s"
                )
        try:
            if self._stopping:
                raise ProtocolError("failed", f"{op}: the guest is stopping")
            with self._lock:
                self.busy, self.busy_by = op, protocol.peer()
            yield
        finally:
            with self._lock:
                self.busy = self.busy_by = None
            self._op_lock.release()

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
        self._drop_session()
        return {"state": "prepared", "writers": [w.status() for w in self.writers]}

    def _freeze_timeout(self, timeout_s: object) -> float:
        t = self.cfg.freeze_timeout_s if timeout_s is None else timeout_s
        if not _number(t) or not 0 < t <= 60:
            raise ProtocolError("bad_args", "timeout_s must be a number in (0, 60]")
        return min(float(t), self.cfg.writer_timeout_s)

    def op_freeze(self, timeout_s: float | None = None) -> dict[str, Any]:
        t = self._freeze_timeout(timeout_s)
        with self._lock:
            if self.state == "frozen":
                raise ProtocolError("bad_state", f"already frozen (by {self.frozen_by})")
        # Outside `_lock`: writers may take their time to quiesce, status still answers.
        t0: dict[str, Any] = {}
        held: list[Writer] = []
        # As VSS: every writer quiesces within one writer timeout, not one timeout each.
        deadline = time.monotonic() + self.cfg.writer_timeout_s
        try:
            for w in self.vss_writers:
                if self._fire("veto", w.wname):
                    raise WriterError(f"writer {w.wname} vetoed the freeze: {WRITER_VETO}")
                t0[w.wname] = w.freeze(max(0.0, deadline - time.monotonic()))
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
            with self._lock:
                self.state = "idle"
            raise ProtocolError("failed", f"freeze failed: {one_line(exc)}") from exc
        with self._lock:
            self.state, self.frozen_at, self.pending_timeout = "frozen", time.time(), None
            self.frozen_by = protocol.peer()
            self._gen += 1
            self._timer = threading.Timer(t, self._watchdog, args=(self._gen,))
            self._timer.daemon = True
            self._timer.start()
            frozen_at = self.frozen_at
        self._drop_session()
        lw = self.ledger_writer
        open_txid = t0.get("ledger", {}).get("open_txid")
        log.info(
            "frozen %s for at most %gs by %s (open txn %s)",
            [str(m) for m in self.mounts], t, self.frozen_by, open_txid,
        )
        return {
            "frozen_at": frozen_at,
            "frozen": [str(m) for m in self.mounts],
            "timeout_s": t,
            "t0": t0,
            "open_txid": open_txid,
            "ledger_last_txid": lw.ledger.last_txid if lw else None,
        }

    def _thaw_now(self, timed_out: bool = False) -> float:
        """Thaw filesystems (disk order), then let writers finish their held work. The caller
        holds `_op_lock`. Should the thaw fail, the state stays frozen and the watchdog armed."""
        self.freezer.thaw(self.mounts)
        with self._lock:
            self._gen += 1
            if self._timer is not None:
                self._timer.cancel()
            self.thawed_at = now = time.time()
            self.state = "thawed"
            frozen_for = now - (self.frozen_at or now)
            if timed_out:  # with the state: a reader never sees "timed out" and "frozen"
                self.pending_timeout = {
                    "error_code": FLUSH_WRITES_TIMEOUT,
                    "thawed_at": now,
                    "frozen_for_s": frozen_for,
                }
        self._save_session()
        quiesce.remove_marker(self.cfg.run_dir)
        for w in self.vss_writers:
            w.thaw()
        return frozen_for

    def _watchdog(self, gen: int) -> None:
        # A thaw under way holds `_op_lock` for moments; anything longer is stuck, and the
        # filesystems are thawed anyway.
        got = self._op_lock.acquire(timeout=5.0)
        try:
            with self._lock:
                if gen != self._gen or self.state != "frozen":
                    return
            frozen_for = self._thaw_now(timed_out=True)
        except Exception:
            log.exception("watchdog thaw failed")
            return
        finally:
            if got:
                self._op_lock.release()
        log.warning("flush-and-hold timeout: thawed by the watchdog after %.2fs", frozen_for)
        self.write_status()

    def op_thaw(self) -> dict[str, Any]:
        with self._lock:
            state, pending, by = self.state, self.pending_timeout, self.frozen_by
        if state == "frozen":
            frozen_for = self._thaw_now()
            log.info(
                "thawed after %.2fs (frozen by %s, thawed by %s)", frozen_for, by, protocol.peer()
            )
            reply: dict[str, Any] = {
                "thawed_at": self.thawed_at,
                "frozen_for_s": frozen_for,
                "timed_out": False,
            }
        elif pending is not None:
            reply = {**pending, "timed_out": True}
            with self._lock:
                self.pending_timeout = None
        else:
            raise ProtocolError("bad_state", f"thaw without freeze (state {state})")
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
        with self._lock:
            self.state = "idle"
        self._drop_session()
        return {"thawed": thawed, "state": "idle"}

    def op_status(self) -> dict[str, Any]:
        return self.status()

    def op_fault(self, veto: str | None = None, mute: str | None = None) -> dict[str, Any]:
        """Arm a veto of a VSS-aware writer's next freeze, or no answer to an op's next
        request (see the module doc); with no argument, report what is armed."""
        for what, value, allowed in (("veto", veto, [w.wname for w in self.vss_writers]),
                                     ("mute", mute, [o for o in protocol.OPS if o != "fault"])):
            if value is None:
                continue
            if not isinstance(value, str) or value not in allowed:
                shown = str(value)[:40]
                raise ProtocolError("bad_args", f"{what}: {shown!r} is not one of "
                                                f"{', '.join(allowed) or 'nothing here'}")
        with self._lock:
            if veto is not None:
                self.armed["veto"] = veto
            if mute is not None:
                self.armed["mute"] = mute
            armed = dict(self.armed)
        log.warning("faults armed by %s: %s", protocol.peer(), armed)
        return {"armed": armed}

    def _fire(self, kind: str, name: str) -> bool:
        """An armed fault for name, disarmed as it fires."""
        with self._lock:
            if self.armed.get(kind) != name:
                return False
            del self.armed[kind]
            return True

    def op_workload(
        self, pause: bool | None = None, ops_per_s: float | None = None, writer: str | None = None
    ) -> dict[str, Any]:
        if pause is not None and not isinstance(pause, bool):
            raise ProtocolError("bad_args", "pause must be true or false")
        if writer is not None and not isinstance(writer, str):
            raise ProtocolError("bad_args", "writer must be a writer's name")
        if ops_per_s is not None and (not _number(ops_per_s) or not 0 < ops_per_s <= MAX_OPS_PER_S):
            raise ProtocolError("bad_args", f"ops_per_s must be a number in (0, {MAX_OPS_PER_S:g}]")
        targets = [w for w in self.writers if writer is None or w.wname == writer]
        if not targets:
            shown = writer if writer is None or len(writer) <= 40 else writer[:40] + "..."
            raise ProtocolError("bad_args", f"no writer named {shown!r}")
        for w in targets:
            if pause is not None:
                w.pause(pause)
            if ops_per_s is not None:
                w.ops_per_s = float(ops_per_s)
        return {"writers": [w.status() for w in self.writers]}

    def op_post_snapshot(self, devices: dict[str, str] | None = None) -> dict[str, Any]:
        with self._lock:
            state = self.state
        if state == "frozen":
            raise ProtocolError("bad_state", "post_snapshot while frozen")
        if state != "thawed":
            raise ProtocolError(
                "bad_state", f"post_snapshot before freeze and thaw (state {state})"
            )
        self._check_devices(devices)
        assert isinstance(devices, dict)
        if not self.auto_recovery:
            return {
                "auto_recovery": False,
                "repaired": None,
                "note": f"profile {self.cfg.profile} has no auto-recovery",
            }
        return {"auto_recovery": True, **self._auto_recover(devices)}

    def _check_devices(self, devices: object) -> None:
        """{disk: /dev/path}: each a known disk, each a distinct block device; where the guest
        mounts and repairs them (auto-recovery), none mounted already (the live disks are)."""
        if not isinstance(devices, dict) or not devices:
            raise ProtocolError("bad_args", "devices must be a non-empty {disk: /dev/path} map")
        mounted = _mounted_devices() if self.auto_recovery else set()
        seen: dict[int, str] = {}
        for disk, dev in devices.items():
            if disk not in self.roots:
                shown = disk if len(disk) <= 40 else disk[:40] + "..."
                raise ProtocolError("bad_args", f"unknown disk {shown!r}")
            if not isinstance(dev, str) or not dev.startswith("/") or "\0" in dev \
                    or len(dev) > 4096:
                raise ProtocolError("bad_args", f"device of {disk} must be an absolute path")
            try:
                st = os.stat(dev)
            except OSError as exc:
                raise ProtocolError("bad_args", f"no such device {dev}: {exc.strerror}") from exc
            if not stat.S_ISBLK(st.st_mode):
                raise ProtocolError("bad_args", f"{dev} is not a block device")
            if st.st_rdev in seen:
                raise ProtocolError("bad_args", f"{dev} given for {seen[st.st_rdev]} and {disk}")
            seen[st.st_rdev] = disk
            if st.st_rdev in mounted:
                raise ProtocolError("bad_args", f"{dev} is mounted: not an auto-recovery image")

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
        except (ValueError, KeyError) as exc:  # a damaged image (TornPage is a ValueError)
            raise ProtocolError(
                "failed", f"auto-recovery failed, the image is damaged: {one_line(exc)}"
            ) from exc
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
            "frozen_by": self.frozen_by if self.state == "frozen" else None,
            "busy": self.busy,
            "clients": self.server.connections if self.server is not None else None,
            "timed_out": self.pending_timeout is not None,
            "faults": dict(self.armed),
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
            with self._status_file:  # one writer at a time: they share the temporary file
                _atomic_write(self.cfg.run_dir / "status.json", json.dumps(st, indent=1))
        except OSError as exc:
            log.error("cannot write status.json: %s", one_line(exc))


def _number(v: object) -> TypeGuard[int | float]:
    """A JSON number (not a boolean); NaN and infinities never get past the parser."""
    return isinstance(v, int | float) and not isinstance(v, bool) and not (
        isinstance(v, float) and not math.isfinite(v)
    )


def _mounted_devices() -> set[int]:
    """st_rdev of every block device with a filesystem mounted in this mount namespace."""
    found: set[int] = set()
    try:
        text = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return found
    for line in text.splitlines():
        parts = line.split()
        if len(parts) > 2 and ":" in parts[2]:
            major, _, minor = parts[2].partition(":")
            with contextlib.suppress(ValueError):
                found.add(os.makedev(int(major), int(minor)))
    return found


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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
