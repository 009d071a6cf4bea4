"""Steps 11-14, once for the whole job: the external snapshot set, the merges, the read."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hvlab.backup import reader, thinmeta
from hvlab.errors import HvlabError
from hvlab.flow import dest, faults
from hvlab.flow.actions import action, art
from hvlab.flow.context import Ctx, lv_name, thin_ids
from hvlab.lab import live
from hvlab.lab.record import Artifact, Disk
from hvlab.sys.uevents import wait_node


class DestinationFull(HvlabError):
    """The backup destination ran out of space (or quota) while the run wrote to it."""


@contextmanager
def writing_to(where: Path, what: str, done: Callable[[], str] = str) -> Iterator[None]:
    """ENOSPC or EDQUOT while writing `what` into the backup directory -> one line naming
    the destination; what was written is removed by the writer, the run's folder by the
    unwind."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        try:
            st = os.statvfs(where)
            size = f" (a filesystem of {st.f_blocks * st.f_frsize / 2**20:.1f} MiB)"
        except OSError:
            size = ""
        raise DestinationFull(f"no space left on the backup destination {where}{size}: "
                              f"{errno.errorcode[exc.errno]} ({exc.strerror}) while writing "
                              f"{what}{done()}") from None


@action(11)
def external_snapshot(ctx: Ctx, _: None) -> dict[str, Any]:
    made = []
    start = time.time()
    for v, d, disk in ctx.disks():
        pairs: tuple[tuple[Artifact, str | None], ...] = (("S_B", disk.B), ("S_A", disk.A))
        for a, origin in pairs:
            name = lv_name(v, d, a, ctx.run.id)
            setattr(disk, a, name)
            ctx.save()
            if not ctx.exists(name):
                ctx.snapshot(origin or "", name, a, v, d, read_only=True)
            else:  # made by a killed step 11; a kill inside lvcreate may leave it inactive
                ctx.lvm("lvchange", "-q", "-ay", ctx.vg_lv(name))
                wait_node(ctx.lv_dev(name))
            disk.set_exists(a, True)
            made.append(art(v, d, a, name))
            faults.point("s11-one")
    ctx.run.snapshot_set = {"start": start, "end": time.time(),
                            "members": [m["lv"] for m in made]}
    ctx.save()
    return {"made": made}


@action(12)
def remove_auto_recovery(ctx: Ctx, _: None) -> dict[str, Any]:
    removed = []
    for v, d, disk in ctx.disks():
        if disk.A_exists and disk.A:
            ctx.remove_lv(disk.A)
            disk.A_exists = False
            removed.append(art(v, d, "A", disk.A))
            ctx.save()
            faults.point("s12-one")
    return {"removed": removed}


@action(13)
def read(ctx: Ctx, _: None) -> dict[str, Any]:
    where = Path(ctx.run.dest)
    if not dest.owns(where, ctx.run.id):
        raise HvlabError(f"backup directory {where} is missing or no longer this run's "
                         f"(no {dest.MARK} naming {ctx.run.id})")
    members = [(v, d, disk, disk.S_B or "", disk.S_A or "") for v, d, disk in ctx.disks()]
    ids = thin_ids(ctx, [lv for *_, sb, sa in members for lv in (sb, sa)])
    with thinmeta.metadata_snap(ctx.names) as snap:
        faults.point("s13-metadata")
        maps = {lv: snap.mapping(ids[lv]) for *_, sb, sa in members for lv in (sb, sa)}
        ctx.last_dump = snap.dump()
        deltas = {f"{v}/{d}": snap.delta(ids[sb], ids[sa]) for v, d, _, sb, sa in members}
    total = sum(maps[sa].mapped_blocks * maps[sa].block_bytes for *_, sa in members)
    prog = ctx.progress
    task = prog.add_task("step 13: reading S", total=total) if prog is not None else None

    copied = [0]

    def advance(n: int) -> None:
        copied[0] += n
        faults.point("s13-reading")  # part of an image written, the rest still to read
        if prog is not None:
            prog.update(task, advance=n)

    images: dict[str, dict[str, Any]] = {}
    for v, d, disk, sb, sa in members:
        m = maps[sa]
        file = where / f"{v}_{d}.img"
        file.unlink(missing_ok=True)  # a resumed step 13 starts its images over
        dev = ctx.lv_dev(sa)
        # The LV's own size (rounded up to whole extents; the filesystem spans all of it).
        first, mapped = copied[0], m.mapped_blocks * m.block_bytes

        def so_far(first: int = first, mapped: int = mapped) -> str:
            return (f" after reading {(copied[0] - first) / 2**20:.1f} of its "
                    f"{mapped / 2**20:.1f} MiB mapped; partial image removed")

        with writing_to(where, file.name, so_far):
            res = reader.read_image(dev, m, _dev_size(dev), file, advance)
        bs = m.block_bytes
        images[f"{v}/{d}"] = {
            "file": file.name, **res, "vm": v, "disk": d, "fs": disk.fs, "source": sa,
            "base_at_t0": {"lv": sb, "mapped_blocks": maps[sb].mapped_blocks},
            "auto_recovery_ranges": [
                {"kind": k, "offset": b * bs, "length": n * bs}
                for k in ("different", "right_only", "left_only")
                for b, n in deltas[f"{v}/{d}"][k]],
        }
        faults.point("s13-image")
    ctx.run.images = images
    ctx.save()
    return {"images": {k: {"sha256": i["sha256"], "bytes_read": i["bytes_read"],
                           "auto_recovery_bytes": sum(r["length"] for r in
                                                      i["auto_recovery_ranges"])}
                       for k, i in images.items()}}


@action(14)
def merge(ctx: Ctx, _: None) -> dict[str, Any]:
    removed = []
    external: tuple[Artifact, ...] = ("S_B", "S_A")
    for v, d, disk in ctx.disks():
        for a in external:
            lv = disk.lv(a)
            if lv and disk.exists(a):
                ctx.remove_lv(lv)
                disk.set_exists(a, False)
                removed.append(art(v, d, a, lv))
                ctx.save()
                faults.point("s14-one")
    merged = []
    for v, d, disk in ctx.disks():
        promote(ctx, v, d, disk)  # idempotent: a resumed step 14 finishes a half-done merge
        merged.append({**art(v, d, "C", disk.C), "into": disk.B})
    return {"removed": removed, "merged": merged}


def promote(ctx: Ctx, vm: str, d: str, disk: Disk) -> None:
    """Merge C into B: B's LV goes, C takes its name and the live-disk role. The controller
    maps C's dm device, which LVM renames in place: the guest sees nothing. Every part is
    skipped when already done, so a run killed half-way through finishes it."""
    if disk.C and ctx.exists(disk.C):
        ctx.remove_lv(disk.B)
        faults.point("s14-base-removed")
        ctx.lvm("lvrename", "-q", ctx.names.vg, disk.C, disk.B)
        faults.point("s14-renamed")
    live.record(ctx.names, vm, d, disk.B)  # the renamed C is the disk now
    disk.C_exists = False
    ctx.save()
    retag_base(ctx, disk.B)
    disk.merged = True
    ctx.save()


def retag_base(ctx: Ctx, lv: str) -> None:
    """A renamed C still carries its checkpoint tags: make it the live disk (idempotent)."""
    tags = ctx.lvs()[lv].tags
    stale = sorted(t for t in tags if t == "role_checkpoint" or t.startswith("run_"))
    if stale or "role_base" not in tags:
        ctx.lvm("lvchange", "-q", *[x for t in stale for x in ("--deltag", t)],
                "--addtag", "role_base", ctx.vg_lv(lv))


def _dev_size(dev: str) -> int:
    fd = os.open(dev, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
