"""Issue 9 on real devices: a thin pool whose metadata is (nearly) full refuses the backup
before anything is made, and a backup destination that fills during step 13's read fails the
run cleanly. One lab for both (CI budget); every stage ends with the lab as it was."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from hvlab.backup import restore as rst
from hvlab.flow import engine, preflight
from hvlab.guest.client import GuestClient
from hvlab.lab import guests, runs
from hvlab.sys import dm
from hvlab.sys.run import run
from hvlab.sys.uevents import wait_node
from hvlab_fixtures.plugin import LabHandle, one_vm_lab

pytestmark = pytest.mark.integration

# 2 GiB of backing: enough pool chunks (64 KiB) to fill LVM's 4 MiB of pool metadata with
# mappings of our own, cheaply (see fill_metadata).
LAB = one_vm_lab(backing="2G")
CHUNK = 64 << 10
FILL_CHUNKS = 20000  # ~90 metadata blocks of mappings; 80 MiB actually written
STRIDE = 128  # chunks: one write per stride unshares every leaf (~225 mappings) of a snapshot


def _cli(h: LabHandle, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hvlab.cli", "backup", "vm01", "-n",
                           h.defn.name, "--no-fingerprints", *args],
                          capture_output=True, text=True, timeout=600, env=os.environ)


def _pool(h: LabHandle) -> preflight.Pool:
    return preflight.pool_of(h.names.lvm().lvs(h.names.vg), h.names.vg, h.names.pool)


def _commits(client: GuestClient, since: int, seconds: float = 10.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if client.status()["committed_txid"] > since:
            return True
        time.sleep(0.2)
    return False


def _write_every(dev: str, chunks: range, fill: bytes) -> None:
    fd = os.open(dev, os.O_WRONLY)
    try:
        block = fill * 4096
        for i in chunks:
            os.pwrite(fd, block, i * CHUNK)
        os.fsync(fd)
    finally:
        os.close(fd)


def fill_metadata(h: LabHandle, target: float) -> list[str]:
    """Genuinely fill the pool's metadata to `target` percent: a thin LV mapping FILL_CHUNKS
    chunks, then thin snapshots of it, each made to copy every leaf of its mapping tree by
    one 4 KiB write per STRIDE chunks (~9 % of the metadata each).
    LVM makes no thin volume once a small pool's metadata is 75 % used (lvm2's
    _pool_metadata_min_threshold), so the snapshots the last stretch needs are made before
    that. Returns the LVs made (the test removes them)."""
    lvm = h.names.lvm()
    vg = h.names.vg
    made = ["zfill"]
    lvm("lvcreate", "-q", "-V", f"{FILL_CHUNKS * CHUNK}b", "-T", f"{vg}/{h.names.pool}",
        "-n", "zfill")
    wait_node(h.names.lv_path("zfill"))
    _write_every(h.names.lv_path("zfill"), range(FILL_CHUNKS), b"f")
    pending: list[tuple[str, range]] = []  # quarters of the snapshots made, not yet written
    while (percent := _pool(h).metadata_percent) < target:
        if not pending:
            assert percent < 75 and len(made) < 30, f"metadata only at {percent}%"
            n = 1 if percent < 55 else 4  # near the end: 4 snapshots, written by quarters
            for _ in range(n):
                snap = f"zfill{len(made)}"
                lvm("lvcreate", "-q", "-s", "-kn", "-n", snap, f"{vg}/zfill")
                made.append(snap)
                wait_node(h.names.lv_path(snap))
                pending += [(snap, range(q * FILL_CHUNKS // n, (q + 1) * FILL_CHUNKS // n,
                                         STRIDE)) for q in range(n)]
        snap, part = pending.pop(0)
        _write_every(h.names.lv_path(snap), part, b"s")
    return made


def _refused_before_anything(h: LabHandle, client: GuestClient, pre: set[str],
                             res: subprocess.CompletedProcess[str], limit: int) -> float:
    """The refusal: one line naming the pool, its figure and the limit; exit 2; no LV, run
    record or backup folder made; the guest untouched and committing. Returns the figure."""
    err = res.stderr.strip()
    assert res.returncode == 2 and "\n" not in err, res.stdout + res.stderr
    m = re.search(rf"thin pool {h.names.vg}/pool metadata is (\d+\.\d\d)% used, at or above "
                  rf"the limit of {limit}% \(--metadata-limit\)", err)
    assert m, err
    assert "Traceback" not in res.stdout + res.stderr
    assert h.lv_names() == pre, "the refusal made or removed an LV"
    assert runs.all_runs(h.names) == [], "the refusal left a run record"
    assert not h.names.backups_dir.exists() or not any(h.names.backups_dir.iterdir())
    assert h.controller_maps_base("vm01", "disk0")
    st = client.status()
    assert not st["frozen"] and _commits(client, st["committed_txid"])
    return float(m.group(1))


def test_pool_without_room_refuses_and_a_full_destination_fails_cleanly(
        lab_factory: Callable[..., LabHandle], tmp_path: Path) -> None:
    h = lab_factory(LAB, start_guests=True)
    client = GuestClient(guests.socket_path(h.names, "vm01"))
    client.workload(ops_per_s=50)
    pre = h.lv_names()

    # 1a. A limit below the pool's real metadata use: refused, one line, nothing made.
    pool = _pool(h)
    assert 2 <= pool.metadata_percent < 50 and not pool.health, pool
    limit = int(pool.metadata_percent) - 1
    res = _cli(h, "--metadata-limit", str(limit))
    assert _refused_before_anything(h, client, pre, res, limit) > limit

    # 1b. The metadata genuinely nearly full: the default limit (80 %) refuses.
    t = time.monotonic()
    fillers = fill_metadata(h, target=82.0)
    filled = _pool(h)
    print(f"metadata {pool.metadata_percent}% -> {filled.metadata_percent}% with "
          f"{len(fillers)} LVs in {time.monotonic() - t:.1f} s")
    res = _cli(h)
    assert _refused_before_anything(h, client, pre | set(fillers), res, 80) >= 80
    h.names.lvm()("lvremove", "-q", "-y", *[f"{h.names.vg}/{lv}" for lv in fillers])
    assert h.lv_names() == pre and _pool(h).metadata_percent < 50

    # 2. The destination fills during step 13's read: 12 MiB of data on the live disk (its
    # image then holds ~25-30 MiB, ext4's journal and the ledger included), a 64 MiB ext4 (no
    # root reserve) with 6 MiB free left as the destination.
    data = h.mountpoint("vm01", "disk0") / "ballast.bin"
    data.write_bytes(os.urandom(12 << 20))
    os.sync()
    image, mnt = tmp_path / "dest.img", tmp_path / "dest"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)])
    mnt.mkdir()
    run(["mount", "-o", "loop", str(image), str(mnt)])
    try:
        st = os.statvfs(mnt)
        ballast = mnt / "ballast"
        ballast.write_bytes(b"b" * (st.f_bavail * st.f_frsize - (6 << 20)))
        dest = mnt / "b1"
        acked = client.status()["committed_txid"]
        res = _cli(h, "--dest", str(dest))
        err = res.stderr.strip()
        assert res.returncode == 1 and "\n" not in err, res.stdout + res.stderr
        assert "ENOSPC" in err and str(dest) in err and "Traceback" not in res.stderr, err
        m = re.search(r"while writing vm01_disk0.img after reading (\d+\.\d) of its "
                      r"(\d+\.\d) MiB mapped; partial image removed", err)
        assert m and 0 < float(m.group(1)) < float(m.group(2)), err  # mid-way through S
        (failed,) = runs.all_runs(h.names)
        assert failed.state == "failed" and failed.last_step == 12, failed
        # A failed run keeps nothing at the destination: its folder (made by the run and
        # marked as its own) goes with the partial image in it.
        assert not dest.exists() and sorted(p.name for p in mnt.iterdir()) == [
            "ballast", "lost+found"]
        assert any("removed partial backup" in n for n in failed.unwound or []), failed.unwound
        # The unwind completed: no C, A or S, the controller on the live LV, nothing held.
        assert h.lv_names() == pre and h.controller_maps_base("vm01", "disk0")
        assert not any(d.suspended for d in dm.list_devices()
                       if d.name == h.names.ctl("vm01", "disk0"))
        st2 = client.status()
        assert not st2["frozen"] and st2["committed_txid"] >= acked
        assert _commits(client, st2["committed_txid"])
        kept = st2["committed_txid"]

        # Space freed, the next backup to the same destination finishes and verifies; its
        # image holds every transaction the guest had acknowledged after the failure.
        ballast.unlink()
        os.sync()  # ext4 reuses freed blocks once the freeing transaction commits
        done = engine.start(h.defn.name, ["vm01"], dest=dest, fingerprints=False)
        assert done.state == "done"
        report = rst.verify(h.defn.name, str(dest))
        assert report["ok"], report
        assert report["vms"][0]["ledger"]["last_txid"] >= kept
        assert h.lv_names() == pre and h.controller_maps_base("vm01", "disk0")
    finally:
        run(["umount", str(mnt)], check=False)
