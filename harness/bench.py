"""`make bench`: measured side by side in one run, on one lab, on the same snapshot.

- reading a thin snapshot: our mapped-blocks reader vs `dd` of the whole device
- the cost of a thin snapshot (lvcreate -s) and of a controller redirect (the freeze window)
- the window's floor: suspend N thin devices, create_snap, resume, by ioctl vs dmsetup
Writes bench-results/bench.json and bench-results/bench.txt.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from hvlab import bench_floor
from hvlab.backup.reader import read_image
from hvlab.backup.thinmeta import metadata_snap
from hvlab.lab import definition, substrate
from hvlab.lab.paths import Names
from hvlab.sys import dm
from hvlab.sys.lvm import Lvm
from hvlab.sys.run import run

LAB = {"lab": {"name": "bench", "backing_size": "2G"},
       "vm": [{"name": "vm01", "profile": "none",
               "disk": [{"name": "disk0", "size": "1G", "fs": "ext4"}]}]}
REPEAT = 3


def _drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    _drop_caches()
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def _ratio(speedup: float) -> str:
    return f"{speedup:.1f}x faster" if speedup >= 1 else f"{1 / speedup:.1f}x slower"


def main() -> int:
    out_dir = Path("bench-results")
    out_dir.mkdir(exist_ok=True)
    os.environ.setdefault("HVLAB_HOME", "/var/tmp/hvlab-bench")
    defn = definition.parse(LAB)
    names = Names(defn.name)
    substrate.down(defn.name, missing_ok=True)
    substrate.up(defn, start_guests=False)
    results: dict[str, Any] = {"kernel": os.uname().release, "repeat": REPEAT}
    try:
        mnt = names.mountpoint("vm01", "disk0")
        # 96 MiB of data in a 1 GiB virtual disk: a typical sparse VM disk.
        for i in range(12):
            (mnt / f"f{i}.bin").write_bytes(os.urandom(8 << 20))
        os.sync()
        lvm = Lvm(names.lvm_dir)
        snaps: list[float] = []
        for i in range(REPEAT):
            t = time.perf_counter()
            lvm("lvcreate", "-q", "-s", "-kn", "-n", f"bs{i}", f"{names.vg}/vm01_disk0",
                "--addtag", names.tag)
            snaps.append(time.perf_counter() - t)
        snap = names.lv_path("bs0")
        rows = {r["lv_name"]: r for r in lvm.lvs(names.vg)}
        size = int(rows["bs0"]["lv_size"])
        ours: list[float] = []
        dds: list[float] = []
        dd_sums: list[float] = []
        read_bytes = 0
        for i in range(REPEAT):
            img = out_dir / f"ours{i}.img"
            img.unlink(missing_ok=True)

            def ours_read(img: Path = img) -> dict[str, object]:
                with metadata_snap(names) as ms:
                    return read_image(snap, ms.mapping(int(rows["bs0"]["thin_id"])), size, img)

            secs, info = _timed(ours_read)
            ours.append(secs)
            read_bytes = int(str(info["bytes_read"]))
            img.unlink()
            ddimg = out_dir / f"dd{i}.img"
            dd_argv = ["dd", f"if={snap}", f"of={ddimg}", "bs=4M", "conv=sparse", "status=none"]
            secs, _ = _timed(partial(run, dd_argv, timeout=900))
            dds.append(secs)
            # Ours also yields the image's sha256: the like-for-like baseline is dd + sha256sum.
            t = time.perf_counter()
            run(["sha256sum", str(ddimg)], timeout=900)
            dd_sums.append(secs + time.perf_counter() - t)
            ddimg.unlink()
        redirects: list[float] = []
        ctl = names.ctl("vm01", "disk0")
        base = names.lv_path("vm01_disk0")
        for _ in range(REPEAT):
            t = time.perf_counter()
            for target in (names.lv_path("bs1"), base):
                with dm.suspended(ctl):
                    dm.reload_linear(ctl, target)
            redirects.append((time.perf_counter() - t) / 2)
        med = statistics.median
        results["read"] = {
            "virtual_size": size, "mapped_bytes_read": read_bytes,
            "ours_s": ours, "dd_s": dds, "ours_median_s": med(ours), "dd_median_s": med(dds),
            "dd_sha256sum_s": dd_sums, "dd_sha256sum_median_s": med(dd_sums),
            "speedup_vs_dd": med(dds) / med(ours),
            "speedup_vs_dd_sha256sum": med(dd_sums) / med(ours),
            "ours_MiB_per_s_of_mapped": read_bytes / med(ours) / (1 << 20),
        }
        results["lvcreate_snapshot_s"] = {"runs": snaps, "median": med(snaps)}
        results["controller_redirect_s"] = {"runs": redirects, "median": med(redirects)}
    finally:
        substrate.down(defn.name, missing_ok=True)
    # The freeze window's floor at kernel speed vs dmsetup execs (issue 10): bench_floor.py.
    results["snapshot_floor"] = bench_floor.measure()
    (out_dir / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    table = Table(title=f"hvlab bench (kernel {results['kernel']}, median of {REPEAT})")
    for col in ("what", "ours", "baseline", "ratio"):
        table.add_column(col)
    r = results["read"]
    table.add_row(f"read thin snapshot ({r['virtual_size'] >> 20} MiB virtual, "
                  f"{r['mapped_bytes_read'] >> 20} MiB mapped)",
                  f"{r['ours_median_s']:.2f} s (mapped blocks)",
                  f"{r['dd_median_s']:.2f} s (dd, whole device)",
                  _ratio(r["speedup_vs_dd"]))
    table.add_row("read + sha256 of the image (ours computes it while copying)",
                  f"{r['ours_median_s']:.2f} s",
                  f"{r['dd_sha256sum_median_s']:.2f} s (dd, then sha256sum)",
                  _ratio(r["speedup_vs_dd_sha256sum"]))
    table.add_row("thin snapshot (lvcreate -s)",
                  f"{results['lvcreate_snapshot_s']['median']:.2f} s", "", "")
    table.add_row("controller redirect (suspend/reload/resume)",
                  f"{results['controller_redirect_s']['median'] * 1000:.0f} ms", "", "")
    for row in bench_floor.rows(results["snapshot_floor"]):
        table.add_row(*row)
    console = Console(record=True, width=120)
    console.print(table)
    (out_dir / "bench.txt").write_text(console.export_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
