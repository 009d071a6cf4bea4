"""The 2012 (and 2008 R2) model's own steps: the guest's shadow copy inside the VM's storage,
the host's shadow copy of the volume, and the host rolling the VM's disk in that shadow copy
back to the guest's: the "roll back" of Veeam's wording, done by the kernel.

Per disk: D, a thin LV of the VM's own (the guest's diff area: a Windows guest keeps it in
the volume, `System Volume Information`), holds the copy-on-write store of the guest's shadow
copy G, a dm-snapshot of B. While G exists the controller is a `snapshot-origin` of B: every
write the guest makes to B first copies the old chunk into D. The host's shadow copy S takes
B and D together (S_B, S_D), writable for the auto-recovery phase: `snapshot-merge` of S_D
into S_B rolls S_B back to G (T0 and the guest's fix-ups), then S_B is made read-only and read.
"""

from __future__ import annotations

import time
from typing import Any

from hvlab.errors import HvlabError
from hvlab.flow import consistency as S
from hvlab.flow import faults
from hvlab.flow.actions import _left, art, recovered
from hvlab.flow.context import Ctx
from hvlab.lab.paths import ROLE_TAG
from hvlab.lab.record import Artifact, Disk
from hvlab.sys import dm
from hvlab.sys import dmioctl as D
from hvlab.sys.uevents import wait_node

CHUNK_SECTORS = 8  # 4 KiB chunks: the guest's diff area copies what it must, no more
MERGE_WAIT_S = 600.0


def diff_area_bytes(size: int) -> int:
    """Room for every chunk of the disk plus the store's exception table (16 bytes per
    chunk, a 4 KiB header): thin, so only what the guest overwrites is allocated."""
    return size + size // 128 + (1 << 20)


def allocate_diff_areas(ctx: Ctx, vm: str) -> dict[str, Any]:
    """D of every disk of the VM, before the window (LVM is slow, the freeze is not): fresh
    thin LVs, zero to the kernel, so the snapshot store starts empty. A D left by a killed
    attempt is made again (a store written once must not be reused)."""
    rows = ctx.view.lvs()
    todo = []
    for v, d, disk in ctx.disks(vm):
        disk.D = disk.D or ctx.names.artifact_lv(v, d, "D", ctx.run.id)
        if disk.D in rows and not disk.shadow:
            continue  # made by this step before a kill; G was never made on it
        todo.append((v, d, disk))
    ctx.save()
    stale = [disk.D or "" for _, _, disk in todo if disk.D in rows]
    cmds = ([["lvremove", "-q", "-y", *map(ctx.vg_lv, stale)]] if stale else []) + [
        ["lvcreate", "-q", "-V", f"{diff_area_bytes(disk.size)}b", "-T",
         ctx.vg_lv(ctx.names.pool), "-n", disk.D or "", "-kn",
         *ctx.tags(ROLE_TAG["D"], v, d)] for v, d, disk in todo]
    ctx.view.batch(cmds, present=[disk.D or "" for *_, disk in ctx.disks(vm)])
    for *_, disk in ctx.disks(vm):
        wait_node(ctx.lv_dev(disk.D or ""))
        disk.D_exists = True
    ctx.save()
    return {"allocated": [art(v, d, "D", disk.D) for v, d, disk in todo]}


def _table_len(dev: str) -> int:
    (t,) = D.table(dev.removeprefix("/dev/mapper/"))
    return t.length


def guest_shadow_copy(ctx: Ctx, vm: str) -> dict[str, Any]:
    """The guest's software provider takes its shadow copy of every disk at one instant:
    the controllers held, G made on B with its store on D, each controller loaded as B's
    snapshot-origin (from now on a write to B first saves the old chunk in D), resumed. T0."""
    v = ctx.vm(vm)
    todo = [(vv, d, disk) for vv, d, disk in ctx.disks(vm) if not _shadowing(ctx, disk)]
    made = []
    ctls = [disk.ctl for *_, disk in todo]
    with ctx.guards.hold.guard(vm, ctls, _left(ctx, vm), ctx.sync_live), \
            D.suspended(*ctls, timeout=_left(ctx, vm)):
        for vv, d, disk in todo:
            base = dm.majmin(ctx.lv_dev(disk.B))
            n = _table_len(disk.ctl)
            name = ctx.names.shadow(vv, d)
            disk.shadow = name
            ctx.save()
            if D.exists(name):  # a killed attempt's, never used: made afresh below
                D.remove(name)
            D.create(name, [D.Target(0, n, "snapshot",
                                     f"{base} {dm.majmin(ctx.lv_dev(disk.D or ''))} P "
                                     f"{CHUNK_SECTORS}")],
                     uuid=f"{ctx.names.uuid_prefix}gs-{vv}-{d}")
            faults.point("gs-made")
            D.load(disk.ctl, [D.Target(0, n, "snapshot-origin", base)])
            made.append({**art(vv, d, "D", disk.D), "shadow": name})
        faults.point("gs-origin")
    for *_, disk in todo:
        wait_node(f"/dev/mapper/{disk.shadow}")
    v.t0 = time.time()
    return {"made": made, "t0": v.t0}


def _shadowing(ctx: Ctx, disk: Disk) -> bool:
    """Is G there and the controller B's snapshot-origin (done before a kill)?"""
    if not disk.shadow or not D.exists(disk.shadow):
        return False
    t = D.table(disk.ctl)
    return len(t) == 1 and t[0].type == "snapshot-origin"


def guest_auto_recovery(ctx: Ctx, vm: str) -> dict[str, Any]:
    """The guest's writers fix up its own shadow copy (writable until they are done): the
    fix-ups land in D, never on the live disk."""
    v = ctx.vm(vm)
    if v.cls != S.APP or not v.auto_recovery:
        return {"skipped": f"{v.cls}: no auto-recovery (G stays = B@T0)"}
    devices = {d: f"/dev/mapper/{disk.shadow}" for _, d, disk in ctx.disks(vm)}
    rep = ctx.client(vm).post_snapshot(devices)
    faults.point("gs-recovered")
    return {"recovered": devices, **recovered(ctx, vm, rep, "G")}


def external_snapshot(ctx: Ctx, _: None) -> dict[str, Any]:
    """The host's shadow copy of the volume: S_B and S_D of every disk in one lvm batch,
    taken with every controller and shadow copy held (the guest writes on meanwhile, which
    is why S_B alone is not consistent). Writable: an auto-recover shadow copy is, until its
    auto-recovery ends."""
    start = time.time()
    rows = ctx.view.lvs()
    members: list[tuple[str, str, Artifact, str, str]] = []
    for v, d, disk in ctx.disks():
        pairs: tuple[tuple[Artifact, str], ...] = (("S_B", disk.B), ("S_D", disk.D or ""))
        for a, origin in pairs:
            name = ctx.names.artifact_lv(v, d, a, ctx.run.id)
            setattr(disk, a, name)
            members.append((v, d, a, name, origin))
    ctx.save()
    held = [x for _, _, disk in ctx.disks() for x in (disk.ctl, disk.shadow or "")]
    cmds = [ctx.snapshot_argv(origin, name, a, v, d)
            if name not in rows else ["lvchange", "-q", "-ay", "-K", ctx.vg_lv(name)]
            for v, d, a, name, origin in members
            if name not in rows or rows[name].major is None]
    with ctx.guards.hold.guard(ctx.run.vms[0], held, 60.0, ctx.sync_live), \
            D.suspended(*held, timeout=60.0):
        ctx.view.batch(cmds, present=[m[3] for m in members])
    made = []
    for v, d, a, name, _origin in members:
        wait_node(ctx.lv_dev(name))
        ctx.vm(v).disks[d].set_exists(a, True)
        made.append(art(v, d, a, name))
    ctx.run.snapshot_set = {"start": start, "end": time.time(),
                            "members": [m["lv"] for m in made]}
    ctx.save()
    return {"made": made}


def roll_back(ctx: Ctx, _: None) -> dict[str, Any]:
    """Auto-recovery on the host: S_B, the VM's disk in the host's shadow copy, is rolled
    back to the guest's shadow copy by merging the copy-on-write store it carries (S_D)
    into it (dm snapshot-merge, as `lvconvert --merge` of an old-style snapshot). Every chunk
    the guest wrote after T0 gets its T0 content back, every fix-up lands. Then S_B is made
    read-only."""
    out = {}
    for v, d, disk in ctx.disks():
        if disk.reverted:
            continue  # done before a kill
        name = ctx.names.revert(v, d)
        if D.exists(name):
            D.remove(name)  # a killed roll-back: the merge resumes from S_D's own record
        sb, sd = ctx.lv_dev(disk.S_B or ""), ctx.lv_dev(disk.S_D or "")
        n = _table_len(ctx.lv_dev(disk.S_B or ""))
        start = time.time()
        D.create(name, [D.Target(0, n, "snapshot-merge",
                                 f"{dm.majmin(sb)} {dm.majmin(sd)} P {CHUNK_SECTORS}")],
                 uuid=f"{ctx.names.uuid_prefix}rv-{v}-{d}")
        try:
            faults.point("rv-merging")
            chunks = _wait_merged(name)
        finally:
            D.remove(name)
        disk.reverted = {"chunks": chunks, "bytes": chunks * CHUNK_SECTORS * 512,
                         "seconds": round(time.time() - start, 3)}
        ctx.save()
        out[f"{v}/{d}"] = disk.reverted
    ctx.view.batch([["lvchange", "-q", "-pr", ctx.vg_lv(disk.S_B or "")]
                    for *_, disk in ctx.disks()],
                   present=[disk.S_B or "" for *_, disk in ctx.disks()])
    return {"rolled_back": out}


def _wait_merged(name: str) -> int:
    """Wait for snapshot-merge to finish; the chunks it merged. Its status is
    `<allocated>/<total> <metadata>` in sectors: done when only metadata is left."""
    first: int | None = None
    end = time.monotonic() + MERGE_WAIT_S
    while True:
        (st,) = D.status(name)
        used, meta = st.params.split()[0].split("/")[0], st.params.split()[1]
        if first is None:
            first = int(used) - int(meta)
        if int(used) <= int(meta):
            return first // CHUNK_SECTORS
        if time.monotonic() > end:
            raise HvlabError(f"{name}: the roll-back did not finish in {MERGE_WAIT_S:g} s "
                             f"({st.params})")
        time.sleep(0.02)


def delete(ctx: Ctx, _: None) -> dict[str, Any]:
    """The host's shadow copy is deleted, then the guest's: each controller back to B
    plainly, G removed, its diff area D with it."""
    removed = []
    host: tuple[Artifact, ...] = ("S_B", "S_D")
    gone = [(v, d, a, lv) for v, d, disk in ctx.disks() for a in host
            if (lv := disk.lv(a)) and disk.exists(a)]
    ctx.view.remove_lvs([lv for *_, lv in gone])
    for v, d, a, lv in gone:
        ctx.vm(v).disks[d].set_exists(a, False)
        removed.append(art(v, d, a, lv))
    ctx.save()
    faults.point("gs-dropped")
    removed += drop_shadow_copies(ctx, ctx.disks())
    return {"removed": removed}


def drop_shadow_copies(ctx: Ctx, disks: list[tuple[str, str, Disk]]) -> list[dict[str, Any]]:
    """Every controller that is B's snapshot-origin back to a plain linear map of B (held
    while its table changes), every G removed, every D removed (one lvremove). Safe to run
    again, and on any run (the unwind's)."""
    out = []
    for v, d, _ in disks:  # a roll-back a kill left running holds S_B and S_D
        if D.exists(ctx.names.revert(v, d)):
            D.remove(ctx.names.revert(v, d))
    for _, _, disk in disks:
        t = D.table(disk.ctl) if D.exists(disk.ctl) else []
        if len(t) == 1 and t[0].type == "snapshot-origin":
            with D.suspended(disk.ctl, timeout=60.0):
                D.load(disk.ctl, [D.Target(0, t[0].length, "linear", f"{t[0].params} 0")])
    for v, d, disk in disks:
        name = disk.shadow or ctx.names.shadow(v, d)
        if D.exists(name):
            D.remove(name)
            out.append({"vm": v, "disk": d, "artifact": "G", "lv": name})
    rows = ctx.view.lvs()
    ds = [(v, d, disk) for v, d, disk in disks if disk.D and disk.D in rows]
    ctx.view.remove_lvs([disk.D or "" for *_, disk in ds])
    for v, d, disk in ds:
        disk.D_exists = False
        out.append(art(v, d, "D", disk.D))
    ctx.save()
    return out

