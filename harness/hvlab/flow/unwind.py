"""Undo a run at any point, leaving the live disks whole.

`plan` is pure: from the run record and what exists now (`Facts`) it decides what to remove,
merge or keep. `carry_out` does it. Controllers are resumed and guests thawed before either,
unconditionally: a controller left suspended by a kill holds the guest's writes.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from hvlab.backup import chain
from hvlab.errors import HvlabError
from hvlab.flow import dest
from hvlab.flow.context import Ctx
from hvlab.lab import links, live, poolhealth, runs
from hvlab.lab.record import Artifact, Command, Event, Run
from hvlab.sys import dm
from hvlab.sys.run import program_log

Kind = Literal["detach", "shadow", "remove", "promote", "retag", "remove-dest", "keep-dest"]
LVM_KINDS = ("shadow", "remove", "promote", "retag")  # what needs LVM and the pool


class PoolFailed(HvlabError):
    """The pool cannot take the unwind's LVM work: the run waits for `hvlab recover`."""


@dataclass(frozen=True)
class Facts:
    """What exists now, read after the controllers were resumed."""

    lvs: frozenset[str]
    mapped: dict[str, str | None]  # "vm/disk" -> the LV its controller maps
    live: dict[str, str | None]  # "vm/disk" -> the LV recorded live (a restart maps it)
    ar_devices: frozenset[str]
    base_tags: dict[str, frozenset[str]]  # LV of B -> its tags
    dest_owned: bool
    dest_exists: bool


@dataclass(frozen=True)
class Undo:
    kind: Kind
    vm: str = ""
    disk: str = ""
    lv: str = ""
    note: str = ""


def plan(run: Run, facts: Facts, *, was_done: bool) -> list[Undo]:
    out: list[Undo] = []
    for v, d, disk in run.disks():
        key = f"{v}/{d}"
        if disk.ar_ctl and disk.ar_ctl in facts.ar_devices:
            out.append(Undo("detach", v, d, disk.ar_ctl, f"removed {disk.ar_ctl}"))
        if disk.D or disk.shadow:  # 2012: the guest's shadow copy and its diff area first
            out.append(Undo("shadow", v, d, disk.D or "", "removed the guest's shadow copy "
                                                          "and its diff area"))
        removable: tuple[Artifact, ...] = ("S_A", "S_B", "A", "S_D")
        for a in removable:
            lv = disk.lv(a)
            if lv and lv in facts.lvs:
                out.append(Undo("remove", v, d, lv, f"removed {a} {lv}"))
        c = disk.C
        if c and c in facts.lvs:
            # Live (mapped, or recorded live for a restart): the guest may have written to
            # it. Only a C that never went live is removed.
            if c in (facts.mapped.get(key), facts.live.get(key)):
                out.append(Undo("promote", v, d, c,
                                f"merged C {c} into {disk.B} (the guest already wrote to it)"))
            else:
                out.append(Undo("remove", v, d, c, f"removed C {c} (never written)"))
        elif c and f"run_{run.id}" in facts.base_tags.get(disk.B, frozenset()):
            out.append(Undo("retag", v, d, disk.B, f"finished the merge of C into {disk.B}"))
        ref = chain.reference_lv(v, d, run.id)  # S_A kept in step 14 of a run not finished
        if ref in facts.lvs and not was_done:
            out.append(Undo("remove", v, d, ref, f"removed reference point {ref} (its backup "
                                                 f"is not kept)"))
    if run.dest_made and not was_done:
        if facts.dest_owned:
            out.append(Undo("remove-dest", lv=run.dest, note=f"removed partial backup "
                                                           f"{run.dest}"))
        elif facts.dest_exists:
            out.append(Undo("keep-dest", lv=run.dest, note=f"left {run.dest}: not marked as "
                                                         f"this run's"))
    return out


def facts(ctx: Ctx) -> Facts:
    rows = ctx.view.lvs()
    disks = ctx.disks()
    return Facts(
        lvs=frozenset(rows),
        mapped={f"{v}/{d}": ctx.mapped_lv(disk) for v, d, disk in disks},
        live={f"{v}/{d}": live.recorded(ctx.names, v, d) for v, d, _ in disks},
        ar_devices=frozenset(x.name for x in dm.list_devices()
                             if x.uuid.startswith(ctx.names.uuid_prefix)
                             and any(x.name == ctx.names.ar_ctl(v, d) for v, d, _ in disks)),
        base_tags={disk.B: rows[disk.B].tags for _, _, disk in disks if disk.B in rows},
        dest_owned=dest.owns(Path(ctx.run.dest), ctx.run.id),
        dest_exists=Path(ctx.run.dest).exists())


def resume_controllers(ctx: Ctx) -> None:
    """Resume every controller of the run, and B under it: one left suspended by a killed
    step 5 holds the guest's writes. A table loaded before the kill (C) becomes live, which
    is what step 5 had decided; what is live now is recorded for a restart."""
    resume_devices(ctx)
    ctx.sync_live()


def resume_devices(ctx: Ctx) -> None:
    """Resume every controller of the run and B under it (nothing recorded)."""
    for _, _, disk in ctx.disks():  # origins first: step 5 holds them under the controllers
        dm.run_resume(ctx.names.dm_lv_name(disk.B))
    for _, _, disk in ctx.disks():
        dm.run_resume(disk.ctl)
        if disk.shadow:  # 2012: held with its controller in step 9
            dm.run_resume(disk.shadow)


def thaw_all(ctx: Ctx) -> list[str]:
    """Thaw every VM of the run that may be frozen; safe to call any time."""
    notes = [n for vm in ctx.run.vms for n in ctx.thaw_window(vm)]
    ctx.save()
    return notes


def carry_out(ctx: Ctx, steps: list[Undo]) -> list[str]:
    """In plan order by kind: attach devices first (they hold A open), then every LV to go
    in one lvremove, every C to merge in one merge, the retags, the folder."""
    from hvlab.flow.job import merge_into, retag_bases  # the job's merge, done the same way

    # A pool the kernel failed serves no pool message: LVM would write its metadata and then
    # fail to delete the thin devices, leaving the two disagreeing. Stop before any of it.
    if any(u.kind in LVM_KINDS for u in steps) and (why := poolhealth.failure(ctx.names)):
        raise PoolFailed(why)
    done: set[int] = set()
    for i, u in enumerate(steps):
        if u.kind == "detach":
            ctx.detach_ar(u.lv)
            done.add(i)
    shadows = [i for i, u in enumerate(steps) if u.kind == "shadow"]
    if shadows:
        from hvlab.flow.shadow import drop_shadow_copies

        drop_shadow_copies(ctx, [(steps[i].vm, steps[i].disk,
                                  ctx.vm(steps[i].vm).disks[steps[i].disk]) for i in shadows])
        done.update(shadows)
    removes = [i for i, u in enumerate(steps) if u.kind == "remove"]
    ctx.view.remove_lvs([steps[i].lv for i in removes])
    done.update(removes)
    promotes = [i for i, u in enumerate(steps) if u.kind == "promote" and u.vm]
    merge_into(ctx, [(steps[i].vm, steps[i].disk, ctx.vm(steps[i].vm).disks[steps[i].disk])
                     for i in promotes])
    done.update(promotes)
    retags = [i for i, u in enumerate(steps) if u.kind == "retag"]
    retag_bases(ctx, [steps[i].lv for i in retags])
    done.update(retags)
    notes = []
    for i, u in enumerate(steps):
        if u.kind == "remove-dest":
            shutil.rmtree(u.lv, ignore_errors=True)
            if Path(u.lv).exists():  # say so, never claim it removed
                notes.append(f"could not remove partial backup {u.lv}")
                continue
        elif u.kind != "keep-dest" and i not in done:
            continue
        notes.append(u.note)
    for _, _, disk in ctx.disks():
        for a in ("S_A", "S_B", "A", "C", "D", "S_D"):
            setattr(disk, f"{a}_exists", False)
    ctx.save()
    return notes


def unwind(ctx: Ctx, final: str, *, record: bool = True,
           post: Callable[[], dict[str, Any]] | None = None) -> list[str]:
    """Resume, thaw, then carry out the plan; record=False for artifacts whose run record
    is gone (recover), which have no events file to append to. `post` (the state after)
    is recorded in the same save as the final state: a reader never sees one without the
    other."""
    run = ctx.run
    ctx.in_window = False  # from here on every save is durable
    was_done = run.state == "done"
    run.state = "aborting"
    runs.mark_self(run)
    start = time.time()
    with program_log() as commands:
        # Resume before thawing: ext4's thaw writes its superblock, and on a controller left
        # suspended (a kill inside step 5) that write, and the thaw with it, would never end.
        # Then thaw whatever the records do: a run folder or live record that cannot be
        # written (a link planted there) fails the unwind, never keeps a guest frozen.
        resume_devices(ctx)
        try:
            ctx.save()
            ctx.sync_live()
        finally:
            notes = thaw_all(ctx)
        try:  # a link that will not go is said, and the unwind goes on
            notes += [f"removed off-host link {x}" for x in links.clean(ctx.names, run.id)]
        except (HvlabError, OSError) as exc:
            notes.append(f"could not remove the off-host link: {exc}")
        notes += carry_out(ctx, plan(run, facts(ctx), was_done=was_done))
    run.unwound = notes
    if post is not None:
        run.post = post()
    run.state = final
    ctx.save()
    if not record:
        return notes
    runs.append_event(ctx.names, run.id, Event(
        run=run.id, step=None, name=f"unwind ({final})", vm=None, start=start, end=time.time(),
        detail={"notes": notes},
        commands=[Command(c.argv, c.returncode, c.seconds) for c in commands],
        writes_to={f"{v}/{d}": {"lv": ctx.mapped_lv(disk), "artifact": "B"}
                   for v, d, disk in ctx.disks()}))
    for note in notes:
        ctx.say(f"  {note}")
    return notes
