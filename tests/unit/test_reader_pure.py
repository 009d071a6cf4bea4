"""Pure parts of the snapshot reader: zero-run detection and streaming hash of holes."""

from __future__ import annotations

import hashlib

from hvlab.backup.reader import _hash_zeros, _nonzero_runs

BS = 4


def test_nonzero_runs_merge_adjacent_blocks_and_skip_zero_blocks() -> None:
    data = b"\0" * 4 + b"ab\0\0" + b"cdef" + b"\0" * 4 + b"g\0\0\0"
    assert list(_nonzero_runs(data, BS)) == [(4, 12), (16, 20)]


def test_nonzero_runs_all_zero_and_all_data() -> None:
    assert list(_nonzero_runs(bytes(16), BS)) == []
    assert list(_nonzero_runs(b"x" * 16, BS)) == [(0, 16)]


def test_nonzero_runs_short_last_block() -> None:
    assert list(_nonzero_runs(b"\0\0\0\0zz", BS)) == [(4, 6)]
    assert list(_nonzero_runs(b"zzzz\0\0", BS)) == [(0, 4)]


def test_hash_zeros_matches_plain_sha256() -> None:
    for n in (0, 1, 4 << 20, (4 << 20) + 17, 9 << 20):
        h = hashlib.sha256()
        _hash_zeros(h, n)
        assert h.hexdigest() == hashlib.sha256(bytes(n)).hexdigest()
