"""The backup flow: Veeam's 14 steps on real thin snapshots, pausable, resumable, abortable.

The pieces: `steps` (the 14 steps as data), `actions` and `job` (what each step does),
`observe` (each step's event), `unwind` (undo at any point), `faults` (named fault points),
`dest` (the backup directory). This module registers runs and drives them.

Artifacts per disk (LV names carry the run id; every LV has the lab tag, a role tag, vm_,
disk_ and run_ tags): B `<vm>_<disk>` (live disk, frozen at T0), C `<vm>_<disk>_c_<run>`,
A `<vm>_<disk>_a_<run>`, S_B / S_A `<vm>_<disk>_sb_<run>` / `_sa_<run>`.
"""

from __future__ import annotations

import contextlib
import os
import time
import traceback
from pathlib import Path
from typing import Any

from hvlab.backup import chain, offhost, thinmeta
from hvlab.errors import BadInput, HvlabError
from hvlab.flow import dest as backup_dir
from hvlab.flow import faults, observe, preflight, unwind
from hvlab.flow import steps as S
from hvlab.flow.context import Ctx, Say, quiet
from hvlab.flow.request import BackupRequest
from hvlab.lab import poolhealth, runs
from hvlab.lab.handle import Lab
from hvlab.lab.paths import ROLE_TAG, Names
from hvlab.lab.record import Disk, Event, Run, Vm
from hvlab.lab.state import locked
from hvlab.sys import dirfd
from hvlab.sys.dmioctl import SuspendTimeout
from hvlab.sys.lvm import LvRow

# What Hyper-V answers when a backup finds an orphan of an earlier one (it never reuses it).
LEFTOVER_TEXT = {
    ROLE_TAG["C"]: "the VM has a backup checkpoint {lv} (run {run}) that must be merged first",
    ROLE_TAG["A"]: "the auto-recovery checkpoint {lv} exists (run {run}): 'the file exists', "
                  "0x800423FB (KB3175561)",
    ROLE_TAG["S_B"]: "an external snapshot {lv} of run {run} still exists",
    ROLE_TAG["D"]: "the guest's shadow copy diff area {lv} of run {run} still exists (2012)"}


class FlowFailed(HvlabError):
    """A step failed; the run was unwound (thawed, artifacts removed, C merged if live)."""


def _say_event(ctx: Ctx, ev: Event) -> None:
    d = ev.detail
    who = ev.vm or "job"

    def fmt(v: Any) -> str:
        if isinstance(v, list):
            return " ".join(str(x.get("lv") if isinstance(x, dict) else x) for x in v)
        return str(v)

    extra = d.get("skipped") or ", ".join(f"{k}={fmt(v)}" for k, v in d.items()
                                          if k in ("class", "made", "removed", "merged",
                                                   "window_s", "consistent_after"))
    w = ", ".join(f"{k}->{ev.writes(k)}" for k in ev.writes_to
                  if ev.vm is None or k.startswith(f"{ev.vm}/"))
    ctx.say(f"[{ev.step or 0:02d}] {who:5} {ev.name:<24} {ev.seconds:6.2f}s  "
            f"{extra}  writes: {w}")


def execute(ctx: Ctx) -> Run:
    """Run from run.pos to the pause point or the end. Any failure thaws and unwinds."""
    # The lab's folder and the backup directory held for the run: what it writes there is
    # reached from them, never through a symlink planted after the start's checks.
    with contextlib.ExitStack() as held:
        held.enter_context(dirfd.hold(ctx.names.dir))
        if ctx.run.dest_made and backup_dir.owns(Path(ctx.run.dest), ctx.run.id):
            held.enter_context(dirfd.hold(Path(ctx.run.dest)))
        with ctx.guards:  # they end with the run's steps (an early failure leaves some)
            return _execute(ctx)


def _execute(ctx: Ctx) -> Run:
    run = ctx.run
    plan = ctx.model.plan(run.vms)
    try:
        while run.pos < len(plan):
            n, vm = plan[run.pos]
            faults.point(f"step-{n:02d}")
            ev = observe.run_step(ctx, n, vm)
            _say_event(ctx, ev)
            run.pos += 1
            run.last_step = n
            # Actions save where a kill must find their progress (names before what they
            # name); what they change last is saved here, with the step's end: a kill before
            # it runs the step again, and every step can run again.
            ctx.save()
            if run.pause_at is not None and run.pos - 1 == run.pause_at:
                observe.flush(ctx)
                run.pauses.append([time.time(), 0.0])
                run.state = "paused"
                run.pause_at = None
                ctx.save()
                return run
        faults.point("finish")
        observe.flush(ctx)
        finish(ctx)
        return run
    except BaseException as exc:
        observe.flush(ctx)  # never unwind under a hash still reading B
        err = f"{type(exc).__name__}: {exc}" + _pool_state(ctx, exc)
        run.error = err
        if os.environ.get("HVLAB_VERBOSE"):  # where, for a bug report
            ctx.say("".join(traceback.format_exception(exc)).rstrip())
        ctx.say(f"step failed: {err}; unwinding")
        try:
            unwind.unwind(ctx, final="failed", post=lambda: snapshot_state(ctx))
        except Exception as exc2:
            run.unwind_error = str(exc2)
            ctx.save()
            if isinstance(exc2, unwind.PoolFailed):  # the failure already names the pool
                raise FlowFailed(f"run {run.id} failed ({err}); the guests are thawed on "
                                 f"their live disks, and the rest of the unwind waits for "
                                 f"the pool (`hvlab recover`)") from exc
            raise FlowFailed(f"run {run.id} failed ({err}) and unwinding failed: "
                             f"{exc2}") from exc
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise FlowFailed(f"run {run.id} failed and was unwound: {err}") from exc


def _pool_state(ctx: Ctx, exc: BaseException) -> str:
    """Said with a failure when the pool is the cause: failed by the kernel (a pool message
    refused, every I/O failing), or with no chunk left (an EIO anywhere in the run, a guest's
    write or auto-recovery's mount, is then the pool's, in error-when-full mode). Not asked
    after a suspend that timed out: the disk below does not complete writes, and the pool's
    status waits for its metadata commit on that disk (seen: minutes before the unwind)."""
    if isinstance(exc, SuspendTimeout):
        return ""
    try:
        why = poolhealth.failure(ctx.names)
    except Exception:  # never in the way of the unwind: the failure says enough
        why = None
    if why:
        return f" ({why})"
    try:
        used, total = thinmeta.pool_usage(ctx.names)
    except Exception:  # the pool's own state unreadable: the failure says enough
        return ""
    if total and used >= total:
        return (f" (thin pool {ctx.names.vg}/{ctx.names.pool} is full: {used} of {total} "
                f"chunks; extend it, e.g. lvextend)")
    return ""


def finish(ctx: Ctx) -> None:
    from hvlab.backup import manifest
    from hvlab.flow.job import writing_to

    ctx.run.post = snapshot_state(ctx)
    ctx.save()
    # The manifest first: a kill between the two leaves a resumable run, never a "done" run
    # whose backup cannot be verified or restored.
    with writing_to(Path(ctx.run.dest), manifest.NAME):
        manifest.write(ctx.names, ctx.run)
    faults.point("finish-manifest")
    if ctx.run.incremental:  # the chains' last links are this run's, from now on
        with chain.updating(ctx.names) as chains:  # runs of other VMs update it too
            for key, img in ctx.run.images.items():
                c = img.get("chain") or {}
                v, d = key.split("/")
                if c.get("generation"):
                    chains[key] = {"generation": c["generation"], "run": ctx.run.id,
                                   "dest": ctx.run.dest, "size": img["size"],
                                   "reference": chain.reference_lv(v, d, ctx.run.id)}
    ctx.run.state = "done"
    ctx.save()


def snapshot_state(ctx: Ctx, rows: dict[str, LvRow] | None = None) -> dict[str, Any]:
    """LV set (name -> roles) and pool usage: invariant 8 compares pre and post."""
    lvs = {name: sorted(t for t in r.tags if t.startswith("role_"))
           for name, r in (rows or ctx.view.lvs()).items()
           if not r.hidden and name != ctx.names.pool}
    used, total = thinmeta.pool_usage(ctx.names)
    return {"lvs": lvs, "pool_used_blocks": used, "pool_blocks": total}


def leftovers(lab: Lab, vms: list[str], live_runs: set[str],
              rows: dict[str, LvRow] | None = None) -> list[str]:
    out = []
    for r in (rows or lab.lvs()).values():
        role = next((t for t in sorted(r.tags) if t in LEFTOVER_TEXT), None)
        vm, run_tag = r.tag_value("vm_"), r.tag_value("run_")
        if role and vm in vms and run_tag not in live_runs:
            out.append(f"{vm}: " + LEFTOVER_TEXT[role].format(lv=r.name, run=run_tag or "?"))
    return out


def start(lab_name: str, vms: list[str], *, dest: Path | None = None,
          pause_after: int | None = None, say: Say = quiet, fingerprints: bool = True,
          progress: Any = None, app_aware: str = "try",
          metadata_limit: int = preflight.DEFAULT_METADATA_LIMIT, mode: str = "on-host",
          incremental: bool = False, model: str = S.DEFAULT) -> Run:
    """`hvlab backup VM [VM ...]`: validate everything, register the run, execute."""
    BackupRequest(vms=tuple(vms), dest=dest, pause_after=pause_after,
                  fingerprints=fingerprints, app_aware=app_aware, mode=mode,
                  incremental=incremental, model=model, metadata_limit=metadata_limit).check()
    if mode == "off-host" and (lacking := offhost.missing()):
        raise HvlabError(f"off-host mode needs {'; '.join(lacking)} (`make deps` installs them)")
    lab = Lab.open(lab_name)
    vmdefs = [lab.state.definition.vm(v) for v in vms]  # BadInput for an unknown VM
    run_id = runs.new_id()
    pause_at = S.model(model).pause_position(vms, pause_after)
    where = (dest or lab.names.backups_dir / run_id).absolute()
    backup_dir.check(where)
    with dirfd.hold(lab.names.dir), runs.VmLocks(lab.names, vms):
        with locked(lab.name):
            ctx = _register(lab, run_id, vmdefs, where, pause_at, pause_after, say,
                            fingerprints, metadata_limit, model)
            ctx.run.app_aware = app_aware
            ctx.run.mode = mode
            ctx.run.incremental = incremental
            ctx.save()
        ctx.progress = progress
        ctx.say(f"run {run_id}: backup of {', '.join(vms)} -> {where}")
        return execute(ctx)


def _register(lab: Lab, run_id: str, vmdefs: list[Any], where: Path, pause_at: int | None,
              pause_after: int | None, say: Say, fingerprints: bool,
              metadata_limit: int = preflight.DEFAULT_METADATA_LIMIT,
              model: str = S.DEFAULT) -> Ctx:
    """Under the lab lock: no other live run for these VMs, no leftovers, room in the thin
    pool (preflight); then write run.json. A refusal leaves nothing behind."""
    names = lab.names
    vms = [vd.name for vd in vmdefs]
    active = {r.id: r for r in runs.active_runs(names)}
    for r in active.values():
        busy = sorted(set(r.vms) & set(vms))
        if busy:
            raise BadInput(f"VM {busy[0]} is already in a running backup "
                           f"({r.id}, {runs.effective_state(r)})")
    rows = lab.lvs()  # one scan: leftovers, the pool's room, the state before
    left = leftovers(lab, vms, set(active), rows)
    if left:
        raise BadInput("; ".join(left) + " - `hvlab recover` cleans up after dead runs")
    preflight.check(rows, names.vg, names.pool,
                    [names.lv(vd.name, d.name) for vd in vmdefs for d in vd.disks],
                    metadata_limit)
    run = Run(id=run_id, lab=lab.name, vms=vms, dest=str(where), created=time.time(),
              pause_at=pause_at, pause_after=pause_after, model=model, vm={
                  vd.name: Vm(profile=vd.profile, disks={
                      d.name: Disk(B=names.lv(vd.name, d.name), ctl=names.ctl(vd.name, d.name),
                                   size=d.size, fs=d.fs) for d in vd.disks})
                  for vd in vmdefs})
    runs.mark_self(run)
    ctx = Ctx(lab, run, say, fingerprints, S.model(run.model))
    ctx.view.take(rows)  # nothing changes LVM before step 4, which asks it again otherwise
    run.pre = snapshot_state(ctx, rows)
    backup_dir.claim(where, run_id)
    run.dest_made = True
    ctx.save()
    return ctx


def resume(lab_name: str, run_id: str, *, say: Say = quiet, fingerprints: bool = True,
           progress: Any = None, pause_after: int | None = None) -> Run:
    BackupRequest(resume=run_id, pause_after=pause_after, fingerprints=fingerprints).check()
    names = Names(lab_name)
    run = runs.load(names, run_id)
    state = runs.effective_state(run)
    if state in runs.FINAL:
        raise BadInput(f"run {run_id} is {state}: nothing to resume")
    if state not in ("paused", "interrupted"):
        raise BadInput(f"run {run_id} is {state} in another process")
    if run.state == "aborting":
        raise BadInput(f"run {run_id} was interrupted while aborting: "
                       f"`hvlab backup --abort {run_id}` finishes it")
    plan = S.model(run.model).plan(run.vms)
    if state == "interrupted" and 0 < run.pos < len(plan) and (
            any(run.vm[v].frozen for v in run.vms)):
        raise BadInput(f"run {run_id} was interrupted inside a freeze window: "
                       f"`hvlab backup --abort {run_id}`")
    pos = S.model(run.model).pause_position(run.vms, pause_after)
    if pos is not None and pos < run.pos:
        raise BadInput(f"run {run_id} is already past step {pause_after}: "
                       f"--pause-after must name a later step")
    lab = Lab.open(lab_name)
    with dirfd.hold(names.dir), runs.VmLocks(names, run.vms):
        run.pause_at = pos
        if run.pauses and not run.pauses[-1][1]:
            run.pauses[-1][1] = time.time()
        run.state = "running"
        runs.mark_self(run)
        ctx = Ctx(lab, run, say, fingerprints, S.model(run.model))
        ctx.progress = progress
        ctx.save()
        if state == "interrupted":
            unwind.resume_controllers(ctx)
        if run.pos >= len(plan):
            ctx.say(f"run {run_id}: all steps done; writing the manifest")
        else:
            ctx.say(f"run {run_id}: resuming at step {plan[run.pos][0]}")
        return execute(ctx)


def abort(lab_name: str, run_id: str, *, say: Say = quiet) -> Run:
    BackupRequest(abort=run_id).check()
    names = Names(lab_name)
    run = runs.load(names, run_id)
    state = runs.effective_state(run)
    if state in runs.FINAL:
        raise BadInput(f"run {run_id} is {state}: nothing to abort")
    if state == "running":
        raise BadInput(f"run {run_id} is running in process {run.pid}; "
                       f"interrupt it (Ctrl-C unwinds it)")
    lab = Lab.open(lab_name)
    with dirfd.hold(names.dir), runs.VmLocks(names, run.vms):
        ctx = Ctx(lab, run, say, fingerprints=False, model=S.model(run.model))
        unwind.unwind(ctx, final="aborted", post=lambda: snapshot_state(ctx))
    return run


def describe_devices(run: Run, names: Names) -> list[tuple[str, str, str]]:
    """(device path, role, note) of every artifact of a run that exists now."""
    labels = {"C": "C backup checkpoint", "A": "A auto-recovery checkpoint",
              "S_B": "S external snapshot of B", "S_A": "S external snapshot of A",
              "D": "D the guest's diff area (2012)", "S_D": "S external snapshot of D"}
    out = []
    for vm, d, disk in run.disks():
        out.append((f"/dev/mapper/{disk.ctl}", f"controller {vm}/{d}", "guest writes here"))
        if disk.shadow and disk.D_exists:
            out.append((f"/dev/mapper/{disk.shadow}", "G the guest's shadow copy (2012)",
                        "B at T0, its store on D"))
        out.append((names.lv_path(disk.B), "B live disk / frozen at T0"
                    if disk.redirected and not disk.merged else "B live disk", ""))
        for a, lv in disk.present().items():
            if a != "B":
                out.append((names.lv_path(lv), labels[a], ""))
    return out
