"""Step 13: read the external snapshot S into sparse image files, mapped blocks only."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from hvlab.backup.thinmeta import Mapping, read_ranges
from hvlab.sys import dirfd

Progress = Callable[[int], None]


def _noop(_: int) -> None:
    pass


ZERO_CHUNK = bytes(4 << 20)


def _hash_zeros(h: Any, n: int) -> None:
    while n > 0:
        k = min(n, len(ZERO_CHUNK))
        h.update(ZERO_CHUNK[:k])
        n -= k


def _nonzero_runs(data: bytes, bs: int) -> Iterator[tuple[int, int]]:
    """(start, end) of the runs of whole blocks in `data` that are not all zeros."""
    run_start: int | None = None
    for i in range(0, len(data), bs):
        if data.count(0, i, i + bs) == min(bs, len(data) - i):
            if run_start is not None:
                yield run_start, i
                run_start = None
        elif run_start is None:
            run_start = i
    if run_start is not None:
        yield run_start, len(data)


def read_image(dev: str, m: Mapping, size: int, dest: Path,
               progress: Progress = _noop) -> dict[str, object]:
    """Copy the mapped blocks of `dev` into a sparse file of `size` bytes (see write_chunks).
    The device is closed before an error goes up: the unwind that follows removes the
    snapshot, which an open fd (kept alive by the traceback) would hold "in use"."""
    chunks = read_ranges(dev, m.ranges, m.block_bytes)
    try:
        return write_chunks(chunks, m, size, dest, progress)
    finally:
        chunks.close()


def write_chunks(chunks: Iterable[tuple[int, bytes]], m: Mapping, size: int, dest: Path,
                 progress: Progress = _noop) -> dict[str, object]:
    """Write (offset, data) chunks of the mapped blocks, in order, into a sparse file of `size`
    bytes; all-zero blocks stay holes. The sha256 of the whole logical image (holes as zeros,
    as `sha256sum` sees it) is computed while copying, so the image is never read back. On any
    failure (ENOSPC at the destination, EIO from the device or the link) the partial image is
    removed before the error goes up. The chunks come from the device (on-host) or over NBD
    (the off-host proxy)."""
    read = written = 0
    h = hashlib.sha256()
    hashed = 0  # the logical image is hashed up to here
    start = time.monotonic()
    fd = dirfd.open_file(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL)  # the VM's data: root's
    try:
        try:
            os.ftruncate(fd, size)
            for off, data in chunks:
                if off >= size:  # the caller passes the device's size: nothing maps past it
                    break
                data = data[:size - off]
                read += len(data)
                _hash_zeros(h, off - hashed)
                h.update(data)
                hashed = off + len(data)
                view = memoryview(data)
                for a, b in _nonzero_runs(data, m.block_bytes):  # one write per run
                    os.pwrite(fd, view[a:b], off + a)
                    written += b - a
                progress(len(data))
            _hash_zeros(h, size - hashed)
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        dirfd.unlink(dest, missing_ok=True)  # we made it (O_EXCL): never half an image
        raise
    return {"sha256": h.hexdigest(), "bytes_read": read, "bytes_written": written,
            "size": size, "mapped_blocks": m.mapped_blocks, "block_bytes": m.block_bytes,
            "seconds": round(time.monotonic() - start, 3)}


def sha256_file(path: Path) -> str:
    """sha256 of the logical content; holes are hashed as zeros without reading them twice."""
    h = hashlib.sha256()
    size = path.stat().st_size
    zero = bytes(1 << 20)
    with open(path, "rb") as f:
        fd = f.fileno()
        pos = 0
        while pos < size:
            try:
                data_at = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                data_at = size
            while pos < data_at:  # a hole
                n = min(len(zero), data_at - pos)
                h.update(zero[:n])
                pos += n
            if pos >= size:
                break
            hole_at = os.lseek(fd, pos, os.SEEK_HOLE)
            f.seek(pos)
            while pos < hole_at:
                chunk = f.read(min(1 << 20, hole_at - pos))
                if not chunk:
                    break
                h.update(chunk)
                pos += len(chunk)
    return h.hexdigest()


def data_segments(path: Path) -> list[tuple[int, int]]:
    """(offset, length) of the non-hole parts of a sparse file."""
    out: list[tuple[int, int]] = []
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end - start))
            pos = end
    finally:
        os.close(fd)
    return out


def write_image(image: Path, dev: str, block_bytes: int) -> int:
    """Write an image's data onto a fresh thin device in whole pool blocks (the pool skips
    zeroing, so a partly written block would expose stale data). Returns bytes written."""
    written = 0
    src = os.open(image, os.O_RDONLY)
    dst = os.open(dev, os.O_WRONLY)
    try:
        for start, length in data_segments(image):
            first = start // block_bytes * block_bytes
            end = -(-(start + length) // block_bytes) * block_bytes
            off = first
            while off < end:
                n = min(4 << 20, end - off)
                data = os.pread(src, n, off).ljust(n, b"\0")
                if data.count(0) != len(data):
                    os.pwrite(dst, data, off)
                    written += len(data)
                off += n
        os.fsync(dst)
    finally:
        os.close(src)
        os.close(dst)
    return written
