"""Steps 11-14, once for the whole job: the external snapshot set, the merges, the read
(steps.ACTIONS names each step's function)."""

from __future__ import annotations

import errno
import os
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hvlab.backup import chain, offhost, reader, thinmeta
from hvlab.errors import HvlabError
from hvlab.flow import dest, faults
from hvlab.flow.actions import art
from hvlab.flow.context import Ctx, thin_ids
from hvlab.lab import links, live
from hvlab.lab.paths import REFERENCE_TAG, ROLE_TAG
from hvlab.lab.record import Artifact, Disk
from hvlab.sys import dirfd
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


def external_snapshot(ctx: Ctx, _: None) -> dict[str, Any]:
    """S_B and S_A of every disk in one lvm batch, checked by one report. Resumed after a
    kill, only what is missing is made, and what a kill inside lvcreate left inactive is
    activated (in the same batch)."""
    start = time.time()
    # Only a resumed step (names already recorded) can find members made: the first pass
    # needs no report before its batch.
    resumed = any(disk.S_B or disk.S_A for _, _, disk in ctx.disks())
    members: list[tuple[str, str, Artifact, str, str]] = []
    for v, d, disk in ctx.disks():
        pairs: tuple[tuple[Artifact, str | None], ...] = (("S_B", disk.B), ("S_A", disk.A))
        for a, origin in pairs:
            name = ctx.names.artifact_lv(v, d, a, ctx.run.id)
            setattr(disk, a, name)
            members.append((v, d, a, name, origin or ""))
    ctx.save()  # names first: an unwind finds them (and by tags) whatever happens next
    rows = ctx.view.lvs() if resumed else {}
    cmds = [ctx.snapshot_argv(origin, name, a, v, d, read_only=True)
            if name not in rows else ["lvchange", "-q", "-ay", ctx.vg_lv(name)]
            for v, d, a, name, origin in members
            if name not in rows or rows[name].major is None]
    ctx.view.batch(cmds, present=[m[3] for m in members])
    made = []
    for v, d, a, name, _origin in members:
        wait_node(ctx.lv_dev(name))
        ctx.vm(v).disks[d].set_exists(a, True)
        made.append(art(v, d, a, name))
    faults.point("s11-one")  # the whole set made (one batch), the record not yet saved
    ctx.run.snapshot_set = {"start": start, "end": time.time(),
                            "members": [m["lv"] for m in made]}
    ctx.save()
    return {"made": made}


def remove_auto_recovery(ctx: Ctx, _: None) -> dict[str, Any]:
    """Every A in one lvremove."""
    todo = [(v, d, disk) for v, d, disk in ctx.disks() if disk.A_exists and disk.A]
    ctx.view.remove_lvs([disk.A or "" for *_, disk in todo])
    removed = []
    for v, d, disk in todo:
        disk.A_exists = False
        removed.append(art(v, d, "A", disk.A))
    ctx.save()
    if todo:
        faults.point("s12-one")  # every A removed (one lvremove)
    return {"removed": removed}


def read(ctx: Ctx, _: None) -> dict[str, Any]:
    where = Path(ctx.run.dest)
    if not dest.owns(where, ctx.run.id):
        raise HvlabError(f"backup directory {where} is missing or no longer this run's "
                         f"(no {dest.MARK} naming {ctx.run.id})")
    # Per disk: B at T0 as the job sees it, and what the image is read from (2012 R2: S_B
    # and S_A; 2016: B and A; 2012: the rolled-back S_B for both).
    m = ctx.model
    members = [(v, d, disk, disk.lv(m.base) or "", disk.lv(m.source) or "")
               for v, d, disk in ctx.disks()]
    plans = _plans(ctx)
    refs = [p.reference for p in plans.values() if p.reference]
    ids = thin_ids(ctx, list(dict.fromkeys(
        [lv for *_, sb, sa in members for lv in (sb, sa)] + refs)))
    with thinmeta.metadata_snap(ctx.names) as snap:
        faults.point("s13-metadata")
        maps = {lv: snap.mapping(ids[lv]) for *_, sb, sa in members for lv in (sb, sa)}
        ctx.obs.last_dump = snap.dump()
        deltas = {f"{v}/{d}": snap.delta(ids[sb], ids[sa]) for v, d, _, sb, sa in members}
        since = {k: chain.changed(snap.delta(ids[p.reference], ids[sa]))
                 for k, p, sa in ((f"{v}/{d}", plans[f"{v}/{d}"], sa)
                                  for v, d, *_, sa in members) if p.reference}
    # What each disk's read is handed: every mapped block, or (incremental) those changed
    # since the reference.
    what = {sa: maps[sa] if k not in since else thinmeta.Mapping(
                ids[sa], maps[sa].block_bytes, since[k][0], [])
            for k, sa in ((f"{v}/{d}", sa) for v, d, *_, sa in members)}
    total = sum(what[sa].mapped_blocks * what[sa].block_bytes for *_, sa in members)
    prog = ctx.progress
    kind = ", incremental" if ctx.run.incremental else ""
    task = prog.add_task(f"step 13: reading S ({ctx.run.mode}{kind})", total=total) \
        if prog is not None else None

    copied = [0]

    def advance(n: int) -> None:
        copied[0] += n
        faults.point("s13-reading")  # part of an image written, the rest still to read
        if prog is not None:
            prog.update(task, advance=n)

    for v, d, *_others in members:
        dirfd.unlink(where / f"{v}_{d}.img", missing_ok=True)  # a resumed step 13 starts over
    if ctx.run.mode == "off-host":
        results = _read_off_host(ctx, members, what, where, advance)
    else:
        results = {f"{v}/{d}": _read_on_host(ctx, where, v, d, sa, what[sa], copied, advance)
                   for v, d, _, _, sa in members}
    images: dict[str, dict[str, Any]] = {}
    for v, d, disk, sb, sa in members:
        bs = maps[sa].block_bytes
        images[f"{v}/{d}"] = {
            "file": f"{v}_{d}.img", **results[f"{v}/{d}"], "vm": v, "disk": d, "fs": disk.fs,
            "source": sa, "base_at_t0": {"lv": sb, "mapped_blocks": maps[sb].mapped_blocks},
            "auto_recovery_ranges": [
                {"kind": k, "offset": b * bs, "length": n * bs}
                for k in ("different", "right_only", "left_only")
                for b, n in deltas[f"{v}/{d}"][k]],
            "mapped_bytes": maps[sa].mapped_blocks * bs,
            "chain": {**plans[f"{v}/{d}"].record(), **_delta_record(since.get(f"{v}/{d}"), bs)},
            **({"rolled_back": disk.reverted} if disk.reverted else {}),
        }
    ctx.run.images = images
    ctx.save()
    return {"mode": ctx.run.mode, **({"link": ctx.run.link} if ctx.run.link else {}),
            "images": {k: {"sha256": i["sha256"], "bytes_read": i["bytes_read"],
                           "auto_recovery_bytes": sum(r["length"] for r in
                                                      i["auto_recovery_ranges"])}
                       for k, i in images.items()}}


def _plans(ctx: Ctx) -> dict[str, chain.Plan]:
    """Per disk: full or incremental, and why (an inactive reference cannot be diffed)."""
    if not ctx.run.incremental:  # no report needed (one lvs costs ~0.7 s in the lab VM)
        return {f"{v}/{d}": chain.Plan("full", "not asked for an incremental")
                for v, d, _ in ctx.disks()}
    rows, chains = ctx.view.lvs(), chain.load(ctx.names)
    out = {}
    for v, d, disk in ctx.disks():
        size = _dev_size(ctx.lv_dev(disk.lv(ctx.model.source) or ""))  # the device's
        p = chain.decide(chains.get(f"{v}/{d}"), rows, size, ctx.run.incremental)
        why = ""
        if p.reference and rows[p.reference].major is None:
            why = f"the reference snapshot {p.reference} is not active"
        elif p.parent:
            why = _broken_link(ctx, v, d, Path(p.parent["dest"]))
        if why:
            p = chain.Plan("full", why, generation=secrets.token_hex(6))
        out[f"{v}/{d}"] = p
    return out


def _broken_link(ctx: Ctx, v: str, d: str, last: Path) -> str:
    """Why the chain ending at `last` could not be restored ('' when every link is there):
    extending it would make backups that cannot be restored."""
    from hvlab.backup import manifest

    try:
        links = chain.links_of(last, v, d, lambda p: manifest.locate(ctx.names, str(p))[1])
    except (HvlabError, ValueError) as exc:
        return f"the chain is broken: {exc}"
    gone = [str(p / str(rec["image"])) for p, rec in links if not (p / str(rec["image"])).exists()]
    return f"an earlier link of the chain is gone ({', '.join(gone)})" if gone else ""


def _delta_record(since: tuple[list[thinmeta.Range], list[thinmeta.Range]] | None,
                  bs: int) -> dict[str, Any]:
    if since is None:
        return {}
    read, gone = since
    return {"changed_ranges": [[b * bs, n * bs] for b, n in read],
            "discarded_ranges": [[b * bs, n * bs] for b, n in gone],
            "changed_bytes": sum(n for _, n in read) * bs,
            "discarded_bytes": sum(n for _, n in gone) * bs}


def _read_on_host(ctx: Ctx, where: Path, v: str, d: str, sa: str, m: thinmeta.Mapping,
                  copied: list[int], advance: Callable[[int], None]) -> dict[str, Any]:
    file = where / f"{v}_{d}.img"
    dev = ctx.lv_dev(sa)
    first, mapped = copied[0], m.mapped_blocks * m.block_bytes

    def so_far() -> str:
        return (f" after reading {(copied[0] - first) / 2**20:.1f} of its "
                f"{mapped / 2**20:.1f} MiB mapped; partial image removed")

    with writing_to(where, file.name, so_far):
        # The LV's own size (rounded up to whole extents; the filesystem spans all of it).
        res = reader.read_image(dev, m, _dev_size(dev), file, advance)
    faults.point("s13-image")
    return res


def _read_off_host(ctx: Ctx, members: list[tuple[str, str, Disk, str, str]],
                   maps: dict[str, thinmeta.Mapping], where: Path,
                   advance: Callable[[int], None]) -> dict[str, dict[str, Any]]:
    """The snapshot set over NBD to the proxy, which is handed each disk's allocation map
    (as Veeam's proxy is handed change-tracking data) and reads only those ranges."""
    link = ctx.run.link = offhost.describe(links.plan(ctx.names, ctx.run.id))
    ctx.save()  # said before it exists: explain and a reader of the record see the link
    exports = {f"{v}_{d}": ctx.lv_dev(sa) for v, d, _, _, sa in members}
    # The proxy writes into the folder this run holds, handed as its fd (not its path).
    held = dirfd.held_fd(where)
    into = Path(f"/proc/self/fd/{held}") if held is not None else where
    disks: list[dict[str, Any]] = [{"export": f"{v}_{d}", "dev_id": maps[sa].dev_id,
              "block_bytes": maps[sa].block_bytes, "ranges": maps[sa].ranges,
              "size": _dev_size(ctx.lv_dev(sa)), "dest": str(into / f"{v}_{d}.img")}
             for v, d, _, _, sa in members]
    with offhost.link(ctx.names, ctx.run.id, exports) as proxy:
        with writing_to(where, "the images"):
            got, nbd_bytes = proxy.read(disks, advance, () if held is None else (held,))
        link_bytes = proxy.link_bytes()
        server_bytes = proxy.server_bytes()  # nbdkit's own count, MiB to 2 decimals
    by_export = {img.pop("export"): img for img in got}
    extents = sum(len(x["ranges"]) for x in disks)
    link.update({"nbd_bytes": nbd_bytes, "link_bytes": link_bytes,
                 "server_read_bytes": server_bytes,
                         "mapped_bytes": sum(maps[sa].mapped_blocks * maps[sa].block_bytes
                                             for *_, sa in members),
                         "extents": extents})
    return {f"{v}/{d}": {**by_export[f"{v}_{d}"], "read_by": "proxy"}
            for v, d, *_others in members}


def merge(ctx: Ctx, _: None) -> dict[str, Any]:
    """Every S removed, then every C merged into its B: one lvremove for the S and the B
    (where C is there to take its place), one lvm batch of renames, one of tags."""
    removed = []
    # An incremental run keeps what the image was read from (2012 R2: S_A; 2016: A): it
    # becomes the disk's next reference point.
    kept_source = (ctx.model.source,) if ctx.run.incremental else ()
    dropped: tuple[Artifact, ...] = ("S_B", "S_A", "A")
    gone = [(v, d, a, lv) for v, d, disk in ctx.disks() for a in dropped
            if a not in kept_source and (lv := disk.lv(a)) and disk.exists(a)]
    todo = [(v, d, disk) for v, d, disk in ctx.disks()]
    kept = keep_references(ctx) if ctx.run.incremental else []
    faults.point("s14-references")
    merge_into(ctx, todo, also_remove=[lv for *_, lv in gone])
    for v, d, a, lv in gone:
        ctx.vm(v).disks[d].set_exists(a, False)
        removed.append(art(v, d, a, lv))
    ctx.save()
    merged = [{**art(v, d, "C", disk.C), "into": disk.B} for v, d, disk in todo]
    return {"removed": removed, "merged": merged, **({"references": kept} if kept else {})}


def keep_references(ctx: Ctx) -> list[dict[str, Any]]:
    """Each disk's image source (S_A, or A in 2016) becomes its reference point (renamed,
    retagged); the disk's older
    references go first, in the same lvm process. Killed half way, the next incremental
    finds no reference, or one of another run, and makes a full backup saying so."""
    rows = ctx.view.lvs()
    cmds: list[list[str]] = []
    new_refs, old_refs, out = [], [], []
    for v, d, disk in ctx.disks():
        gen = ((ctx.run.images.get(f"{v}/{d}") or {}).get("chain") or {}).get("generation")
        new = chain.reference_lv(v, d, ctx.run.id)
        old = [r for r in chain.references(rows, v, d) if r != new]
        old_refs += old
        if old:
            cmds.append(["lvremove", "-q", "-y", *map(ctx.vg_lv, old)])
        src = disk.lv(ctx.model.source)
        if src and src in rows and new not in rows and gen:
            cmds.append(["lvrename", "-q", ctx.names.vg, src, new])
        if gen and (new not in rows or {REFERENCE_TAG, f"gen_{gen}"} - rows[new].tags):
            # also when a killed run renamed it but did not retag it
            cmds.append(["lvchange", "-q", "--deltag", ROLE_TAG[ctx.model.source],
                         "--addtag", REFERENCE_TAG,
                         "--addtag", f"gen_{gen}", ctx.vg_lv(new)])
        if gen:
            new_refs.append(new)
            disk.set_exists(ctx.model.source, False)  # the reference now, not the run's
            out.append({"vm": v, "disk": d, "lv": new, "generation": gen, "replaced": old})
    rows = ctx.view.batch(cmds, present=new_refs, absent=old_refs)
    untagged = [r for r, o in zip(new_refs, out, strict=True)
                if {REFERENCE_TAG, f"gen_{o['generation']}"} - rows[r].tags]
    if untagged:  # the lvm shell exits 0 whatever happened
        raise HvlabError(f"reference points not tagged as such: {', '.join(untagged)}")
    ctx.save()
    return out


def promote(ctx: Ctx, vm: str, d: str, disk: Disk) -> None:
    """Merge one disk's C into its B (the unwind's merge)."""
    merge_into(ctx, [(vm, d, disk)])


def merge_into(ctx: Ctx, disks: list[tuple[str, str, Disk]],
               also_remove: list[str] | None = None) -> None:
    """Merge C into B for each disk: B's LV goes, C takes its name and the live-disk role. The
    controller maps C's dm device, which LVM renames in place: the guest sees nothing. Every
    part is skipped when already done, so a run killed half-way through finishes it. Done
    for all disks at once: one lvremove (B, and also_remove with it), one lvm batch of
    renames checked by its report, one batch for the tags."""
    rows = ctx.view.lvs()
    moving = [(v, d, disk) for v, d, disk in disks if disk.C and disk.C in rows]
    if also_remove:
        ctx.view.remove_lvs(also_remove + [disk.B for *_, disk in moving])
        faults.point("s14-one")  # every S removed (one lvremove, with the B below)
    elif moving:
        ctx.view.remove_lvs([disk.B for *_, disk in moving])
    if moving:
        faults.point("s14-base-removed")
        ctx.view.batch([["lvrename", "-q", ctx.names.vg, disk.C or "", disk.B]
                   for *_, disk in moving],
                  present=[disk.B for *_, disk in moving],
                  absent=[disk.C or "" for *_, disk in moving])
        faults.point("s14-renamed")
    for v, d, disk in disks:
        live.record(ctx.names, v, d, disk.B)  # the renamed C is the disk now
        disk.C_exists = False
    ctx.save()
    retag_bases(ctx, [disk.B for *_, disk in disks])
    for *_, disk in disks:
        disk.merged = True
    ctx.save()


def retag_base(ctx: Ctx, lv: str) -> None:
    retag_bases(ctx, [lv])


def retag_bases(ctx: Ctx, lvs: list[str]) -> None:
    """A renamed C still carries its checkpoint tags: make it the live disk (idempotent). One
    lvchange per set of stale tags (all of a run's renamed Cs share theirs)."""
    def stale(tags: frozenset[str]) -> tuple[str, ...]:
        return tuple(sorted(t for t in tags if t == ROLE_TAG["C"] or t.startswith("run_")))

    rows = ctx.view.lvs()
    groups: dict[tuple[str, ...], list[str]] = {}
    for lv in dict.fromkeys(lvs):
        if stale(rows[lv].tags) or ROLE_TAG["B"] not in rows[lv].tags:
            groups.setdefault(stale(rows[lv].tags), []).append(lv)
    if not groups:
        return
    # One lvm process, its report kept: the run's next question costs no `lvs`.
    rows = ctx.view.batch([["lvchange", "-q", *[x for t in old for x in ("--deltag", t)],
                       "--addtag", ROLE_TAG["B"], *map(ctx.vg_lv, group)]
                      for old, group in groups.items()],
                     present=[lv for g in groups.values() for lv in g], active=False)
    left = [lv for g in groups.values() for lv in g
            if stale(rows[lv].tags) or ROLE_TAG["B"] not in rows[lv].tags]
    if left:
        raise HvlabError(f"lvchange left the checkpoint tags on {', '.join(left)}")


def _dev_size(dev: str) -> int:
    fd = os.open(dev, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
