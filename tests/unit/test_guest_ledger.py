"""The ledger store, its checker and its repair, on plain directories."""

from __future__ import annotations

import hashlib
import json
import random
import zlib
from pathlib import Path

import pytest

from hvlab.guest import ledger
from hvlab.guest.ledger import PAGE_SIZE, check, recover
from hvlab.guest.store import Ledger


@pytest.fixture
def roots(tmp_path: Path) -> dict[str, Path]:
    r = {"d0": tmp_path / "d0", "d1": tmp_path / "d1"}
    for p in r.values():
        p.mkdir()
    return r


def run_txns(lg: Ledger, n: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    for _ in range(n):
        ops = [(*rng.sample(range(lg.meta.accounts), 2), rng.randint(1, 50)) for _ in range(3)]
        lg.begin([(a, b, c) for a, b, c in ops], rng.randbytes(32))
        while lg.step():
            pass
        lg.commit()


def snapshot(roots: dict[str, Path]) -> dict[str, tuple[bytes, int]]:
    out = {}
    for mnt in roots.values():
        for f in sorted(mnt.rglob("*")):
            if f.is_file():
                out[str(f)] = (f.read_bytes(), f.stat().st_mtime_ns)
    return out


def test_layout_spans_first_and_last_disk(roots: dict[str, Path]) -> None:
    lg = Ledger(roots)
    assert lg.wal_path == roots["d0"] / "ledger" / "wal.log"
    assert lg.pages_path == roots["d1"] / "ledger" / "pages.db"
    lg.close()


def test_commit_replay_and_reopen(roots: dict[str, Path]) -> None:
    lg = Ledger(roots, accounts=40)
    run_txns(lg, 25)
    last = (lg.last_txid, lg.last_hash)
    lg.close()
    res = check(roots)
    assert res.consistent, res.problems
    assert (res.last_txid, res.last_hash) == last
    assert res.last_txid == 25 and res.committed == 25 and res.unfinished is None
    lg2 = Ledger(roots)
    assert (lg2.last_txid, lg2.last_hash) == last
    run_txns(lg2, 5, seed=2)
    lg2.close()
    assert check(roots).last_txid == 30


def test_chain_is_deterministic(tmp_path: Path) -> None:
    hashes = []
    for name in ("a", "b"):
        r = {"d": tmp_path / name}
        r["d"].mkdir()
        lg = Ledger(r)
        run_txns(lg, 10)
        hashes.append(lg.last_hash)
        lg.close()
    assert hashes[0] == hashes[1] != ledger.GENESIS


def test_checker_never_writes(roots: dict[str, Path]) -> None:
    lg = Ledger(roots)
    run_txns(lg, 5)
    lg.begin([(0, 20, 5)], b"x")
    lg.step(1)
    before = snapshot(roots)
    assert not check(roots).consistent
    assert snapshot(roots) == before


def test_unfinished_txn_is_rolled_back(roots: dict[str, Path]) -> None:
    lg = Ledger(roots)
    run_txns(lg, 7)
    committed = (lg.last_txid, lg.last_hash)
    pages_before = lg.pages_path.read_bytes()
    (roots["d0"] / "scratch").mkdir()
    (roots["d0"] / "scratch" / "0001.tmp").write_bytes(b"junk")
    (roots["d0"] / "scratch" / "keep.dat").write_bytes(b"not excluded")
    lg.begin([(0, 40, 9), (1, 50, 3)], b"open")
    lg.step(1)  # debit only
    res = check(roots)
    assert not res.consistent
    assert res.unfinished == 8
    assert (res.last_txid, res.last_hash) == committed
    assert any("invariant" in p for p in res.problems)
    rep = recover(roots)
    assert rep.rolled_back == 8 and rep.wal_truncated_bytes > 0
    assert rep.removed == [str(roots["d0"] / "scratch" / "0001.tmp")]
    assert (roots["d0"] / "scratch" / "keep.dat").exists()
    res = check(roots)
    assert res.consistent, res.problems
    assert (res.last_txid, res.last_hash) == committed
    assert lg.pages_path.read_bytes() == pages_before
    # recovery is idempotent
    assert recover(roots).rolled_back is None
    lg.close()


def test_torn_page_is_rejected(roots: dict[str, Path]) -> None:
    lg = Ledger(roots)
    run_txns(lg, 5)
    lg.close()
    with open(lg.pages_path, "r+b") as f:
        f.seek(2 * PAGE_SIZE + PAGE_SIZE // 2)
        f.write(b"\xff" * (PAGE_SIZE // 2))  # second half of page 2 never made it / garbage
    res = check(roots)
    assert not res.consistent
    assert any("page 2" in p and "torn" in p for p in res.problems), res.problems


def _rewrite_wal(path: Path, edit: int, field: str, value: object) -> None:
    lines = path.read_bytes().splitlines()
    rec = json.loads(lines[edit])
    rec.pop("crc")
    rec[field] = value
    lines[edit] = ledger.encode_record(rec).rstrip(b"\n")
    path.write_bytes(b"\n".join(lines) + b"\n")


def test_broken_chain_is_rejected(roots: dict[str, Path]) -> None:
    lg = Ledger(roots)
    run_txns(lg, 5)
    lg.close()
    # record 5 is txn 3's COMMIT: a valid record (good crc) with a forged hash
    _rewrite_wal(lg.wal_path, 5, "hash", hashlib.sha256(b"forged").hexdigest())
    res = check(roots)
    assert not res.consistent
    assert any("hash chain broken at txn 3" in p for p in res.problems), res.problems
    assert res.last_txid == 2


def test_corrupt_wal_record_is_rejected(roots: dict[str, Path]) -> None:
    lg = Ledger(roots)
    run_txns(lg, 3)
    lg.close()
    data = bytearray(lg.wal_path.read_bytes())
    data[10] ^= 0x01
    lg.wal_path.write_bytes(bytes(data))
    res = check(roots)
    assert not res.consistent and any("corrupt" in p for p in res.problems)


def test_invariant_violation_is_rejected(roots: dict[str, Path]) -> None:
    lg = Ledger(roots)
    run_txns(lg, 5)
    lg.close()
    raw = lg.pages_path.read_bytes()
    pg = ledger.decode_page(raw[PAGE_SIZE : 2 * PAGE_SIZE], 1)
    pg.balances[0] += 1  # money from nowhere, in a page with a valid checksum
    with open(lg.pages_path, "r+b") as f:
        f.seek(PAGE_SIZE)
        f.write(ledger.encode_page(pg))
    res = check(roots)
    assert not res.consistent
    assert any("invariant violated" in p for p in res.problems), res.problems
    assert any("page 1 differs" in p for p in res.problems)


def test_torn_wal_tail_is_truncated(roots: dict[str, Path]) -> None:
    lg = Ledger(roots)
    run_txns(lg, 4)
    lg.close()
    with open(lg.wal_path, "ab") as f:
        f.write(b'{"k":"begin","txid":5,"op')
    res = check(roots)
    assert not res.consistent and any("torn WAL tail" in p for p in res.problems)
    rep = recover(roots)
    assert rep.wal_truncated_bytes > 0 and rep.rolled_back is None
    assert check(roots).consistent


def test_checkpoint_bounds_the_wal(roots: dict[str, Path]) -> None:
    lg = Ledger(roots, wal_max_bytes=4096)
    run_txns(lg, 40)
    lg.close()
    first = json.loads(lg.wal_path.read_bytes().splitlines()[0])
    assert first["k"] == "ckpt"
    assert lg.wal_path.stat().st_size < 4096 + 8192
    res = check(roots)
    assert res.consistent, res.problems
    assert res.last_txid == 40 and res.last_hash == lg.last_hash


def test_missing_ledger_is_reported(roots: dict[str, Path]) -> None:
    res = check(roots)
    assert not res.consistent and "missing" in res.problems[0]


def test_single_disk(tmp_path: Path) -> None:
    r = {"only": tmp_path}
    lg = Ledger(r)
    run_txns(lg, 3)
    lg.close()
    assert (tmp_path / "ledger" / "wal.log").exists()
    assert (tmp_path / "ledger" / "pages.db").exists()
    assert check(r).consistent


def test_record_crc_covers_content() -> None:
    line = ledger.encode_record({"k": "commit", "txid": 1, "hash": "00"})
    rec = json.loads(line)
    assert rec["crc"] == zlib.crc32(
        ledger.canonical({"k": "commit", "txid": 1, "hash": "00"}).encode()
    )
