"""The freeze window's floor (issue 10): what it costs to suspend N thin devices together, have
the pool snapshot each (`create_snap`), and resume them all - through dmioctl from this one
process, side by side with the same calls through the `dmsetup` command (one exec per call).

A scratch thin pool of its own (sparse files -> loops -> thin-pool -> N thin devices with some
data mapped), owned by name prefix and uuid, removed afterwards and the removal checked.
`make bench` calls measure(); `python -m hvlab.bench.floor` runs it alone.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hvlab.errors import LeakError
from hvlab.lab import paths
from hvlab.sys import dmioctl, loop
from hvlab.sys.dmioctl import Target
from hvlab.sys.run import run

COUNTS = (1, 2, 4, 8)
REPEAT = 5
WINDOW_LIMIT_S = 10.0  # the guest's freeze watchdog (VSS_E_FLUSH_WRITES_TIMEOUT)
THIN_SECTORS = 128 << 11  # 128 MiB virtual per thin device
WRITTEN = 4 << 20  # mapped per thin device before the measurement
BLOCK_SECTORS = 128  # 64 KiB pool blocks
SNAP_BASE = 1000  # snapshot thin ids: SNAP_BASE + i, origin ids 1..N


def _majmin(dev: str) -> str:
    rdev = os.stat(dev).st_rdev
    return f"{os.major(rdev)}:{os.minor(rdev)}"


@dataclass(frozen=True)
class Scratch:
    pool: str  # dm name of the thin-pool device
    thins: list[str]  # dm names of the thin devices, thin id i + 1 for thins[i]


@contextmanager
def scratch_pool(work: Path, count: int) -> Iterator[Scratch]:
    """A thin pool with `count` thin devices (ids 1..count), each with WRITTEN bytes mapped.
    Everything is named hvlab_floor<pid>_* and removed, in reverse, however the block ends."""
    prefix = f"hvlab_floor{os.getpid()}_"
    uuid = f"HVLAB-floor{os.getpid()}-"
    work.mkdir(parents=True, exist_ok=True)
    with ExitStack() as undo:  # undone last-in first-out: snapshots, thins, pool, loops, files
        devs: dict[str, str] = {}
        for part, size in (("meta", 16 << 20), ("data", 1 << 30)):
            f = work / f"{prefix}{part}.img"
            with open(f, "wb") as fh:  # sparse, zeros: the pool formats fresh metadata
                fh.truncate(size)
            undo.callback(f.unlink, missing_ok=True)
            devs[part] = loop.attach(f)
            undo.callback(loop.detach, devs[part])
        pool = f"{prefix}pool"
        dmioctl.create(pool, [Target(0, (1 << 30) >> 9, "thin-pool",
                                     f"{_majmin(devs['meta'])} {_majmin(devs['data'])} "
                                     f"{BLOCK_SECTORS} 0 1 skip_block_zeroing")],
                       uuid=f"{uuid}pool")
        undo.callback(dmioctl.remove, pool)
        thins: list[str] = []
        block = os.urandom(WRITTEN)
        for i in range(count):
            dmioctl.message(pool, f"create_thin {i + 1}")
            undo.callback(dmioctl.message, pool, f"delete {i + 1}")
            name = f"{prefix}thin{i + 1}"
            dmioctl.create(name, [Target(0, THIN_SECTORS, "thin",
                                         f"{_majmin(f'/dev/mapper/{pool}')} {i + 1}")],
                           uuid=f"{uuid}thin{i + 1}")
            undo.callback(dmioctl.remove, name)
            fd = os.open(f"/dev/mapper/{name}", os.O_WRONLY)
            try:
                os.pwrite(fd, block, 0)
                os.fsync(fd)
            finally:
                os.close(fd)
            thins.append(name)
        undo.callback(undo_snaps, pool)  # whatever a failed round left
        yield Scratch(pool, thins)
    left = [n.name for n in dmioctl.list_names() if n.name.startswith(prefix)] + [
        lo.name for lo in loop.loops_under(work) if Path(lo.back_file).name.startswith(prefix)]
    if left:
        raise LeakError(f"scratch pool left {', '.join(left)}")
    with suppress(OSError):
        work.rmdir()  # when empty


def undo_snaps(pool: str) -> None:
    """Delete the snapshot ids a failed round may have left (the ids not there fail: fine)."""
    for i in range(max(COUNTS)):
        with suppress(dmioctl.DmError):
            dmioctl.message(pool, f"delete {SNAP_BASE + i}")


# ------------------------------------------------------------------------ the three ways
def by_ioctl(s: Scratch, n: int, *, timeout: float | None) -> dict[str, float]:
    """Suspend all, create_snap each, resume all: dmioctl, this process. Phases in seconds."""
    origins = s.thins[:n]
    t0 = time.perf_counter()
    dmioctl.suspend_all(origins, nolockfs=True, timeout=timeout)
    t1 = time.perf_counter()
    for i in range(n):
        dmioctl.message(s.pool, f"create_snap {SNAP_BASE + i} {i + 1}")
    t2 = time.perf_counter()
    for name in origins:
        dmioctl.resume(name)
    t3 = time.perf_counter()
    return {"total": t3 - t0, "suspend": t1 - t0, "create_snap": t2 - t1, "resume": t3 - t2}


def by_dmsetup(s: Scratch, n: int) -> dict[str, float]:
    """The same through the dmsetup command, one exec per call, as the flow's dm.py does."""
    origins = s.thins[:n]
    t0 = time.perf_counter()
    for name in origins:
        run(["dmsetup", "suspend", "--nolockfs", "--noudevsync", name])
    t1 = time.perf_counter()
    for i in range(n):
        run(["dmsetup", "message", s.pool, "0", f"create_snap {SNAP_BASE + i} {i + 1}"])
    t2 = time.perf_counter()
    for name in origins:
        run(["dmsetup", "resume", "--noudevsync", name])
    t3 = time.perf_counter()
    return {"total": t3 - t0, "suspend": t1 - t0, "create_snap": t2 - t1, "resume": t3 - t2}


WAYS: dict[str, Callable[[Scratch, int], dict[str, float]]] = {
    "ioctl": lambda s, n: by_ioctl(s, n, timeout=None),
    "ioctl_bounded": lambda s, n: by_ioctl(s, n, timeout=WINDOW_LIMIT_S),
    "dmsetup": by_dmsetup,
}


def measure(work: Path | None = None, *, counts: tuple[int, ...] = COUNTS,
            repeat: int = REPEAT) -> dict[str, Any]:
    """{count: {way: {runs, median_s, phases_median_s}}} plus what it ran on. The ways take
    turns within each repeat; the snapshots are deleted between rounds (not timed)."""
    work = work or paths.home() / "bench-floor"
    out: dict[str, Any] = {"kernel": os.uname().release, "dm_ioctl": ".".join(
        map(str, dmioctl.version())), "repeat": repeat, "window_limit_s": WINDOW_LIMIT_S,
        "thin_mib": THIN_SECTORS >> 11, "mapped_mib": WRITTEN >> 20, "counts": {}}
    with scratch_pool(work, max(counts)) as s:
        for n in counts:
            runs: dict[str, list[dict[str, float]]] = {w: [] for w in WAYS}
            for _ in range(repeat):
                for way, fn in WAYS.items():
                    runs[way].append(fn(s, n))
                    for i in range(n):
                        dmioctl.message(s.pool, f"delete {SNAP_BASE + i}")
            med = statistics.median
            out["counts"][str(n)] = {
                way: {"runs_s": [r["total"] for r in rs],
                      "median_s": med(r["total"] for r in rs),
                      "phases_median_s": {p: med(r[p] for r in rs)
                                          for p in ("suspend", "create_snap", "resume")}}
                for way, rs in runs.items()}
    return out


def rows(res: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(what, ours, baseline, ratio) rows for bench's table: medians of suspend all,
    create_snap each, resume all."""
    out = []
    for n, ways in res["counts"].items():
        ours, bounded, base = (ways[w]["median_s"] for w in ("ioctl", "ioctl_bounded", "dmsetup"))
        out.append((f"window floor, {n} thin (limit {res['window_limit_s']:g} s)",
                    f"{ours * 1000:.1f} ms ioctl ({bounded * 1000:.1f} ms bounded)",
                    f"{base * 1000:.0f} ms (dmsetup execs)", f"{base / ours:.0f}x faster"))
    return out


def main() -> int:
    res = measure()
    print(json.dumps(res, indent=2))
    for r in rows(res):
        print(" | ".join(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
