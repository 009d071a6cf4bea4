"""The transactional (VSS-aware) writer's store: a write-ahead log plus checksummed data pages.

Layout: the WAL lives on the VM's first disk (`<mnt0>/ledger/wal.log`), the data pages on its last
disk (`<mntN>/ledger/pages.db`), so a two-disk VM needs both disks from one instant to be
consistent. Accounts live in fixed pages; each transaction moves amounts between accounts, so the
total never changes. Per transaction: BEGIN (ops + before-images) -> fsync WAL -> page writes ->
fsync pages -> COMMIT (chained hash) -> fsync WAL.

`check` reads an image and never writes; `recover` is the auto-recovery repair; the live store
the writer uses is `store.Ledger`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PAGE_SIZE = 4096
SUM_SIZE = 32  # sha256 of the rest of the page: a torn page fails it
BODY_SIZE = PAGE_SIZE - SUM_SIZE
PER_PAGE = 16
_HDR = struct.Struct("<4sIQH")  # magic, page_no, lsn (txid of last update), memo_len
_BAL = struct.Struct(f"<{PER_PAGE}q")
MEMO_MAX = BODY_SIZE - _HDR.size - _BAL.size
PAGE_MAGIC = b"HVPG"
META_MAGIC = b"HVLM"
GENESIS = "0" * 64

WAL_REL = Path("ledger") / "wal.log"
PAGES_REL = Path("ledger") / "pages.db"
SCRATCH_DIR = "scratch"
SCRATCH_GLOB = "*.tmp"

Op = tuple[int, int, int]  # (from account, to account, amount)


class TornPage(ValueError):
    pass


@dataclass
class Page:
    no: int
    lsn: int
    balances: list[int]
    memo: bytes = b""

    def copy(self) -> Page:
        return Page(self.no, self.lsn, list(self.balances), self.memo)


def encode_page(p: Page) -> bytes:
    body = _HDR.pack(PAGE_MAGIC, p.no, p.lsn, len(p.memo)) + _BAL.pack(*p.balances) + p.memo
    body = body.ljust(BODY_SIZE, b"\0")
    return body + hashlib.sha256(body).digest()


def decode_page(raw: bytes, no: int) -> Page:
    if len(raw) != PAGE_SIZE or hashlib.sha256(raw[:BODY_SIZE]).digest() != raw[BODY_SIZE:]:
        raise TornPage(f"page {no}: checksum mismatch (torn or corrupt)")
    magic, pno, lsn, mlen = _HDR.unpack_from(raw)
    if magic != PAGE_MAGIC or pno != no or mlen > MEMO_MAX:
        raise TornPage(f"page {no}: bad header")
    bal = list(_BAL.unpack_from(raw, _HDR.size))
    off = _HDR.size + _BAL.size
    return Page(no, lsn, bal, raw[off : off + mlen])


@dataclass(frozen=True)
class Meta:
    accounts: int
    initial: int

    @property
    def npages(self) -> int:
        return (self.accounts + PER_PAGE - 1) // PER_PAGE

    @property
    def total(self) -> int:
        return self.accounts * self.initial

    def encode(self) -> bytes:
        js = json.dumps({"v": 1, "accounts": self.accounts, "initial": self.initial}).encode()
        body = (META_MAGIC + js).ljust(BODY_SIZE, b"\0")
        return body + hashlib.sha256(body).digest()

    @staticmethod
    def decode(raw: bytes) -> Meta:
        if len(raw) != PAGE_SIZE or hashlib.sha256(raw[:BODY_SIZE]).digest() != raw[BODY_SIZE:]:
            raise TornPage("meta page: checksum mismatch")
        if raw[:4] != META_MAGIC:
            raise TornPage("meta page: bad magic")
        d = json.loads(raw[4:BODY_SIZE].rstrip(b"\0"))
        return Meta(int(d["accounts"]), int(d["initial"]))


def initial_pages(meta: Meta) -> dict[int, Page]:
    pages = {}
    for no in range(1, meta.npages + 1):
        n = min(PER_PAGE, meta.accounts - (no - 1) * PER_PAGE)
        pages[no] = Page(no, 0, [meta.initial] * n + [0] * (PER_PAGE - n))
    return pages


def page_of(account: int) -> tuple[int, int]:
    return account // PER_PAGE + 1, account % PER_PAGE


def txn_steps(state: Mapping[int, Page], txid: int, ops: list[Op], memo: bytes) -> Iterator[Page]:
    """Successive page images of a transaction, one page write per half of a transfer.

    Shared by the live writer and the checker's replay, so both agree byte for byte."""
    work = {no: p.copy() for no, p in state.items()}
    for src, dst, amount in ops:
        for acct, delta in ((src, -amount), (dst, amount)):
            no, slot = page_of(acct)
            pg = work[no]
            pg.balances[slot] += delta
            pg.lsn = txid
            pg.memo = memo
            yield pg.copy()


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def chain_hash(prev: str, txid: int, ops: list[Op], memo: bytes) -> str:
    content = canonical({"txid": txid, "ops": [list(o) for o in ops], "memo": memo.hex()})
    return hashlib.sha256(prev.encode() + content.encode()).hexdigest()


def encode_record(rec: dict[str, Any]) -> bytes:
    body = canonical(rec)
    return canonical({**rec, "crc": zlib.crc32(body.encode())}).encode() + b"\n"


def pack_page(p: Page) -> str:
    return base64.b64encode(zlib.compress(encode_page(p))).decode()


def unpack_page(s: str) -> bytes:
    return zlib.decompress(base64.b64decode(s))


@dataclass
class WalScan:
    """The valid records of a WAL and where they end (bytes)."""

    records: list[tuple[int, dict[str, Any]]]  # (offset, record)
    valid_end: int
    size: int
    bad: list[str] = field(default_factory=list)  # corrupt records before the tail
    torn_tail: bool = False


def scan_wal(data: bytes) -> WalScan:
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]  # tail: bytes after the last newline (a torn append)
    recs: list[tuple[int, dict[str, Any]]] = []
    bad: list[str] = []
    off = 0
    torn = bool(tail)
    for i, line in enumerate(complete):
        rec = _parse(line)
        if rec is None:
            # A bad last line is a torn append; a bad line in the middle is corruption.
            if i == len(complete) - 1 and not tail:
                torn = True
            else:
                bad.append(f"WAL record {i + 1} at byte {off} is corrupt")
                torn = False
            break
        recs.append((off, rec))
        off += len(line) + 1
    return WalScan(recs, off, len(data), bad, torn)


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        rec = json.loads(line)
        crc = rec.pop("crc")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    if not isinstance(rec, dict) or zlib.crc32(canonical(rec).encode()) != crc:
        return None
    return rec


@dataclass
class Replay:
    meta: Meta
    state: dict[int, Page]
    last_txid: int = 0
    last_hash: str = GENESIS
    committed: int = 0
    pending: dict[str, Any] | None = None  # BEGIN without COMMIT
    pending_off: int = 0
    problems: list[str] = field(default_factory=list)


def replay(meta: Meta, scan: WalScan) -> Replay:
    r = Replay(meta, initial_pages(meta))
    for off, rec in scan.records:
        kind = rec.get("k")
        if kind == "ckpt" and not r.committed and r.pending is None:
            r.last_txid, r.last_hash = int(rec["txid"]), str(rec["hash"])
            pages = rec["pages"].items()
            r.state = {int(k): decode_page(unpack_page(v), int(k)) for k, v in pages}
        elif kind == "begin":
            if r.pending is not None:
                r.problems.append(f"txn {rec.get('txid')} begins while {r.pending['txid']} is open")
                break
            if rec.get("txid") != r.last_txid + 1:
                r.problems.append(f"txid gap: {rec.get('txid')} after {r.last_txid}")
                break
            r.pending, r.pending_off = rec, off
        elif kind == "commit":
            p = r.pending
            if p is None or rec.get("txid") != p["txid"]:
                r.problems.append(f"commit of txn {rec.get('txid')} without its begin")
                break
            ops: list[Op] = [(int(a), int(b), int(c)) for a, b, c in p["ops"]]
            memo = bytes.fromhex(p["memo"])
            h = chain_hash(r.last_hash, p["txid"], ops, memo)
            if h != rec.get("hash"):
                r.problems.append(f"hash chain broken at txn {p['txid']}")
                break
            for pg in txn_steps(r.state, p["txid"], ops, memo):
                r.state[pg.no] = pg
            r.last_txid, r.last_hash, r.pending = p["txid"], h, None
            r.committed += 1
        else:
            r.problems.append(f"unexpected WAL record {kind!r} at byte {off}")
            break
    return r


def ledger_paths(roots: Mapping[str, Path]) -> tuple[Path, Path]:
    mounts = [Path(p) for p in roots.values()]
    if not mounts:
        raise ValueError("no disks")
    return mounts[0] / WAL_REL, mounts[-1] / PAGES_REL


@dataclass
class CheckResult:
    consistent: bool
    last_txid: int
    last_hash: str
    unfinished: int | None
    committed: int
    problems: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "consistent": self.consistent,
            "last_txid": self.last_txid,
            "last_hash": self.last_hash,
            "unfinished": self.unfinished,
            "committed": self.committed,
            "problems": list(self.problems),
        }


def read_all(path: Path) -> bytes:
    # O_RDONLY only: the checker runs on read-only images and must never write.
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def check(roots: Mapping[str, Path]) -> CheckResult:
    """Is the ledger on these (mounted, possibly read-only) disks consistent?"""
    wal_path, pages_path = ledger_paths(roots)
    problems: list[str] = []
    try:
        wal, pages = read_all(wal_path), read_all(pages_path)
    except OSError as exc:
        return CheckResult(False, 0, GENESIS, None, 0, [f"ledger missing: {exc}"])
    try:
        meta = Meta.decode(pages[:PAGE_SIZE])
    except (TornPage, ValueError, KeyError) as exc:
        return CheckResult(False, 0, GENESIS, None, 0, [str(exc)])
    scan = scan_wal(wal)
    problems += scan.bad
    if scan.torn_tail:
        problems.append(f"torn WAL tail at byte {scan.valid_end}")
    try:
        r = replay(meta, scan)
    except (TornPage, ValueError, KeyError, TypeError) as exc:
        return CheckResult(False, 0, GENESIS, None, 0, [*problems, f"WAL unreadable: {exc}"])
    problems += r.problems
    unfinished = int(r.pending["txid"]) if r.pending is not None else None
    open_pages = {int(k) for k in r.pending["undo"]} if r.pending is not None else set()
    if unfinished is not None:
        problems.append(f"transaction {unfinished} is unfinished (needs recovery)")
    total = 0
    for no in range(1, meta.npages + 1):
        raw = pages[no * PAGE_SIZE : (no + 1) * PAGE_SIZE]
        try:
            pg = decode_page(raw, no)
        except TornPage as exc:
            problems.append(str(exc))
            continue
        total += sum(pg.balances)
        # Pages the open transaction touched may legitimately hold its partial writes.
        if no not in open_pages and encode_page(pg) != encode_page(r.state[no]):
            problems.append(f"page {no} differs from the replay of committed transactions")
    if total != meta.total and not any("torn" in p or "checksum" in p for p in problems):
        problems.append(f"invariant violated: total {total} != {meta.total}")
    return CheckResult(not problems, r.last_txid, r.last_hash, unfinished, r.committed, problems)


@dataclass
class RecoveryReport:
    rolled_back: int | None = None
    pages_restored: list[int] = field(default_factory=list)
    wal_truncated_bytes: int = 0
    removed: list[str] = field(default_factory=list)
    last_txid: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "rolled_back": self.rolled_back,
            "pages_restored": list(self.pages_restored),
            "wal_truncated_bytes": self.wal_truncated_bytes,
            "removed": list(self.removed),
            "last_txid": self.last_txid,
        }


def remove_excluded(roots: Mapping[str, Path]) -> list[str]:
    removed = []
    for mnt in roots.values():
        for f in sorted((Path(mnt) / SCRATCH_DIR).glob(SCRATCH_GLOB)):
            f.unlink()
            removed.append(str(f))
    return removed


def rollback(wal_path: Path, pages_path: Path) -> RecoveryReport:
    """Undo an unfinished transaction and cut the WAL after the last valid COMMIT."""
    rep = RecoveryReport()
    if not wal_path.exists() or not pages_path.exists():
        return rep
    wal = read_all(wal_path)
    meta = Meta.decode(read_all(pages_path)[:PAGE_SIZE])
    scan = scan_wal(wal)
    r = replay(meta, scan)
    cut = scan.valid_end
    if r.pending is not None:
        cut = r.pending_off
        rep.rolled_back = int(r.pending["txid"])
        fd = os.open(pages_path, os.O_RDWR)
        try:
            for k, v in sorted(r.pending["undo"].items(), key=lambda kv: int(kv[0])):
                os.pwrite(fd, unpack_page(v), int(k) * PAGE_SIZE)
                rep.pages_restored.append(int(k))
            os.fsync(fd)
        finally:
            os.close(fd)
    if cut < len(wal):
        # Pages are restored and durable before the BEGIN carrying their undo goes away.
        fd = os.open(wal_path, os.O_WRONLY)
        try:
            os.ftruncate(fd, cut)
            os.fsync(fd)
        finally:
            os.close(fd)
        rep.wal_truncated_bytes = len(wal) - cut
    rep.last_txid = r.last_txid
    return rep


def recover(roots: Mapping[str, Path]) -> RecoveryReport:
    """Auto-recovery on a writable image: roll back, truncate the WAL tail, drop excluded files."""
    wal_path, pages_path = ledger_paths(roots)
    rep = rollback(wal_path, pages_path)
    leftover = wal_path.with_name(wal_path.name + ".new")
    if leftover.exists():
        leftover.unlink()
        rep.removed.append(str(leftover))
    rep.removed += remove_excluded(roots)
    return rep
