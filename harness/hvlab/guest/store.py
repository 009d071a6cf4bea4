"""The ledger's live store (ledger.py has its format, the check and the repair): the writer's
side of the protocol. Per transaction: BEGIN (ops + before-images), fsync the WAL; the page
writes, fsync the pages; COMMIT (chained hash), fsync the WAL. Past wal_max_bytes the WAL
restarts from a checkpoint record of every page."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hvlab.guest.ledger import (
    MEMO_MAX,
    PAGE_SIZE,
    Meta,
    Op,
    Page,
    chain_hash,
    encode_page,
    encode_record,
    initial_pages,
    ledger_paths,
    pack_page,
    page_of,
    read_all,
    replay,
    rollback,
    scan_wal,
    txn_steps,
)


@dataclass
class OpenTxn:
    txid: int
    ops: list[Op]
    memo: bytes
    steps: list[Page]
    done: int = 0

    @property
    def remaining(self) -> int:
        return len(self.steps) - self.done


class Ledger:
    """The live store, used by one writer thread."""

    def __init__(
        self,
        roots: Mapping[str, Path],
        *,
        accounts: int = 64,
        initial: int = 1000,
        wal_max_bytes: int = 128 << 10,
    ) -> None:
        self.wal_path, self.pages_path = ledger_paths(roots)
        self.wal_max_bytes = wal_max_bytes
        if not self.pages_path.exists():
            self._create(Meta(accounts, initial))
        else:
            # An application restart runs the same rollback as auto-recovery.
            rollback(self.wal_path, self.pages_path)
        self.meta = Meta.decode(read_all(self.pages_path)[:PAGE_SIZE])
        r = replay(self.meta, scan_wal(read_all(self.wal_path)))
        if r.problems:
            raise ValueError("ledger is damaged: " + "; ".join(r.problems))
        self.state = r.state
        self.last_txid, self.last_hash = r.last_txid, r.last_hash
        self._wal = os.open(self.wal_path, os.O_WRONLY | os.O_APPEND)
        self._pages = os.open(self.pages_path, os.O_RDWR)
        self.open_txn: OpenTxn | None = None

    def _create(self, meta: Meta) -> None:
        for p in (self.wal_path, self.pages_path):
            p.parent.mkdir(parents=True, exist_ok=True)
        self.wal_path.write_bytes(b"")
        tmp = self.pages_path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(meta.encode())
            for pg in initial_pages(meta).values():
                f.write(encode_page(pg))
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.pages_path)
        for d in {self.wal_path.parent, self.pages_path.parent}:
            _fsync_dir(d)

    def close(self) -> None:
        """Close the files; again is a no-op (a number closed twice may be another file's)."""
        fds, self._wal, self._pages = (self._wal, self._pages), -1, -1
        for fd in fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _append(self, rec: dict[str, Any]) -> None:
        os.write(self._wal, encode_record(rec))
        os.fsync(self._wal)

    def begin(self, ops: list[Op], memo: bytes) -> OpenTxn:
        assert self.open_txn is None, "one transaction at a time"
        memo = memo[:MEMO_MAX]
        txid = self.last_txid + 1
        touched = sorted({page_of(a)[0] for op in ops for a in op[:2]})
        undo = {str(no): pack_page(self.state[no]) for no in touched}
        rec = {"k": "begin", "txid": txid, "ops": [list(o) for o in ops], "memo": memo.hex()}
        self._append({**rec, "undo": undo})
        self.open_txn = OpenTxn(txid, ops, memo, list(txn_steps(self.state, txid, ops, memo)))
        return self.open_txn

    def step(self, n: int = 1) -> int:
        """Write the next n page updates of the open txn durably; returns how many remain."""
        t = self.open_txn
        assert t is not None
        for pg in t.steps[t.done : t.done + n]:
            os.pwrite(self._pages, encode_page(pg), pg.no * PAGE_SIZE)
            t.done += 1
        os.fsync(self._pages)
        return t.remaining

    def commit(self) -> tuple[int, str]:
        t = self.open_txn
        assert t is not None
        if t.remaining:
            self.step(t.remaining)
        h = chain_hash(self.last_hash, t.txid, t.ops, t.memo)
        self._append({"k": "commit", "txid": t.txid, "hash": h})
        for pg in t.steps:
            self.state[pg.no] = pg
        self.last_txid, self.last_hash, self.open_txn = t.txid, h, None
        if os.fstat(self._wal).st_size > self.wal_max_bytes:
            self._checkpoint()
        return self.last_txid, self.last_hash

    def _checkpoint(self) -> None:
        """Bound the WAL: restart it from a snapshot of all pages at the last commit."""
        new = self.wal_path.with_name(self.wal_path.name + ".new")
        pages = {str(no): pack_page(pg) for no, pg in self.state.items()}
        rec = {"k": "ckpt", "txid": self.last_txid, "hash": self.last_hash, "pages": pages}
        with open(new, "wb") as f:
            f.write(encode_record(rec))
            f.flush()
            os.fsync(f.fileno())
        new.replace(self.wal_path)
        _fsync_dir(self.wal_path.parent)
        os.close(self._wal)
        self._wal = os.open(self.wal_path, os.O_WRONLY | os.O_APPEND)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
