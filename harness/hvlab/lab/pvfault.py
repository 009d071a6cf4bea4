"""Faults below a lab's pool, the way lvm2's test suite makes them (aux error_dev, delay_dev):
every PV is a dm-linear over its loop, and a fault swaps the PV's table for a kernel fault
target and back. The pool and the LVs above see only what a failing disk would show them.

    with pvfault.delayed(names, 0, write_ms=30_000):   # a device that will not flush
        ...
    with pvfault.bad_blocks(names, 0, [1234]):          # reads of those 4 KiB blocks fail
        ...
    with pvfault.lv_fails(names, "pool_tmeta"):         # the pool's metadata disk fails
        ...

The swap suspends the PV with a bound (dmioctl.suspended): from a thread other than the main
one, call dmioctl.prepare_interrupts() in the main thread first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from hvlab.errors import HvlabError
from hvlab.lab.inventory import pv_devices
from hvlab.lab.paths import Names
from hvlab.sys import dm, dmioctl
from hvlab.sys.dmioctl import Target
from hvlab.sys.run import run

DUST_BLOCK = 4096
SECTOR = 512


def _require_target(kind: str) -> None:
    """The lab VM loads the fault targets at boot; natively they may still be modules."""
    if kind not in dmioctl.targets():
        run(["modprobe", f"dm-{kind}"], check=False)
        if kind not in dmioctl.targets():
            raise HvlabError(f"the kernel has no dm {kind} target (modprobe dm-{kind} failed)")


SUSPEND_S = 120.0  # a PV whose I/O never completes costs this much, not a hang


def _swap(pv: str, table: list[Target]) -> None:
    # A plain suspend flushes what is in flight (dm-delay lets its held I/O go at once); the
    # resume puts the loaded table live, or the old one back if the load failed.
    with dmioctl.suspended(pv, nolockfs=True, timeout=SUSPEND_S):
        dmioctl.load(pv, table)


@contextmanager
def _swapped(names: Names, i: int, kind: str,
             table: Callable[[list[Target]], list[Target]]) -> Iterator[str]:
    """PV i maps `table(its linear table)` for the block; the linear table is back however
    the block ends. Yields the PV's dm name."""
    pv = names.pv(i)
    if not any(d.name == pv and d.uuid == names.pv_uuid(i) for d in dm.list_devices()):
        raise HvlabError(f"lab {names.lab!r} has no PV {pv} (is it up?)")
    _require_target(kind)
    linear = dmioctl.table(pv)
    _swap(pv, table(linear))
    try:
        yield pv
    finally:
        _swap(pv, linear)


@contextmanager
def fault(names: Names, i: int, kind: str, args: str) -> Iterator[str]:
    """PV i maps through a `kind` target (its args after the size) for the block."""
    with _swapped(names, i, kind,
                  lambda linear: [Target(0, sum(t.length for t in linear), kind, args)]) as pv:
        yield pv


@contextmanager
def lv_fails(names: Names, lv: str) -> Iterator[str]:
    """Every I/O to the extents of `lv` (hidden, linear, one segment: e.g. `pool_tmeta`,
    the pool's metadata) fails with EIO, as a disk failing under it would; the rest of its PV,
    the pool's data and LVM's own metadata with it, maps as before."""
    rows = names.lvm().report("lvs", "lv_size,seg_count", "-a", f"{names.vg}/{lv}")
    if len(rows) != 1 or int(rows[0]["seg_count"]) != 1:
        raise HvlabError(f"LV {lv} of lab {names.lab!r} is not one linear segment: {rows}")
    at = locate(names, lv, 0)
    first, n = at.offset // SECTOR, int(rows[0]["lv_size"]) // SECTOR

    def table(linear: list[Target]) -> list[Target]:
        if len(linear) != 1 or linear[0].type != "linear":
            raise HvlabError(f"PV {names.pv(at.pv)} is not a plain linear map: {linear}")
        lo, base = linear[0].params.split()
        end, at0 = linear[0].length, int(base)
        parts = [Target(0, first, "linear", f"{lo} {at0}"), Target(first, n, "error", ""),
                 Target(first + n, end - first - n, "linear", f"{lo} {at0 + first + n}")]
        return [t for t in parts if t.length > 0]  # the LV at either end of the PV

    with _swapped(names, at.pv, "error", table) as pv:
        yield pv


def _below(names: Names, i: int) -> str:
    return dm.target_of(names.pv(i))  # major:minor of the loop under PV i


@contextmanager
def delayed(names: Names, i: int, *, read_ms: int = 0, write_ms: int = 0) -> Iterator[str]:
    """Every read (write) of PV i completes read_ms (write_ms) late."""
    lo = _below(names, i)
    with fault(names, i, "delay", f"{lo} 0 {read_ms} {lo} 0 {write_ms}") as pv:
        yield pv


@contextmanager
def bad_blocks(names: Names, i: int, blocks: Iterable[int]) -> Iterator[str]:
    """Reads of these 4 KiB blocks of PV i fail with EIO, like bad sectors (dm-dust); a write
    to one of them succeeds and heals it, as a disk remaps a sector."""
    with fault(names, i, "dust", f"{_below(names, i)} 0 {DUST_BLOCK}") as pv:
        for b in blocks:
            dm.message(pv, "addbadblock", str(b))
        dm.message(pv, "enable")
        yield pv


@dataclass(frozen=True)
class Place:
    pv: int  # index of the lab's PV
    offset: int  # bytes from the start of that PV


def locate(names: Names, lv: str, offset: int) -> Place:
    """Where byte `offset` of a (hidden, linear) LV such as the pool's data LV lies on the
    lab's PVs: from LVM's segment map, the PV's first extent and the extent size."""
    lvm = names.lvm()
    rows = lvm.report("lvs", "seg_start,seg_size,seg_pe_ranges", "-a", "--segments",
                      f"{names.vg}/{lv}")
    pe_start = {r["pv_name"]: int(r["pe_start"])
                for r in lvm.report("pvs", "pv_name,pe_start", *pv_devices(names))}
    extent = int(lvm.report("vgs", "vg_extent_size", names.vg)[0]["vg_extent_size"])
    for r in rows:
        start, size = int(r["seg_start"]), int(r["seg_size"])
        if start <= offset < start + size:
            dev, _, pes = r["seg_pe_ranges"].partition(":")
            first_pe = int(pes.split("-")[0])
            i = next(k for k in range(len(pe_start)) if dev.endswith(f"/{names.pv(k)}"))
            return Place(i, pe_start[dev] + first_pe * extent + offset - start)
    raise HvlabError(f"offset {offset} lies outside LV {lv}")
