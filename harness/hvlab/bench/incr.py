"""`make bench`, part 4: incrementals. Bytes an incremental read reads against the bytes that
changed since the reference, for 1% and 10% of the disk changed, and the cost of thin_delta.

A lab `benchi` without guests: one 1 GiB ext4 disk with 384 MiB of files. For each share: a
reference snapshot, then that share of the disk overwritten in place (1 MiB runs at random
places inside the files, O_DIRECT: what changed is what was written, plus the filesystem's own
metadata), then a snapshot of now; `thin_delta` between the two through a metadata snapshot
(timed), and `read_image` of the changed ranges, as step 13 of an incremental run does.
"""

from __future__ import annotations

import mmap
import os
import random
import time
from pathlib import Path
from typing import Any

from hvlab.backup import chain
from hvlab.backup.reader import read_image
from hvlab.backup.thinmeta import Mapping, metadata_snap
from hvlab.bench.flow import lab_up, say
from hvlab.bench.report import INCR_GOAL
from hvlab.lab import definition
from hvlab.lab.paths import Names
from hvlab.sys.lvm import Lvm

LAB = {"lab": {"name": "benchi", "backing_size": "2G"},
       "vm": [{"name": "vm01", "profile": "none",
               "disk": [{"name": "disk0", "size": "1G", "fs": "ext4"}]}]}
FILES, FILE_MIB = 12, 32
SHARES = (0.01, 0.10)
RUN = 1 << 20


def _snap(names: Names, lvm: Lvm, name: str) -> tuple[int, int]:
    lvm("lvcreate", "-q", "-s", "-kn", "-n", name, f"{names.vg}/vm01_disk0",
        "--addtag", names.tag)
    row = lvm.lvs(names.vg)[name]
    return row.thin_id or 0, row.size or 0


def _overwrite(mnt: Path, nbytes: int, rng: random.Random) -> int:
    """nbytes of the files overwritten in place, 1 MiB at a time, no place twice."""
    spots = rng.sample([(i, k) for i in range(FILES) for k in range(FILE_MIB)], nbytes // RUN)
    with mmap.mmap(-1, RUN) as buf:
        for i, k in spots:
            buf[:] = os.urandom(RUN)
            fd = os.open(mnt / f"f{i}.bin", os.O_WRONLY | os.O_DIRECT)
            try:
                os.pwrite(fd, buf, k * RUN)
            finally:
                os.close(fd)
    os.sync()
    return len(spots) * RUN


def measure(work: Path) -> dict[str, Any]:
    defn = definition.parse(LAB)
    rng = random.Random(11)
    points = []
    with lab_up(defn, start_guests=False) as names:
        say("bench: incrementals (1% and 10% changed) ...")
        mnt = names.mountpoint("vm01", "disk0")
        for i in range(FILES):
            (mnt / f"f{i}.bin").write_bytes(os.urandom(FILE_MIB << 20))
        os.sync()
        lvm = names.lvm()
        work.mkdir(parents=True, exist_ok=True)
        img = work / "bench-incr.img"
        try:
            for share in SHARES:
                ref_id, size = _snap(names, lvm, "benchref")
                written = _overwrite(mnt, int(size * share) // RUN * RUN, rng)
                now_id, _ = _snap(names, lvm, "benchnow")
                with metadata_snap(names) as ms:
                    t = time.perf_counter()
                    delta = ms.delta(ref_id, now_id, tool=True)
                    delta_s = time.perf_counter() - t
                    mapped = ms.mapping(now_id)
                read, gone = chain.changed(delta)
                m = Mapping(now_id, mapped.block_bytes, read, [])
                img.unlink(missing_ok=True)
                t = time.perf_counter()
                info = read_image(names.lv_path("benchnow"), m, size, img)
                read_s = time.perf_counter() - t
                img.unlink()
                got = int(str(info["bytes_read"]))
                points.append({
                    "share": share, "changed_bytes": written, "read_bytes": got,
                    "ratio": round(got / written, 4), "mapped_bytes":
                        mapped.mapped_blocks * mapped.block_bytes,
                    "block_bytes": mapped.block_bytes, "extents": len(read),
                    "thin_delta_s": round(delta_s, 4), "read_s": round(read_s, 4),
                    "discarded_bytes": sum(n for _, n in gone) * mapped.block_bytes})
                lvm("lvremove", "-q", "-y", f"{names.vg}/benchref", f"{names.vg}/benchnow")
        finally:
            img.unlink(missing_ok=True)
    return {"disk_bytes": 1 << 30, "files_bytes": FILES * FILE_MIB << 20, "points": points,
            "goal": INCR_GOAL}
