"""read_ranges on a regular file (O_DIRECT works on ext4/xfs): no file descriptor outlives the
generator, whether it is read to the end, closed early or fails mid-way."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hvlab.backup.thinmeta import read_ranges

BLOCK = 64 << 10  # the lab's pool chunk size


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def image() -> Iterator[Path]:
    # /var/tmp, not tmp_path: a tmpfs /tmp may refuse O_DIRECT.
    fd, name = tempfile.mkstemp(prefix="hvlab-unit-", dir="/var/tmp")
    os.close(fd)
    path = Path(name)
    try:
        path.write_bytes(os.urandom(16 * BLOCK))
        try:
            os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
        except OSError as exc:
            pytest.skip(f"no O_DIRECT on /var/tmp: {exc}")
        yield path
    finally:
        path.unlink()


def test_reads_every_range_and_closes(image: Path) -> None:
    before = _open_fds()
    got = list(read_ranges(str(image), [(0, 2), (10, 1)], BLOCK))
    data = image.read_bytes()
    assert [(off, len(d)) for off, d in got] == [(0, 2 * BLOCK), (10 * BLOCK, BLOCK)]
    assert got[0][1] == data[:2 * BLOCK] and got[1][1] == data[10 * BLOCK:11 * BLOCK]
    assert _open_fds() == before


def test_closed_early_leaves_no_fd(image: Path) -> None:
    before = _open_fds()
    gen = read_ranges(str(image), [(0, 4), (8, 4)], BLOCK)
    off, _ = next(gen)
    assert off == 0
    gen.close()  # raised BufferError and skipped os.close while a memoryview was exported
    assert _open_fds() == before


def test_consumer_stopping_early_leaves_no_fd(image: Path) -> None:
    """As reader.read_image does: break out of the loop, the generator is dropped."""
    before = _open_fds()
    for off, _ in read_ranges(str(image), [(0, 16)], BLOCK):
        if off >= 0:
            break
    assert _open_fds() == before


def test_read_failing_mid_way_leaves_no_fd(image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0
    real = os.preadv

    def flaky(fd: int, buffers: list[memoryview], offset: int) -> int:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError(5, "Input/output error")
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", flaky)
    before = _open_fds()
    gen = read_ranges(str(image), [(0, 1), (4, 1)], BLOCK)
    next(gen)
    with pytest.raises(OSError, match="Input/output error"):
        next(gen)
    assert _open_fds() == before


def test_exception_thrown_in_at_the_yield_leaves_no_fd(image: Path) -> None:
    """A consumer failing while it holds a chunk (e.g. a full disk writing the image)."""
    before = _open_fds()
    gen = read_ranges(str(image), [(0, 4)], BLOCK)
    next(gen)
    with pytest.raises(RuntimeError, match="consumer failed"):
        gen.throw(RuntimeError("consumer failed"))
    assert _open_fds() == before

