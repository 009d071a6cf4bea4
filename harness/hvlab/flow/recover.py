"""`hvlab recover`: find what dead runs left, say what each is in Hyper-V's terms, clean it.

Hyper-V never reuses an orphan: a leftover GUID-AutoRecovery.avhdx makes the next backup fail
("the file exists", 0x800423FB, KB3175561) and a lingering GUID.avhdx is a checkpoint that must
be merged. recover does what an administrator does by hand: merge a backup checkpoint the guest
already wrote to (its writes are the VM's data), remove the rest, release what is held.
A run whose process is alive, or that is paused on purpose, is reported and left alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hvlab.backup import chain, thinmeta
from hvlab.flow import engine, unwind
from hvlab.flow.context import Ctx, Say, quiet
from hvlab.guest.quiesce import recover_after_crash
from hvlab.lab import links, poolhealth, runs
from hvlab.lab.handle import Lab
from hvlab.lab.paths import REFERENCE_TAG, ROLE_TAG, Names
from hvlab.lab.record import Artifact, Disk, Run, Vm
from hvlab.sys import dm
from hvlab.sys.lvm import LvRow

HYPERV = {"C": "lingering backup checkpoint (GUID.avhdx): merged if the guest wrote to it",
          "A": "leftover auto-recovery checkpoint (GUID-AutoRecovery.avhdx, KB3175561)",
          "S_B": "external snapshot (host shadow copy) of B",
          "S_A": "external snapshot (host shadow copy) of A",
          "D": "the guest's shadow copy diff area (2012)",
          "S_D": "external snapshot (host shadow copy) of the diff area D (2012)"}
ROLE_ART: dict[str, list[Artifact]] = {ROLE_TAG["C"]: ["C"], ROLE_TAG["A"]: ["A"],
                                       ROLE_TAG["S_B"]: ["S_B", "S_A", "S_D"],
                                       ROLE_TAG["D"]: ["D"]}


@dataclass
class Report:
    done: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)


class _Orphans(Ctx):
    """A run rebuilt from LVM tags for artifacts whose run record is gone: never saved."""

    def save(self) -> None:
        pass


def recover(lab_name: str, *, say: Say = quiet) -> Report:
    lab = Lab.open(lab_name)
    rep = Report()
    states = [(r, runs.effective_state(r)) for r in runs.all_runs(lab.names)]
    pool = poolhealth.health(lab.names)
    blocked = False  # a failed pool that cannot be repaired now: nothing of LVM's can be done
    if pool is not None and pool.failed:
        blocked = any(state in ("running", "aborting") for _, state in states)
        if blocked:
            rep.left.append(f"{pool.describe(lab.names)}: not repaired while a backup "
                            f"process runs")
        else:
            lab = _repair_pool(lab, pool, rep, say)
            # A paused run cannot go on: the restart took down what it held (snapshots,
            # off-host links, attach devices). It ends like a dead one.
            states = [(r, "interrupted" if s == "paused" else s) for r, s in states]
    pending: set[str] = set()
    for r, state in states:
        if state in ("running", "paused"):
            how = (f"running in process {r.pid}" if state == "running"
                   else "paused on purpose: `hvlab backup --resume` or `--abort` it")
            rep.left.append(f"run {r.id} ({', '.join(r.vms)}) {how}")
            pending.add(r.id)
    if blocked:
        return rep
    for r, state in states:
        if state == "interrupted":
            notes = engine.abort(lab.name, r.id, say=say).unwound or []
            rep.done.append(f"run {r.id} died after step {r.last_step or 0}: aborted it "
                            f"({'; '.join(notes) or 'nothing left to undo'})")
    _orphans(lab, pending, rep, say)
    _links(lab, pending, rep)
    _stray_references(lab, pending, rep)
    _held(lab, rep)
    for vm in lab.state.definition.vms:
        thawed = recover_after_crash(lab.names.guest_dir(vm.name)).get("thawed")
        if thawed:
            rep.done.append(f"{vm.name}: a dead guest's freeze marker: thawed {thawed}")
    return rep


def _repair_pool(lab: Lab, pool: poolhealth.Health, rep: Report, say: Say) -> Lab:
    """Stop the lab and bring it up again, with the VMs' locks held as a backup holds them
    (none may start meanwhile). Returns the lab as it is now."""
    say(f"{pool.describe(lab.names)}: stopping the lab and bringing it up again (LVM checks "
        f"the pool's metadata as it activates it)")
    with runs.VmLocks(lab.names, [vm.name for vm in lab.state.definition.vms]):
        poolhealth.repair(lab.names, say)
    rep.done.append(f"thin pool {lab.names.vg}/{lab.names.pool} had failed in the kernel "
                    f"(mode {pool.mode}): the lab was stopped and brought up again, LVM's "
                    f"thin_check passed and the pool writes again")
    return Lab.open(lab.name)


def _orphans(lab: Lab, pending: set[str], rep: Report, say: Say) -> None:
    """Artifacts tagged with a run that is gone or over: rebuilt per run and unwound."""
    by_run: dict[str, Run] = {}
    for row in lab.lvs().values():
        role = next((t for t in sorted(row.tags) if t in ROLE_ART), None)
        run_id, vm, disk = row.tag_value("run_"), row.tag_value("vm_"), row.tag_value("disk_")
        if role is None or not (run_id and vm and disk) or run_id in pending:
            continue
        r = by_run.setdefault(run_id, Run(id=run_id, lab=lab.name, vms=[], dest="",
                                          created=0.0, vm={}, mode="recovered"))
        if vm not in r.vm:
            r.vms.append(vm)
            r.vm[vm] = Vm(profile="?", disks={})
        rec = r.vm[vm].disks.setdefault(disk, Disk(B=lab.names.lv(vm, disk),
                                                   ctl=lab.names.ctl(vm, disk), size=0, fs=""))
        art = _artifact(row, ROLE_ART[role], vm, disk, run_id)
        setattr(rec, art, row.name)
        rec.set_exists(art, True)
        rep.done.append(f"{vm}/{disk}: {row.name}: {HYPERV[art]}")
    for r in by_run.values():
        for v, name, rec in r.disks():
            rec.ar_ctl = lab.names.ar_ctl(v, name)
        with runs.VmLocks(lab.names, r.vms):
            notes = unwind.unwind(_Orphans(lab, r, say, fingerprints=False), final="aborted",
                                  record=False)
        rep.done += [f"  {n}" for n in notes]
    # attach devices of step 10 whose run is gone
    ours = {lab.names.ar_ctl(v.name, d.name) for v in lab.state.definition.vms
            for d in v.disks}
    for dev in dm.list_devices():
        if dev.name in ours and dev.uuid.startswith(lab.names.uuid_prefix):  # by uuid
            ctx = _Orphans(lab, Run(id="-", lab=lab.name, vms=[], dest="", created=0.0,
                                    vm={}), quiet)
            ctx.detach_ar(dev.name)
            rep.done.append(f"{dev.name}: auto-recovery attach device (A attached to the "
                            f"guest in step 10): detached")


def _artifact(row: LvRow, arts: list[Artifact], vm: str, disk: str, run_id: str) -> Artifact:
    """Which artifact of its role an LV is (S_B and S_A share role_external)."""
    return next((a for a in arts if row.name == Names.artifact_lv(vm, disk, a, run_id)), arts[0])


def _links(lab: Lab, pending: set[str], rep: Report) -> None:
    """Off-host links (namespaces, veths, nbdkit) of runs that are over or gone."""
    for run_id in sorted(links.runs_with_links(lab.names) - pending):
        rep.done += [f"off-host link of run {run_id}: removed {x}"
                     for x in links.clean(lab.names, run_id)]


def _stray_references(lab: Lab, pending: set[str], rep: Report) -> None:
    """Reference points no chain names (a run killed in step 14, then aborted): of no use,
    and they pin the blocks they map."""
    named = {str(c.get("reference")) for c in chain.load(lab.names).values()}
    stray = [n for n, r in lab.lvs().items() if REFERENCE_TAG in r.tags and n not in named
             and r.tag_value("run_") not in pending]
    if stray:
        lab.lvm("lvremove", "-q", "-y", *[f"{lab.names.vg}/{n}" for n in stray])
        rep.done += [f"{n}: reference point of no chain (a dead run's): removed" for n in stray]


def _held(lab: Lab, rep: Report) -> None:
    """A pool metadata snapshot a killed process still holds (the pool has only one)."""
    fields = thinmeta.pool_status(lab.names, check=False)
    if len(fields) > 3 and fields[3] != "-":
        with thinmeta.metadata_snap(lab.names):
            pass  # taking it under the flock releases a stale one; leaving releases ours
        rep.done.append("pool metadata snapshot held by a dead process: released")
