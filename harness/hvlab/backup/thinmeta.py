"""What the thin pool has mapped, read from a metadata snapshot of the live pool.

`reserve_metadata_snap` is sent to the pool's `-tpool` device, `thin_dump`/`thin_delta` read the
snapshot through the hidden `_tmeta` device, and the snapshot is **always** released in a finally
(the kernel holds only one). Block numbers are in units of the pool's data block size.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import xml.etree.ElementTree as ET
from collections.abc import Generator, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

from hvlab.errors import HvlabError
from hvlab.lab import poolstatus
from hvlab.lab.paths import Names
from hvlab.sys import dirfd, dmioctl
from hvlab.sys.dmioctl import DmError
from hvlab.sys.run import run

SECTOR = 512


def tpool_dev(names: Names) -> str:
    return f"/dev/mapper/{poolstatus.tpool_name(names)}"


def tmeta_dev(names: Names) -> str:
    return f"/dev/mapper/{names.dm_lv_name(names.pool)}_tmeta"


Range = tuple[int, int]  # (first virtual block, length)


@dataclass(frozen=True)
class Mapping:
    """The virtual blocks a thin device has mapped, plus the data block each one points at."""

    dev_id: int
    block_bytes: int
    ranges: list[Range]  # merged virtual ranges, sorted
    pairs: list[tuple[int, int]]  # (virtual block, data block), sorted

    @property
    def mapped_blocks(self) -> int:
        return sum(n for _, n in self.ranges)


def merge(blocks: Iterable[int]) -> list[Range]:
    """Sorted block numbers -> (first, length) runs."""
    out: list[Range] = []
    for b in sorted(blocks):
        if out and out[-1][0] + out[-1][1] == b:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((b, 1))
    return out


def parse_dump(xml_text: str) -> tuple[int, dict[int, list[tuple[int, int]]]]:
    """thin_dump XML -> (data block size in bytes, {dev_id: [(virtual, data), ...]})."""
    root = ET.fromstring(xml_text)
    block_bytes = int(root.get("data_block_size", "128")) * SECTOR
    devs: dict[int, list[tuple[int, int]]] = {}
    for dev in root.iter("device"):
        pairs: list[tuple[int, int]] = []
        for m in dev:
            if m.tag == "single_mapping":
                pairs.append((int(m.get("origin_block", 0)), int(m.get("data_block", 0))))
            elif m.tag == "range_mapping":
                ob, db, n = (int(m.get(k, 0)) for k in ("origin_begin", "data_begin", "length"))
                pairs.extend((ob + i, db + i) for i in range(n))
        devs[int(dev.get("dev_id", -1))] = sorted(pairs)
    return block_bytes, devs


def parse_delta(xml_text: str) -> dict[str, list[Range]]:
    """thin_delta XML -> {"different": [...], "left_only": [...], "right_only": [...]}."""
    out: dict[str, list[Range]] = {"different": [], "left_only": [], "right_only": []}
    for el in ET.fromstring(xml_text).iter():
        if el.tag in out:
            out[el.tag].append((int(el.get("begin", 0)), int(el.get("length", 0))))
    return out


Dump = tuple[int, dict[int, list[tuple[int, int]]]]  # (block bytes, dev id -> pairs)


def mapping_in(dump: Dump, dev_id: int) -> Mapping:
    block_bytes, devs = dump
    pairs = devs.get(dev_id, [])
    return Mapping(dev_id, block_bytes, merge(v for v, _ in pairs), pairs)


def delta_in(dump: Dump, thin1: int, thin2: int) -> dict[str, list[Range]]:
    """What `thin_delta --thin1 --thin2` says, from a dump already read: blocks both map to
    different data ("different"), blocks only one maps ("left_only", "right_only"). A job
    asks it for every disk; one thin_delta costs 0.1-0.2 s in the lab VM, this microseconds."""
    _, devs = dump
    left, right = dict(devs.get(thin1, [])), dict(devs.get(thin2, []))
    return {"different": merge(v for v, b in left.items() if v in right and right[v] != b),
            "left_only": merge(v for v in left if v not in right),
            "right_only": merge(v for v in right if v not in left)}


class MetadataSnap:
    """An open metadata snapshot: query mappings and deltas of any thin id."""

    def __init__(self, names: Names) -> None:
        self.names = names
        self._dump: tuple[int, dict[int, list[tuple[int, int]]]] | None = None

    def dump(self) -> tuple[int, dict[int, list[tuple[int, int]]]]:
        if self._dump is None:
            res = run(["thin_dump", "--metadata-snap", tmeta_dev(self.names)], timeout=120)
            self._dump = parse_dump(res.stdout)
        return self._dump

    def mapping(self, dev_id: int) -> Mapping:
        return mapping_in(self.dump(), dev_id)

    def mappings(self, dev_ids: Iterable[int]) -> dict[int, Mapping]:
        """The mappings of these devices only, from one `thin_dump --dev-id ...`: a whole dump
        grows with every LV of the pool, and a job of many VMs asks once per VM."""
        ids = sorted(set(dev_ids))
        if self._dump is not None or not ids:
            return {i: self.mapping(i) for i in ids}
        argv = ["thin_dump", "--metadata-snap", *(w for i in ids for w in ("--dev-id", str(i))),
                tmeta_dev(self.names)]
        part = parse_dump(run(argv, timeout=120).stdout)
        return {i: mapping_in(part, i) for i in ids}

    def delta(self, thin1: int, thin2: int, *, tool: bool = False) -> dict[str, list[Range]]:
        """thin1..thin2: from the whole dump when it was read (tool=False), else thin_delta."""
        if self._dump is not None and not tool:
            return delta_in(self._dump, thin1, thin2)
        res = run(["thin_delta", "--metadata-snap", "--thin1", str(thin1), "--thin2",
                   str(thin2), tmeta_dev(self.names)], timeout=120)
        return parse_delta(res.stdout)


@contextmanager
def metadata_snap(names: Names) -> Iterator[MetadataSnap]:
    """The pool's one metadata snapshot, shared by every process of the lab through a flock.
    Holding the flock means no live holder exists, so a reservation left by a killed process
    is released and taken again."""
    tpool = poolstatus.tpool_name(names)
    dirfd.make_dirs(names.dir)
    fd = dirfd.open_file(names.dir / "metadata-snap.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # short waits: other holders only read metadata
        try:
            dmioctl.message(tpool, "reserve_metadata_snap")
        except DmError:
            _release(tpool)  # stale, from a killed process
            dmioctl.message(tpool, "reserve_metadata_snap")
        try:
            yield MetadataSnap(names)
        finally:
            _release(tpool)
    finally:
        os.close(fd)


def _release(tpool: str) -> None:
    """Release the pool's metadata snapshot; none held (or no pool) is not an error here."""
    with suppress(DmError):
        dmioctl.message(tpool, "release_metadata_snap")


def check(names: Names) -> str:
    """thin_check of the live pool's metadata through its metadata snapshot (the pool stays
    up, its guests keep writing). '' when clean, else what thin_check said."""
    with metadata_snap(names):
        res = run(["thin_check", "--metadata-snap", tmeta_dev(names)], check=False,
                  timeout=300)
    return "" if res.returncode == 0 else (res.stdout + res.stderr).strip()


def thin_tables() -> dict[str, list[str]]:
    """Every dm device's table, by name, as `dmsetup table` prints it, split into words
    (single-line tables: the lab's thin devices and controllers all are; of a longer one the
    last line). Ioctls only; a device that goes away meanwhile is left out."""
    out: dict[str, list[str]] = {}
    if not dmioctl.available():
        return out
    try:
        entries = dmioctl.list_names()
    except DmError:
        return out
    for entry in entries:
        try:
            targets = dmioctl.table(entry.name)
        except DmError:
            continue
        out[entry.name] = targets[-1].line.split() if targets else []
    return out


def pool_status(names: Names, *, check: bool = True) -> list[str]:
    """The pool's status words (lab.poolstatus.words); [] when they cannot be had and not
    check."""
    try:
        return poolstatus.words(names)
    except DmError:
        if check:
            raise
        return []


def pool_usage(names: Names) -> tuple[int, int]:
    """(used data blocks, total data blocks) from the pool's status line."""
    fields = pool_status(names)
    try:
        used, total = fields[2].split("/")
        return int(used), int(total)
    except (IndexError, ValueError):
        raise HvlabError(f"thin pool {tpool_dev(names)} reports no usage (status: "
                         f"{' '.join(fields) or 'empty'}); the pool may have failed") from None


# ------------------------------------------------------------------------------ block reads
CHUNK = 4 << 20


def read_ranges(dev: str, ranges: Iterable[Range],
                block_bytes: int) -> Generator[tuple[int, bytes], None, None]:
    """(byte offset, data) for each mapped range, read with O_DIRECT (no stale page cache).

    The device is closed on every path: read to the end, closed early by the caller (a
    `break`), or failed mid-way. The aligned buffer is only exported to the kernel for the
    read itself, never across a `yield` (an exported mmap cannot be closed)."""
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    try:
        with mmap.mmap(-1, CHUNK) as buf:
            for first, n in ranges:
                off, end = first * block_bytes, (first + n) * block_bytes
                while off < end:
                    with memoryview(buf) as whole, whole[:min(CHUNK, end - off)] as view:
                        try:
                            got = os.preadv(fd, [view], off)
                        except OSError as exc:  # say where: a bad sector has an address
                            raise OSError(exc.errno, f"{exc.strerror} reading {dev} at "
                                          f"byte {off}") from None
                        data = bytes(view[:got])
                    yield off, data
                    if got <= 0:
                        break
                    off += got
    finally:
        os.close(fd)
