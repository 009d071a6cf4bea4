"""Before a backup makes anything: has the thin pool room for it?

A pool whose metadata fills switches to read-only for every thin device in it, the live disks
too, until `lvconvert --repair`. So a job refuses to start, with one line and nothing made,
when the pool's metadata is at or above a limit (80 % by default, where lvm users commonly set
`thin_pool_autoextend_threshold`), when the worst case of this backup would take it past
100 %, when its data space is already full, or when LVM reports the pool out of data,
read-only or failed (`lv_health_status`). Every figure comes from one `lvs` report.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from hvlab.errors import BadInput
from hvlab.sys.lvm import LvRow

DEFAULT_METADATA_LIMIT = 80  # percent
META_BLOCK = 4096  # dm-thin metadata block size, fixed by the kernel
# A dm-btree node is a 4 KiB block: at most 252 entries of 16 bytes (key and mapping). A split
# leaves two half-full nodes: 126 mappings per block is the estimate's assumption (thin LVs
# written in the lab VM measured ~225 per leaf, so the estimate errs on the safe side).
ENTRIES_PER_NODE = 126
# Per new thin device: its entry in the pool's device-details tree and in the top-level
# mapping tree (a node split each at worst). Measured: a new snapshot costs 0-1 block.
DEVICE_BLOCKS = 2
NEW_DEVICES_PER_DISK = 4  # C and A (inside the freeze), S_B and S_A (step 11)


@dataclass(frozen=True)
class Pool:
    """The thin pool's figures as LVM reports them."""

    name: str  # vg/pool
    data_percent: float
    metadata_percent: float
    metadata_blocks: int
    chunk_bytes: int
    health: str  # lv_health_status: '' when healthy

    @property
    def metadata_used(self) -> int:
        return math.ceil(self.metadata_percent * self.metadata_blocks / 100)


def _figure(row: LvRow, what: str, value: float | None) -> float:
    if value is None or not math.isfinite(value) or value < 0:
        raise BadInput(f"thin pool {row.vg}/{row.name}: LVM reports no {what}; the pool may "
                       f"have failed - not starting")
    return float(value)


def pool_of(rows: Mapping[str, LvRow], vg: str, pool: str) -> Pool:
    row = rows.get(pool)
    if row is None:
        raise BadInput(f"thin pool {vg}/{pool} is missing: not starting the backup")
    if row.health:  # its percentages may be stale or absent: say what LVM says first
        return Pool(f"{vg}/{pool}", 0.0, 0.0, 0, 0, row.health)
    meta = _figure(row, "lv_metadata_size", row.metadata_size)
    return Pool(f"{vg}/{pool}", _figure(row, "data_percent", row.data_percent),
                _figure(row, "metadata_percent", row.metadata_percent),
                int(meta) // META_BLOCK, int(_figure(row, "chunk_size", row.chunk_size)), "")


def mapped_chunks(row: LvRow | None, chunk_bytes: int) -> int:
    """Pool chunks a thin LV maps, from LVM's data_percent of its size (rounded up)."""
    if row is None or row.data_percent is None or row.size is None:
        return 0
    pct, size = row.data_percent, row.size
    if not math.isfinite(pct) or pct <= 0 or size <= 0 or chunk_bytes <= 0:
        return 0
    return math.ceil(pct / 100 * size / chunk_bytes)


def tree_blocks(mappings: int) -> int:
    """Metadata blocks of a mapping tree of that many mappings: leaves and their parents."""
    leaves = -(-mappings // ENTRIES_PER_NODE)
    inner = 0
    level = leaves
    while level > 1:
        level = -(-level // ENTRIES_PER_NODE)
        inner += level
    return leaves + inner


def worst_case_blocks(mapped: Sequence[int]) -> int:
    """Metadata blocks a backup of disks whose live LVs map `mapped` chunks may need at its
    peak (after step 11). Every new device costs its entries; C (the guest's writes) and A
    (auto-recovery's) can each come to copy the whole of B's mapping tree, block by block, as
    they unshare it. S_B and S_A are never written: they share their origins' trees."""
    return sum(NEW_DEVICES_PER_DISK * DEVICE_BLOCKS + 2 * tree_blocks(m) for m in mapped)


def refusal(pool: Pool, mapped: Sequence[int], limit: int) -> str | None:
    """Why a backup of disks mapping `mapped` chunks must not start, or None."""
    p = pool.name
    if pool.health:
        way = ("extend it (lvextend) first" if pool.health == "out_of_data" else
               "`hvlab recover` activates it again (LVM's thin_check) first")
        return (f"thin pool {p} is {pool.health} (LVM's lv_health_status): not starting the "
                f"backup; {way}")
    if pool.data_percent >= 100:
        return (f"thin pool {p} data space is {pool.data_percent:.2f}% full: no room for the "
                f"backup's checkpoints; extend the pool (lvextend) first")
    if pool.metadata_percent >= limit:
        return (f"thin pool {p} metadata is {pool.metadata_percent:.2f}% used, at or above the "
                f"limit of {limit}% (--metadata-limit): not starting the backup; free or "
                f"extend the pool's metadata (lvextend --poolmetadatasize) first")
    need = worst_case_blocks(mapped)
    if pool.metadata_used + need > pool.metadata_blocks:
        return (f"thin pool {p} metadata is {pool.metadata_percent:.2f}% used "
                f"({pool.metadata_used} of {pool.metadata_blocks} blocks); this backup "
                f"({NEW_DEVICES_PER_DISK} thin devices per disk, {len(mapped)} disks) may need "
                f"up to {need} more, past 100%: not starting; extend the pool's metadata first")
    return None


def check_limit(limit: object) -> int:
    """--metadata-limit: a whole percentage, 1..100."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 100:
        raise BadInput(f"invalid --metadata-limit {limit!r}: a whole percentage from 1 to 100")
    return limit


def check(rows: Mapping[str, LvRow], vg: str, pool: str, disks: Sequence[str],
          limit: int) -> None:
    """Refuse (BadInput, exit 2) a backup of the live LVs `disks` that the pool cannot take."""
    p = pool_of(rows, vg, pool)
    mapped = [mapped_chunks(rows.get(lv), p.chunk_bytes) for lv in disks]
    why = refusal(p, mapped, limit)
    if why:
        raise BadInput(why)
