"""`make bench`, part 3: the full-backup reader against `dd`, the same work on the same
snapshot: read exactly its mapped extents (O_DIRECT both) and hash what was read (sha256).

A lab `benchr` without guests: one 1 GiB ext4 disk with 96 MiB of files, a thin snapshot of
it (the lab's tag: `down` removes it), its mapping from a metadata snapshot. Ours is
`read_image` as step 13 calls it (it also hashes the holes as zeros and writes the sparse
image); dd runs once per extent (`iflag=direct,skip_bytes,count_bytes`, 4 MiB reads) into one
`sha256sum`. Off-host (issue 11): the same extents read by the proxy over NBD on the veth
link (nbdkit in the lab's namespace, libnbd in the proxy's), writing the same image; the
link is set up once, its setup timed apart. They take turns; caches are dropped before each.
"""

from __future__ import annotations

import os
import subprocess
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

from hvlab.backup import offhost
from hvlab.backup.reader import read_image
from hvlab.backup.thinmeta import metadata_snap
from hvlab.bench.flow import lab_up, say
from hvlab.bench.report import offhost_summary, reader_summary
from hvlab.lab import definition

LAB = {"lab": {"name": "benchr", "backing_size": "2G"},
       "vm": [{"name": "vm01", "profile": "none",
               "disk": [{"name": "disk0", "size": "1G", "fs": "ext4"}]}]}
FILES = 12  # x 8 MiB of random data: a typical sparse VM disk


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def dd_extents(dev: str, extents: list[tuple[int, int]]) -> str:
    """sha256 (hex) of the bytes of `extents` ((offset, length) in bytes) read by dd."""
    sha = subprocess.Popen(["sha256sum"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert sha.stdin is not None
    try:
        for off, length in extents:
            subprocess.run(["dd", f"if={dev}", "bs=4M", f"skip={off}", f"count={length}",
                            "iflag=direct,skip_bytes,count_bytes", "status=none"],
                           stdout=sha.stdin, check=True, timeout=600)
    finally:
        out, _ = sha.communicate(timeout=600)  # closes its stdin: the end of the data
    if sha.returncode:
        raise RuntimeError(f"sha256sum exited {sha.returncode}")
    return out.decode().split()[0]


def measure(repeat: int, work: Path) -> dict[str, Any]:
    defn = definition.parse(LAB)
    with lab_up(defn, start_guests=False) as names:
        say("bench: reader vs dd ...")
        mnt = names.mountpoint("vm01", "disk0")
        for i in range(FILES):
            (mnt / f"f{i}.bin").write_bytes(os.urandom(8 << 20))
        os.sync()
        lvm = names.lvm()
        lvm("lvcreate", "-q", "-s", "-kn", "-n", "benchsnap", f"{names.vg}/vm01_disk0",
            "--addtag", names.tag)
        snap = names.lv_path("benchsnap")
        row = lvm.lvs(names.vg)["benchsnap"]
        size = row.size or 0
        with metadata_snap(names) as ms:
            m = ms.mapping(row.thin_id or 0)
        extents = [(first * m.block_bytes, n * m.block_bytes) for first, n in m.ranges]
        mapped = sum(n for _, n in extents)
        work.mkdir(parents=True, exist_ok=True)
        img = work / "bench-reader.img"
        ours: list[float] = []
        dd: list[float] = []
        off: list[float] = []
        nbd_bytes: list[int] = []
        job = [{"export": "disk0", "dev_id": m.dev_id, "block_bytes": m.block_bytes,
                "ranges": m.ranges, "size": size, "dest": str(img)}]
        t = time.perf_counter()
        try:
            with offhost.link(names, "bench", {"disk0": snap}) as proxy:
                setup = time.perf_counter() - t
                for _ in range(repeat):
                    img.unlink(missing_ok=True)
                    drop_caches()
                    t = time.perf_counter()
                    info = read_image(snap, m, size, img)
                    ours.append(time.perf_counter() - t)
                    img.unlink()
                    if int(str(info["bytes_read"])) != mapped:
                        raise RuntimeError(f"read_image read {info['bytes_read']} bytes, the "
                                           f"mapping has {mapped}")
                    drop_caches()
                    t = time.perf_counter()
                    dd_extents(snap, extents)
                    dd.append(time.perf_counter() - t)
                    drop_caches()
                    t = time.perf_counter()
                    _, moved = proxy.read(job, lambda _n: None)
                    off.append(time.perf_counter() - t)
                    img.unlink()
                    nbd_bytes.append(moved)
                link_bytes = proxy.link_bytes()
        finally:
            img.unlink(missing_ok=True)
            with suppress(OSError):
                work.rmdir()  # when empty
        lvm("lvremove", "-q", "-y", f"{names.vg}/benchsnap")
    return {"virtual_bytes": size, "mapped_bytes": mapped, "extents": len(extents),
            "block_bytes": m.block_bytes, "repeat": repeat, "ours_s": ours, "dd_s": dd,
            **reader_summary(mapped, ours, dd),
            "note": "ours also hashes the holes as zeros and writes the sparse image",
            "off_host": {"s": off, "setup_s": setup, "nbd_bytes": nbd_bytes,
                         "link_bytes": link_bytes, **offhost_summary(mapped, ours, off)}}
