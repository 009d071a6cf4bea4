"""Steps 1-10, one VM at a time (steps.ACTIONS names each step's function).

An action returns its detail for the step's event; `made`/`removed` name artifacts explicitly
({vm, disk, artifact, lv}) so explain never parses names. Every action can run again after a
kill (it finishes what is half done, never repeats what is done).
"""

from __future__ import annotations

import gc
import time
from dataclasses import asdict
from typing import Any

from hvlab.errors import HvlabError
from hvlab.flow import checkpoint, faults
from hvlab.flow import consistency as S
from hvlab.flow.context import Ctx
from hvlab.guest.client import GuestError, GuestTimeout, GuestUnavailable
from hvlab.lab import live
from hvlab.lab.record import Artifact, Disk, Window
from hvlab.sys import dm
from hvlab.sys import dmioctl as D
from hvlab.sys.lvm import LvRow
from hvlab.sys.uevents import wait_node

FLUSH_AND_HOLD_S = 10.0
WRITER_TIMEOUT_S = 60.0  # VSS's bound for writers to quiesce, unless the guest says otherwise
ALLOCATE_S = 300.0  # LVM's allocation before the freeze (Lvm.batch's own bound)
FREEZE_SLACK_S = 5.0  # the freeze itself, once the writers are quiet, and the round trip


def art(vm: str, disk: str, a: Artifact, lv: str | None) -> dict[str, Any]:
    return {"vm": vm, "disk": disk, "artifact": a, "lv": lv}


def request(ctx: Ctx, vm: str) -> dict[str, Any]:
    v = ctx.vm(vm)
    return {"disks": list(v.disks), "profile": v.profile,
            "locked": f"{ctx.names.runs_dir / 'locks' / vm}.lock"}


def pass_to_guest(ctx: Ctx, vm: str) -> dict[str, Any]:
    v = ctx.vm(vm)
    policy = ctx.run.app_aware
    try:
        if policy == "off":
            raise GuestUnavailable("application-aware processing is off: the guest is not "
                                   "asked")
        ident = ctx.client(vm, timeout=5.0).identify()
        v.answers = True
        v.auto_recovery = bool(ident.get("auto_recovery"))
        v.guest_profile = ident.get("profile")
        wt = ident.get("writer_timeout_s")
        if isinstance(wt, int | float) and not isinstance(wt, bool) and 0 < wt <= 3600:
            v.writer_timeout_s = float(wt)
    except (GuestUnavailable, GuestTimeout) as exc:
        if policy == "require":
            raise HvlabError(f"{vm}: application-aware processing is required, but the "
                             f"guest's integration services do not answer ({exc})") from exc
        v.answers = False
        v.auto_recovery = False
        v.no_answer = str(exc)
    v.cls = S.consistency_for(v.guest_profile or v.profile, v.answers)
    return {"answers": v.answers, "class": v.cls, "note": v.no_answer}


def guest_requestor(ctx: Ctx, vm: str) -> dict[str, Any]:
    if not ctx.vm(vm).answers:
        return {"skipped": "no integration services"}
    rep = ctx.client(vm).prepare()
    return {"state": rep.get("state")}


def quiesce(ctx: Ctx, vm: str) -> dict[str, Any]:
    v = ctx.vm(vm)
    # The guards first: a forked child's start-up (copy-on-write faults) costs 50-100 ms of
    # the lab VM's one CPU, spent here while LVM allocates, not inside the window. The hold
    # guard stands for the whole job: only the first VM's step 4 forks it.
    ctx.guards.hold.standby(ctx.sync_live)
    # The guest waits for its writers (its own bound), then holds the freeze at most
    # FLUSH_AND_HOLD_S; should it die meanwhile, the guard thaws what it froze.
    wait = (v.writer_timeout_s or WRITER_TIMEOUT_S) + FREEZE_SLACK_S
    if v.answers:
        ctx.guards.windows.open(vm, ctx.names.guest_dir(vm),
                                ALLOCATE_S + wait + FLUSH_AND_HOLD_S)
    allocate = ctx.model.allocate or allocate_checkpoints
    allocated = allocate(ctx, vm)  # before the window: LVM is slow, the pool not
    ctx.obs.uevents.drain()  # LVM's, read now: the step's event is written inside the window
    if not v.answers:
        return {"skipped": "no integration services: no freeze (crash-consistent)",
                **allocated}
    v.window = Window(freeze_start=time.time())
    v.frozen = True  # before the request: a failure from here on must thaw
    ctx.save()
    v.window.freeze_start = time.time()  # the window opens with the request, not the save
    ctx.in_window = True
    try:
        rep = ctx.client(vm).freeze(timeout_s=FLUSH_AND_HOLD_S, wait_s=wait)
    except GuestError as exc:
        if ctx.run.app_aware == "require":
            raise HvlabError(f"{vm}: the guest could not quiesce ({exc}); application-aware "
                             f"processing is required") from exc
        # Policy try, as Veeam's "ignore failures": make sure nothing stays frozen (a guest
        # that does not answer may still have frozen), then go on crash-consistent (C is
        # still taken with every controller held), labelled.
        ctx.thaw_window(vm)
        ctx.in_window = False
        v.frozen, v.window, v.cls = False, None, S.CRASH
        v.fallback = f"the guest could not quiesce: {exc}"
        ctx.save()
        return {"skipped": f"quiesce failed, crash-consistent: {exc}", "class": v.cls,
                **allocated}
    v.window.frozen_at = rep.get("frozen_at")
    v.window.open_txid = rep.get("open_txid")
    v.freeze_reply = {k: rep.get(k) for k in ("frozen", "timeout_s", "open_txid",
                                              "ledger_last_txid", "t0")}
    return {"frozen": rep.get("frozen"), "open_txid": rep.get("open_txid"), **allocated}


def allocate_checkpoints(ctx: Ctx, vm: str) -> dict[str, Any]:
    """C and A of every disk as LVM LVs (names, tags, thin ids). They hold B as it is now;
    steps 5 and 6 make them B at T0, inside the window. The job's first step 4 makes them
    for every VM of the job in one lvm process (one start-up and one metadata commit, where
    one per VM cost 0.6-1 s each in the lab VM); a later VM's step 4 finds its own made, and
    makes again only what is gone."""
    have = ctx.view.lvs()
    mine = ctx.disks(vm)
    if all(_allocated(disk, have) for _, _, disk in mine):
        return {"allocated": [], "allocated_before": [
            art(v, d, a, disk.lv(a)) for v, d, disk in mine for a in ("C", "A")]}
    todo = [x for x in ctx.disks() if x[0] == vm or not x[2].slots]
    wants = []
    for v, d, disk in todo:
        disk.C = disk.C or ctx.names.artifact_lv(v, d, "C", ctx.run.id)
        disk.A = disk.A or ctx.names.artifact_lv(v, d, "A", ctx.run.id)
        wants += [checkpoint.Want(v, d, "C", disk.C, disk.B),
                  checkpoint.Want(v, d, "A", disk.A, disk.B)]
    ctx.save()  # names first: an unwind finds them (and by tags) whatever happens next
    got = checkpoint.allocate(ctx, wants)
    for _, _, disk in todo:
        disk.slots = {a: asdict(got[lv]) for a, lv in (("C", disk.C), ("A", disk.A)) if lv}
    ctx.save()
    return {"allocated": [{**art(w.vm, w.disk, w.art, w.lv), "thin_id": got[w.lv].thin_id}
                          for w in wants]}


def _allocated(disk: Disk, rows: dict[str, LvRow]) -> bool:
    """Did an earlier step 4 allocate the disk's C and A, and does LVM still have them?"""
    return all(a in disk.slots and (lv := disk.lv(a)) in rows
               and rows[lv].thin_id == disk.slots[a]["thin_id"] for a in ("C", "A"))


def _slot(disk: Disk, a: str) -> checkpoint.Slot:
    if a not in disk.slots:
        raise HvlabError(f"{disk.ctl}: no {a} allocated (step 4 did not run for this disk)")
    return checkpoint.Slot(**disk.slots[a])


def _left(ctx: Ctx, vm: str) -> float:
    """What is left of the VM's flush-and-hold window (at least 1 s: a crash-consistent
    backup has no window, and its holds still need a bound)."""
    w = ctx.vm(vm).window
    return max(FLUSH_AND_HOLD_S - (time.time() - w.freeze_start if w else 0.0), 1.0)


def backup_checkpoint(ctx: Ctx, vm: str) -> dict[str, Any]:
    """C of every disk at one instant: the VM's controllers, then their origins, suspended
    together; the pool snapshots each origin into its C; C goes live under every controller
    before any is resumed. No write can reach B after its C was taken, even unfrozen."""
    todo: list[tuple[str, str, Disk]] = []
    for v, d, disk in ctx.disks(vm):
        if disk.C and ctx.maps(disk, disk.C):  # resumed after a kill: C is in use already
            disk.C_exists = True
            disk.c_created_at = disk.c_created_at or time.time()
            continue
        if disk.C:
            checkpoint.deactivate(ctx, disk.C)  # activated by a killed attempt, never mapped
        todo.append((v, d, disk))
    ctls = [disk.ctl for _, _, disk in todo]
    origins = [ctx.names.dm_lv_name(disk.B) for _, _, disk in todo]
    made, taken = [], {}
    try:
        # Should this process die or hang with them held, the guard resumes origins, then
        # controllers. A suspend waits for the guest's I/O in flight: one that never
        # completes (a device below that will not flush) fails the step at the window's end.
        with ctx.guards.hold.guard(vm, origins + ctls, _left(ctx, vm), ctx.sync_live), \
                D.suspended(*ctls, timeout=_left(ctx, vm)):
            bases = {d: checkpoint.thin_target(ctx, disk.B) for _, d, disk in todo}
            with D.suspended(*origins, timeout=_left(ctx, vm)):
                if todo:
                    checkpoint.require_room(ctx)
                for v, d, disk in todo:
                    checkpoint.snap_into(ctx, _slot(disk, "C"), int(bases[d].params.split()[1]))
                    taken[d] = time.time()
                    disk.C_exists, disk.c_created_at = True, taken[d]
                    made.append(art(v, d, "C", disk.C))
                    faults.point("s05-one")
                faults.point("s05-snapshots")
            for _, d, disk in todo:
                dev = checkpoint.activate(ctx, _slot(disk, "C"), bases[d])
                D.load(disk.ctl, [D.Target(0, bases[d].length, "linear",
                                           f"{dev.major}:{dev.minor} 0")])
            faults.point("s05-reloaded")
            # Durable before the resume: from it on the guest writes to C, and a restart of
            # the lab (even a power loss) must map C again, never B.
            for v, d, disk in todo:
                live.record(ctx.names, v, d, disk.C or "")
    except BaseException:
        ctx.sync_live(vm)  # resumed by now: record whatever went live
        raise
    first = min(taken.values(), default=0.0)
    for _, d, disk in ctx.disks(vm):
        if d in taken:
            disk.skew_s = round(taken[d] - first, 6)
        disk.redirected = ctx.mapped_lv(disk) == disk.C
        if not disk.redirected:
            ctx.sync_live(vm)  # whatever is live is what a restart must map
            raise HvlabError(f"controller {disk.ctl} does not map C after the redirect")
    return {"made": made, "skew_s": {d: disk.skew_s for _, d, disk in ctx.disks(vm)}}


def auto_recovery_checkpoint(ctx: Ctx, vm: str) -> dict[str, Any]:
    """A of every disk: a second snapshot of B, a sibling of C. Nothing writes B since step 5;
    its origins are held anyway, as the pool asks of a snapshot's origin."""
    todo = [(v, d, disk) for v, d, disk in ctx.disks(vm)
            if not (disk.A and D.exists(ctx.names.dm_lv_name(disk.A)))]  # active: done
    bases = {d: checkpoint.thin_target(ctx, disk.B) for _, d, disk in todo}
    origins = [ctx.names.dm_lv_name(disk.B) for _, _, disk in todo]
    made = []
    with ctx.guards.hold.guard(vm, origins, _left(ctx, vm), ctx.sync_live), \
            D.suspended(*origins, timeout=_left(ctx, vm)):
        if todo:
            checkpoint.require_room(ctx)
        for _, d, disk in todo:
            checkpoint.snap_into(ctx, _slot(disk, "A"), int(bases[d].params.split()[1]))
            faults.point("s06-one")
    for v, d, disk in ctx.disks(vm):
        if d in bases:
            checkpoint.activate(ctx, _slot(disk, "A"), bases[d])
        disk.A_exists = True
        made.append(art(v, d, "A", disk.A))
    return {"made": made}


def internal_snapshot(ctx: Ctx, vm: str) -> dict[str, Any]:
    v = ctx.vm(vm)
    for _, _, disk in ctx.disks(vm):
        if not disk.redirected:
            raise HvlabError(f"T0 without C on {disk.ctl}")
    v.t0 = max(disk.c_created_at or 0.0 for _, _, disk in ctx.disks(vm))
    return {"t0": v.t0}


def thaw(ctx: Ctx, vm: str) -> dict[str, Any]:
    v = ctx.vm(vm)
    if not v.answers or v.window is None:
        return {"skipped": "nothing frozen"}
    w = v.window
    if not v.frozen and w.thawed_at is not None:  # resumed after a kill past the thaw
        return {"window_s": round(w.seconds or 0.0, 3), "timed_out": False}
    try:
        rep = ctx.client(vm).thaw()
    except GuestError as exc:
        return _lost_in_window(ctx, vm, exc)
    ctx.guards.windows.close(vm)
    end = time.time()
    gc.unfreeze()  # frozen before the guards' forks: collectable again
    ctx.in_window = False
    v.frozen = False
    w.thawed_at = rep.get("thawed_at") or end
    w.seconds = end - w.freeze_start
    w.held_s = end - (w.frozen_at or w.freeze_start)
    w.guest_frozen_for_s = rep.get("frozen_for_s")
    ctx.save()
    if rep.get("timed_out"):
        raise HvlabError(f"{vm}: VSS_E_FLUSH_WRITES_TIMEOUT: the guest thawed itself after "
                         f"{rep.get('frozen_for_s')} s; the checkpoint is not consistent")
    if w.held_s > FLUSH_AND_HOLD_S:
        raise HvlabError(f"{vm}: freeze window {w.held_s:.2f} s (filesystems frozen to "
                         f"thawed) exceeds {FLUSH_AND_HOLD_S:g} s")
    return {"window_s": round(w.seconds, 3), "held_s": round(w.held_s, 3), "timed_out": False}


def _lost_in_window(ctx: Ctx, vm: str, exc: GuestError) -> dict[str, Any]:
    """The guest stopped answering inside its freeze window (it died, or hangs): the host
    thaws what it froze. C and A were taken frozen, but the writers' session never ended
    (no thaw, no auto-recovery): crash-consistent at best. Policy require fails the job."""
    v, w = ctx.vm(vm), ctx.vm(vm).window
    notes = ctx.thaw_window(vm)
    end = time.time()
    ctx.in_window = False
    if w is not None:
        w.thawed_at, w.seconds = end, end - w.freeze_start
    why = (f"the guest stopped answering inside its freeze window ({exc}); the host thawed "
           f"its filesystems")
    if ctx.run.app_aware == "require":
        ctx.save()
        raise HvlabError(f"{vm}: {why}; application-aware processing is required") from exc
    v.cls, v.fallback = S.CRASH, why
    ctx.save()
    return {"skipped": f"thaw failed, crash-consistent: {why}", "class": v.cls,
            "notes": notes}


def ready(ctx: Ctx, vm: str) -> dict[str, Any]:
    v = ctx.vm(vm)
    if not v.answers:
        return {"skipped": "no integration services"}
    if v.fallback:
        return {"skipped": f"crash-consistent: {v.fallback}"}
    st = ctx.client(vm).status()
    if st.get("frozen"):
        raise HvlabError(f"{vm}: guest still reports frozen after thaw")
    return {"state": st.get("state"), "committed_txid": st.get("committed_txid")}


def auto_recovery(ctx: Ctx, vm: str) -> dict[str, Any]:
    v = ctx.vm(vm)
    if v.cls != S.APP or not v.auto_recovery:
        return {"skipped": f"{v.cls}: no auto-recovery (A stays = B@T0)"}
    devices: dict[str, str] = {}
    try:
        for _, d, disk in ctx.disks(vm):
            name = ctx.names.ar_ctl(vm, d)
            disk.ar_ctl = name
            ctx.save()
            ctx.detach_ar(name)  # left by a killed run: attach afresh
            devices[d] = dm.create_linear(name, ctx.lv_dev(disk.A or ""),
                                          uuid=f"{ctx.names.uuid_prefix}ar-{vm}-{d}")
            wait_node(devices[d])
        faults.point("s10-attached")
        rep = ctx.client(vm).post_snapshot(devices)
        faults.point("s10-recovered")
    finally:
        for _, d, _disk in ctx.disks(vm):
            ctx.detach_ar(ctx.names.ar_ctl(vm, d))
    return {"attached": devices, **recovered(ctx, vm, rep, "A")}


def recovered(ctx: Ctx, vm: str, rep: dict[str, Any], what: str) -> dict[str, Any]:
    """The guest's post_snapshot answer, recorded; fix-ups that left `what` inconsistent
    fail the step."""
    ctx.vm(vm).auto_recovery_result = {k: rep.get(k)
                                       for k in ("auto_recovery", "repaired", "check")}
    check = rep.get("check") or {}
    if check and not check.get("consistent"):
        raise HvlabError(f"{vm}: auto-recovery left {what} inconsistent: "
                         f"{check.get('problems')}")
    return {"repaired": rep.get("repaired"), "consistent_after": check.get("consistent")}
