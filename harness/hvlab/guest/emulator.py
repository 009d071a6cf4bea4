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
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hvlab.errors import HvlabError
from hvlab.guest import autorecovery, protocol, quiesce, service
from hvlab.guest.config import GuestConfig
from hvlab.guest.protocol import ProtocolError, Server, one_line
from hvlab.guest.writers import (
    ACK_LOG,
    AppendWriter,
    LedgerWriter,
    ScratchWriter,
    Writer,
    WriterError,
)

log = logging.getLogger("hvlab.guest")

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
        self.writers = [LedgerWriter(self.roots, wl, vss_aware=windows, seed=wl.seed,
                                     ack_log=self.cfg.run_dir / ACK_LOG)]
        if windows:
            self.writers.append(ScratchWriter(self.mounts, wl, seed=wl.seed + 1))
        self.writers.append(AppendWriter(self.mounts[0], wl, seed=wl.seed + 2))
        for w in self.writers:
            w.pause(wl.paused)
            w.start()
        log.info("guest %s (%s) started with %d writers", self.cfg.vm, self.cfg.profile,
                 len(self.writers))

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
            self.thawed_at = float(at) if protocol.is_number(at) else None
            log.info("a thawed VSS session from before a restart: post_snapshot may follow")

    def _save_session(self) -> None:
        try:
            service.atomic_write(
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
        if not protocol.is_number(t) or not 0 < t <= 60:
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
        rate_ok = protocol.is_number(ops_per_s) and 0 < ops_per_s <= MAX_OPS_PER_S
        if ops_per_s is not None and not rate_ok:
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
        autorecovery.check_devices(self.cfg, devices, auto_recovery=self.auto_recovery)
        assert isinstance(devices, dict)
        if not self.auto_recovery:
            return {
                "auto_recovery": False,
                "repaired": None,
                "note": f"profile {self.cfg.profile} has no auto-recovery",
            }
        return {"auto_recovery": True, **autorecovery.recover(self.cfg, devices)}

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
                service.atomic_write(self.cfg.run_dir / "status.json", json.dumps(st, indent=1))
        except OSError as exc:
            log.error("cannot write status.json: %s", one_line(exc))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hvlab.guest.emulator")
    ap.add_argument("--config", required=True, type=Path)
    ns = ap.parse_args(argv)
    service.run(Guest(GuestConfig.load(ns.config)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
