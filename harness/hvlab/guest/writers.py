"""The guest's applications: a VSS-aware ledger, excluded scratch files, a non-VSS-aware appender.

Each writer is a thread doing `op()` at a steady rate. VSS-aware writers quiesce on `freeze()`
at an operation boundary and resume on `thaw()`; the others ignore freezes and simply block in
the kernel while fsfreeze holds their filesystem, which is what makes a crash-consistent file
visible next to the application-consistent ledger.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import random
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hvlab.errors import HvlabError
from hvlab.guest.ledger import SCRATCH_DIR, SCRATCH_GLOB, Op
from hvlab.guest.store import Ledger

log = logging.getLogger("hvlab.guest.writers")


class WriterError(HvlabError):
    """A writer failed to quiesce (timeout) or died."""


@dataclass
class Workload:
    ops_per_s: float = 10.0  # ledger transactions per second
    value_size: int = 64  # bytes of memo per transaction
    txn_ops: int = 3  # transfers per transaction: 2 page writes each
    accounts: int = 64
    initial: int = 1000
    hold_open_txn: bool = True
    append_ops_per_s: float = 20.0
    scratch_ops_per_s: float = 5.0
    scratch_keep: int = 8
    # The log is checkpointed past this (about 11 s of transactions at 10/s; a checkpoint
    # record is ~1.2 KiB), as a database bounds its recovery: auto-recovery and the check
    # replay the log since the checkpoint. Their replay is Python (the check takes 7 ms per
    # 128 KiB natively, more in the lab VM under the guests' load), where a real engine
    # redoes a minute of log in milliseconds: at 512 KiB, step 10 of an 8-VM job took
    # 3.2-5.6 s with where each log stood, 1.0-2.2 s at 128 KiB.
    wal_max_bytes: int = 128 << 10
    seed: int = 0
    paused: bool = False

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> Workload:
        known = set(Workload.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise HvlabError(f"unknown workload knobs: {sorted(unknown)}")
        return Workload(**dict(d))


IO_RETRY_S = 1.0  # after an op failed on an I/O error
ACK_LOG = "acks.log"  # in the guest's run folder
ACK_LOG_MAX = 1 << 20


def last_ack(run_dir: Path) -> tuple[int, str] | None:
    """The last transaction the guest acknowledged (its ack log's last whole line)."""
    try:
        tail = (run_dir / ACK_LOG).read_bytes()[-512:].splitlines()
    except OSError:
        return None
    for line in reversed(tail):
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit():
            return int(parts[0]), parts[1].decode()
    return None


class Writer(threading.Thread):
    vss_aware = True
    kind = "writer"

    def __init__(self, name: str, ops_per_s: float, seed: int) -> None:
        super().__init__(name=f"writer-{name}", daemon=True)
        self.wname = name
        self.rng = random.Random(seed)
        self.ops_per_s = ops_per_s
        self.ops = 0
        self.error: str | None = None
        # I/O errors (EIO from a full pool in error-when-full mode, ENOSPC, EROFS): the op
        # failed as a whole and the writer goes on, as an application on a VM does.
        self.failed_ops = 0
        self.io_error: str | None = None  # the last one while they go on; None once an op works
        self._cv = threading.Condition()
        self._stop_req = False
        self._paused = False
        self._in_op = False  # between taking an op and finishing it (pause waits for it)
        self._freeze_req = False
        self._held = False
        self._recent: collections.deque[float] = collections.deque(maxlen=1000)

    # --- what subclasses provide
    def op(self) -> None:
        raise NotImplementedError

    def on_freeze(self) -> None:
        """Reach a quiescent, durable state (called in the writer thread)."""

    def on_thaw(self) -> None:
        """Leave the quiescent state (called in the writer thread)."""

    def on_io_error(self) -> None:
        """An op failed with an I/O error: get back to a state that is whole (in the writer
        thread; it may raise OSError again, which counts as the same failure)."""

    def _io_failed(self, exc: OSError) -> None:
        self.failed_ops += 1
        self.io_error = f"{errno.errorcode.get(exc.errno or 0, 'OSError')}: {exc.strerror or exc}"
        log.warning("writer %s: %s (op failed; %d so far)", self.wname, self.io_error,
                    self.failed_ops)
        with contextlib.suppress(OSError):
            self.on_io_error()

    def components(self) -> list[dict[str, Any]]:
        return []

    def info(self) -> dict[str, Any]:
        return {}

    # --- thread loop
    def _next_action(self) -> str:
        with self._cv:
            while True:
                if self._held and (self._stop_req or not self._freeze_req):
                    return "thaw"
                if self._stop_req:
                    return "stop"
                if self._freeze_req and not self._held:
                    return "freeze"
                if self._held or self._paused:
                    self._cv.wait()
                    continue
                self._in_op = True  # under the lock: a pause from now on waits for this op
                return "op"

    def _wake(self) -> bool:
        return self._stop_req or self._freeze_req != self._held

    def run(self) -> None:
        due = time.monotonic()
        try:
            while True:
                action = self._next_action()
                if action == "stop":
                    return
                if action in ("freeze", "thaw"):
                    # Quiesced either way: a failed freeze or thaw op is rolled back, and
                    # nothing is in flight after it.
                    try:
                        (self.on_freeze if action == "freeze" else self.on_thaw)()
                    except OSError as exc:
                        self._io_failed(exc)
                    with self._cv:
                        self._held = action == "freeze"
                        self._cv.notify_all()
                    continue
                ok = True
                try:
                    self.op()
                except OSError as exc:
                    ok = False
                    self._io_failed(exc)
                finally:
                    with self._cv:
                        self._in_op = False
                        self._cv.notify_all()
                now = time.monotonic()
                if ok:
                    self.ops += 1
                    self.io_error = None
                    self._recent.append(now)
                    due = max(due + 1.0 / max(self.ops_per_s, 0.01), now - 1.0)
                else:  # try again later, not at the op rate: the disk is failing
                    due = now + IO_RETRY_S
                with self._cv:
                    self._cv.wait_for(self._wake, timeout=max(0.0, due - now))
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("writer %s failed", self.wname)
            with self._cv:
                self._cv.notify_all()

    # --- control, from other threads
    def freeze(self, timeout: float) -> dict[str, Any]:
        with self._cv:
            self._freeze_req = True
            self._cv.notify_all()
            ok = self._cv.wait_for(lambda: self._held or self.error is not None, timeout)
        if self.error is not None:
            raise WriterError(f"writer {self.wname} failed: {self.error}")
        if not ok:
            raise WriterError(f"writer {self.wname} did not quiesce within {timeout:g}s")
        return self.info()

    def thaw(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._freeze_req = False
            self._cv.notify_all()
            if self.is_alive():
                self._cv.wait_for(lambda: not self._held or self.error is not None, timeout)

    def pause(self, paused: bool, timeout: float = 10.0) -> None:
        """Pause (or resume) the workload. A pause returns once the op under way, if any, is
        done: what the writer acknowledged then is all it will commit until resumed."""
        with self._cv:
            self._paused = paused
            self._cv.notify_all()
            if paused and self.is_alive():
                self._cv.wait_for(lambda: not self._in_op or self.error is not None, timeout)

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop_req = True
            self._cv.notify_all()
        if self.is_alive():
            self.join(timeout)

    @property
    def state(self) -> str:
        if self.error:
            return "failed"
        if self.io_error and self.is_alive():
            return "failing"
        if not self.is_alive():
            return "stopped"
        if self._held:
            return "held"
        return "paused" if self._paused else "running"

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        # list() copies in C under the GIL; iterating the deque while the writer thread
        # appends would raise "deque mutated during iteration".
        rate = sum(1 for t in list(self._recent) if t > now - 5.0) / 5.0
        return {
            "name": self.wname,
            "kind": self.kind,
            "vss_aware": self.vss_aware,
            "state": self.state,
            "ops": self.ops,
            "ops_per_s": round(rate, 2),
            "target_ops_per_s": self.ops_per_s,
            "error": self.error,
            "failed_ops": self.failed_ops,
            "io_error": self.io_error,
            **self.info(),
        }


class LedgerWriter(Writer):
    """Transfers between accounts; on freeze, holds with one transaction open (begun, partly
    written, flushed) so the image at T0 needs VSS auto-recovery."""

    kind = "ledger"

    def __init__(
        self, roots: Mapping[str, Path], w: Workload, *, vss_aware: bool = True, seed: int = 0,
        ack_log: Path | None = None,
    ) -> None:
        super().__init__("ledger", w.ops_per_s, seed)
        self.vss_aware = vss_aware
        self.w = w
        self.hold_open_txn = w.hold_open_txn and vss_aware
        self.roots = roots
        self.ledger = self._open()
        self._broken = False  # the store failed on an I/O error and is not open again yet
        # What the writer acknowledged, as its clients would have heard it: "txid hash" per
        # durable commit, appended outside the VM's disks (the guest's run folder), so that a
        # power cut of the lab VM cannot take it back. Only its last line matters: cut short
        # past ACK_LOG_MAX.
        self._ack_fd = (os.open(ack_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                                0o600) if ack_log is not None else None)

    def _ack(self) -> None:
        if self._ack_fd is None:
            return
        if os.fstat(self._ack_fd).st_size > ACK_LOG_MAX:
            os.ftruncate(self._ack_fd, 0)
        os.write(self._ack_fd, f"{self.ledger.last_txid} {self.ledger.last_hash}\n".encode())

    def _ops(self) -> list[Op]:
        ops: list[Op] = []
        n = self.ledger.meta.accounts
        for _ in range(max(1, self.w.txn_ops)):
            src, dst = self.rng.sample(range(n), 2)
            ops.append((src, dst, self.rng.randint(1, 100)))
        return ops

    def _open(self) -> Ledger:
        w = self.w
        return Ledger(self.roots, accounts=w.accounts, initial=w.initial,
                      wal_max_bytes=w.wal_max_bytes)

    def on_io_error(self) -> None:
        """A transaction failed on an I/O error. Its fsync is never retried (Linux marks the
        pages that failed clean: a second fsync says yes for data that is not on disk, the
        PostgreSQL "fsyncgate" of 2018). The store restarts as the application would, from
        what is on disk: its files' page cache dropped, then the open transaction rolled
        back from the WAL's before-images. Nothing of the failed transaction was
        acknowledged. While the disk still fails, each op tries the restart again."""
        self.ledger.close()
        self._broken = True
        for path in (self.ledger.wal_path, self.ledger.pages_path):
            with contextlib.suppress(OSError):
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
        self.ledger = self._open()
        self._broken = False

    def op(self) -> None:
        if self._broken:
            self.on_io_error()
        # The store's protocol: BEGIN, fsync; every page write, one fsync; COMMIT, fsync.
        # (An fsync per page write cost the lab VM's one CPU 5 ms per transaction.)
        self.ledger.begin(self._ops(), self.rng.randbytes(self.w.value_size))
        self.ledger.commit()
        self._ack()

    def on_freeze(self) -> None:
        # Every op() ends with an fsync'ed COMMIT, so the store is already flushed.
        if self.hold_open_txn and not self._broken:
            self.ledger.begin(self._ops(), self.rng.randbytes(self.w.value_size))
            self.ledger.step(1)  # debit written, credit not: the invariant is visibly broken

    def on_thaw(self) -> None:
        if self.ledger.open_txn is not None and not self._broken:
            self.ledger.commit()
            self._ack()

    def run(self) -> None:
        try:
            super().run()
        finally:
            self.ledger.close()
            if self._ack_fd is not None:
                os.close(self._ack_fd)

    def components(self) -> list[dict[str, Any]]:
        return [
            {"name": "wal", "paths": [str(self.ledger.wal_path)]},
            {"name": "pages", "paths": [str(self.ledger.pages_path)]},
        ]

    def info(self) -> dict[str, Any]:
        t = self.ledger.open_txn
        return {
            "last_txid": self.ledger.last_txid,
            "last_hash": self.ledger.last_hash,
            "open_txid": t.txid if t is not None and self._held else None,
        }


class ScratchWriter(Writer):
    """Temp files the VSS writer excludes from backup; auto-recovery deletes them from A only."""

    kind = "scratch"

    def __init__(self, mounts: list[Path], w: Workload, *, seed: int = 0) -> None:
        super().__init__("scratch", w.scratch_ops_per_s, seed)
        self.dirs = [m / SCRATCH_DIR for m in mounts]
        for d in self.dirs:
            d.mkdir(exist_ok=True)
        self.size = max(1, w.value_size * 16)
        self.keep = max(1, w.scratch_keep)

    def op(self) -> None:
        d = self.dirs[self.ops % len(self.dirs)]
        (d / f"{self.ops % self.keep:04d}.tmp").write_bytes(self.rng.randbytes(self.size))

    def components(self) -> list[dict[str, Any]]:
        return [{"name": "scratch", "excluded": [str(d / SCRATCH_GLOB) for d in self.dirs]}]


class AppendWriter(Writer):
    """Not VSS-aware: appends seq-numbered lines and rewrites a state file in place, ignoring
    freeze requests; only fsfreeze itself stops it (its write blocks in the kernel)."""

    kind = "append"
    vss_aware = False

    def __init__(self, mount: Path, w: Workload, *, seed: int = 0) -> None:
        super().__init__("appender", w.append_ops_per_s, seed)
        self.dir = mount / "appender"
        self.dir.mkdir(exist_ok=True)
        self.log_path = self.dir / "log.txt"
        self.state_path = self.dir / "state.txt"
        self.value_size = w.value_size
        self.seq = self._last_seq()

    def _last_seq(self) -> int:
        try:
            tail = self.log_path.read_bytes()[-4096:].splitlines()
            return int(tail[-1].split(b" ", 1)[0]) if tail else 0
        except (OSError, ValueError, IndexError):
            return 0

    def op(self) -> None:
        seq = self.seq + 1
        line = f"{seq} {time.time():.6f} {self.rng.randbytes(self.value_size // 2).hex()}\n"
        fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
        # In-place rewrite (no rename): a crash image may catch it empty or half-written.
        fd = os.open(self.state_path, os.O_WRONLY | os.O_TRUNC | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"seq={seq}\n".encode())
        finally:
            os.close(fd)
        self.seq = seq

    def components(self) -> list[dict[str, Any]]:
        return [{"name": "appender", "paths": [str(self.log_path), str(self.state_path)]}]

    def info(self) -> dict[str, Any]:
        return {"seq": self.seq}
