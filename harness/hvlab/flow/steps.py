"""The steps of a host-level Hyper-V backup, as data, and the lab action of each: one
`Model` per Hyper-V generation (`MODELS`: 2012, 2012r2, 2016), each with its own step texts
and an explicit table of actions built from the same functions where the generations agree.

2012 R2 (the default) is Veeam's 14 steps in Veeam's wording, as users quote it: steps 1-10
per VM (each VM its own freeze window, steps 4-7), 11-14 once for the whole job. The other
two generations are in hvlab's words (generations.py), checked against Microsoft's and
Veeam's descriptions; docs/generations.md says where a model is inferred.
"""

from __future__ import annotations

from dataclasses import replace

from hvlab.errors import BadInput
from hvlab.flow import actions, faults, generations, job
from hvlab.flow.model import Action, Model, Step

STEPS: tuple[Step, ...] = (
    Step(1, "request",
         "Veeam Backup & Replication interacts with the Microsoft Hyper-V host VSS Service and "
         "requests backup of a specific VM.",
         "records the request: before it the job registered the run (run record, backup "
         "directory), refused leftovers of earlier runs and locked the VM", True),
    Step(2, "pass to guest",
         "The Microsoft VSS Writer on the Microsoft Hyper-V host passes the request to the "
         "Microsoft Hyper-V Integration Components (HV-IC) installed inside the VM guest OS.",
         "identify the guest over its integration-services socket; choose the consistency "
         "class (no answer: crash-consistent)", True),
    Step(3, "guest requestor",
         "The HV-IC acts as a VSS Requestor for the framework inside the VM. It communicates "
         "with this framework and requests backup of Microsoft VSS-aware applications running "
         "on the VM.",
         "guest `prepare`", True),
    Step(4, "quiesce",
         "VSS Writers for Microsoft VSS-aware applications on the VM are instructed to quiesce "
         "application data.",
         "LVM allocates C and A of every disk (before the window; the job's first step 4 "
         "does it for every VM, in one lvm process); guest `freeze`: writers hold, FIFREEZE "
         "on every disk of the VM (window opens)", True,
         True),
    Step(5, "backup checkpoint",
         "After the applications are quiesced, Microsoft Hyper-V VSS takes a backup checkpoint "
         "of the VM. Every virtual disk of a VM receives a temporary file named GUID.avhdx. All "
         "new writes that occur to the VM until the volume snapshot is taken are redirected to "
         "this file",
         "C = B now, per disk: controllers and origins suspended together, the pool "
         "snapshots each B into its C (create_snap, by ioctl), every controller loaded onto "
         "C, resumed: live writes go to C", True, True),
    Step(6, "auto-recovery checkpoint",
         "Right after taking the backup checkpoint, Microsoft Hyper-V VSS takes another "
         "auxiliary checkpoint - auto-recovery checkpoint. Every virtual disk of a VM receives "
         "a temporary file named GUID-Autorecovery.avhdx. [...] it is taken independently in a "
         "new checkpoint chain.",
         "A = writable thin snapshot of B per disk (sibling of C), the pool's, into the LV "
         "step 4 allocated", True, True),
    Step(7, "internal snapshot",
         "The framework inside the VM takes an internal snapshot using a Microsoft Hyper-V "
         "Integration Services Shadow Copy provider in the VM guest OS.",
         "T0: the guest's shadow copy commits = C exists and the controller points at it", True,
         True),
    Step(8, "snapshot to HV-IC",
         "The created internal snapshot is passed to the HV-IC.",
         "guest `thaw` (window closes; its length is recorded, limit 10 s)", True),
    Step(9, "ready",
         "The HV-IC notifies the hypervisor that the VM is ready for backup.",
         "guest `status`: thawed, no flush-and-hold timeout", True),
    Step(10, "auto-recovery",
         "Microsoft Hyper-V VSS performs auto-recovery - it mounts the auto-recovery checkpoint "
         "to the VM, rolls back data on the VM to the consistent state.",
         "attach A as dm-linear `ar` controllers, guest `post_snapshot` repairs A, detach "
         "(windows only)", True),
    Step(11, "external snapshot",
         "The Microsoft Hyper-V host VSS provider takes a snapshot of a volume on which VM "
         "disks are located (external snapshot).",
         "S = read-only thin snapshots of B and A of every disk of every VM in the job", False),
    Step(12, "drop auto-recovery",
         "The auto-recovery checkpoint is merged with the original VM.",
         "remove A from the live side (it lives on in S)", False),
    Step(13, "read",
         "The volume snapshot is presented to VBR. Veeam Backup & Replication reads VM data "
         "from the volume snapshot in one of two backup modes - on-host backup or off-host "
         "backup.",
         "read the blocks the pool has mapped for S_A into sparse images (on-host)", False),
    Step(14, "delete snapshot, merge",
         "After the backup is complete, the volume snapshot is deleted, and the backup "
         "checkpoint is merged with the original VM",
         "remove S; merge C into B: remove B, rename C to B's name (the controller already "
         "maps C: no interruption)", False),
)

def _with(steps: tuple[Step, ...], phases: dict[int, str], marks: dict[int, str],
          flush: set[int]) -> tuple[Step, ...]:
    return tuple(replace(st, phase=phases[st.number], mark=marks.get(st.number),
                         flush_before=st.number in flush) for st in steps)


STEPS = _with(STEPS, {1: "request", 2: "guest", 3: "guest", 4: "freeze", 5: "checkpoint",
                      6: "checkpoint", 7: "T0", 8: "thaw", 9: "thaw", 10: "auto-recovery",
                      11: "host snapshot", 12: "cleanup", 13: "read", 14: "cleanup"},
              # B and A at T0 (after the thaw, outside the window), A after auto-recovery,
              # B and S before the merge.
              {8: "T0", 10: "after auto-recovery", 13: "before the merge"},
              # step 4 opens a window; step 11 suspends A and B to snapshot them.
              {4, 11})


# What the lab does at each step: steps 1-10 for one VM (actions.py), 11-14 for the job (job.py).
ACTIONS: dict[int, Action] = {
    1: actions.request,
    2: actions.pass_to_guest,
    3: actions.guest_requestor,
    4: actions.quiesce,
    5: actions.backup_checkpoint,
    6: actions.auto_recovery_checkpoint,
    7: actions.internal_snapshot,
    8: actions.thaw,
    9: actions.ready,
    10: actions.auto_recovery,
    11: job.external_snapshot,
    12: job.remove_auto_recovery,
    13: job.read,
    14: job.merge,
}

MODELS: dict[str, Model] = {
    "2012r2": Model("2012r2", "Hyper-V 2012 R2: backup checkpoint C and auto-recovery "
                    "checkpoint A, host shadow copy S of B and A, C merged",
                    STEPS, ACTIONS, ("C", "A"), "S_A", "S_B",
                    points=tuple(p for p in faults.INSIDE if p[0] in "sf")),
    "2012": generations.MODEL_2012,
    "2016": generations.MODEL_2016,
}
DEFAULT = "2012r2"


def model(name: str) -> Model:
    try:
        return MODELS[name]
    except KeyError:
        raise BadInput(f"unknown Hyper-V model {name!r}: one of "
                       f"{', '.join(sorted(MODELS))}") from None


BY_NUMBER = {s.number: s for s in STEPS}
FREEZE_STEPS = MODELS[DEFAULT].freeze_steps
LAST = STEPS[-1].number


def step(number: int) -> Step:
    return BY_NUMBER[number]


def plan(vms: list[str], name: str = DEFAULT) -> list[tuple[int, str | None]]:
    return model(name).plan(vms)


def pause_position(vms: list[str], after: int | None, name: str = DEFAULT) -> int | None:
    return model(name).pause_position(vms, after)
