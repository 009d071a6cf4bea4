"""Hyper-V 2012 (and 2008 R2) and 2016 as plans of steps beside 2012 R2's (steps.py), in
hvlab's words, from the same actions where the generations agree.

Sources: Microsoft's history of Hyper-V backup (MicrosoftDocs/Virtualization-Documentation,
prospective-docs/Hyper-V-Backup-2016.md); Veeam's "Online Backup" pages for Hyper-V 2012 and
for 2016 and later. docs/generations.md says where a model is inferred.
"""

from __future__ import annotations

from hvlab.flow import actions, job, shadow
from hvlab.flow.model import Model, Step

STEPS_2012: tuple[Step, ...] = (
    Step(1, "request",
         "Veeam asks the host's VSS service for a backup of the VM.",
         "records the request, as in 2012 R2", True, phase="request"),
    Step(2, "pass to guest",
         "The host's Hyper-V VSS writer passes the request to the integration components "
         "in the guest.",
         "identify the guest; choose the consistency class", True, phase="guest"),
    Step(3, "guest requestor",
         "The integration components act as a VSS requestor inside the guest.",
         "guest `prepare`", True, phase="guest"),
    Step(4, "quiesce",
         "The guest's VSS writers quiesce their applications.",
         "LVM makes D of every disk (the guest's diff area, thin, empty) before the window; "
         "guest `freeze` (window opens)", True, True, phase="freeze", flush_before=True),
    Step(5, "internal snapshot",
         "The guest takes its own shadow copy with its software provider: the copy-on-write "
         "store lives on the VM's own disks.",
         "G = dm-snapshot of B, its store on D; the controller becomes B's snapshot-origin "
         "(the guest's writes to B first save the old chunk in D). T0", True, True,
         phase="T0"),
    Step(6, "thaw",
         "The guest returns to read-write; the shadow copy is handed to the integration "
         "components.",
         "guest `thaw` (window closes); the VM keeps writing to B", True, phase="thaw",
         mark="T0"),
    Step(7, "ready",
         "The integration components tell the hypervisor the VM is ready.",
         "guest `status`: thawed", True, phase="thaw"),
    Step(8, "guest auto-recovery",
         "Inside the guest, the writers fix up the guest's shadow copy before it is made "
         "read-only (inferred: see docs/generations.md).",
         "guest `post_snapshot` on G: the fix-ups land in D, never on B (windows only)",
         True, phase="auto-recovery"),
    Step(9, "external snapshot",
         "The host's VSS provider takes a shadow copy of the volume holding the VM's disks; "
         "time has passed since the guest's snapshot, so the disks in it are not consistent.",
         "S = writable thin snapshots of B and D of every disk, controllers and G held",
         False, phase="host snapshot", flush_before=True),
    Step(10, "auto-recovery (roll back)",
         "The host's Hyper-V writer mounts the VM's disks from its shadow copy and rolls them "
         "back to the guest's snapshot: every change after the internal snapshot is "
         "discarded.",
         "snapshot-merge of S_D into S_B: S_B becomes G (B at T0 with the guest's fix-ups); "
         "S_B made read-only", False, phase="auto-recovery"),
    Step(11, "read",
         "The volume shadow copy is presented to Veeam, which reads the VM's disks from it.",
         "read the blocks the pool maps for the rolled-back S_B into sparse images", False,
         phase="read", mark="before the merge"),
    Step(12, "delete snapshots",
         "The host's shadow copy is deleted; the guest deletes its own.",
         "remove S_B and S_D; each controller back to a plain map of B; remove G and D",
         False, phase="cleanup", flush_before=True),
)

STEPS_2016: tuple[Step, ...] = (
    Step(1, "request",
         "Veeam asks Hyper-V (WMI) for a recovery checkpoint of the VM.",
         "records the request, as in 2012 R2", True, phase="request"),
    Step(2, "pass to guest",
         "Hyper-V's management service asks the guest to prepare (VSS for Windows, a "
         "filesystem freeze for Linux).",
         "identify the guest; choose the consistency class", True, phase="guest"),
    Step(3, "guest requestor",
         "The integration services act as the VSS requestor inside the guest.",
         "guest `prepare`", True, phase="guest"),
    Step(4, "quiesce",
         "The guest's writers quiesce their applications.",
         "LVM allocates C and A of every disk before the window; guest `freeze`", True, True,
         phase="freeze", flush_before=True),
    Step(5, "recovery checkpoint",
         "Hyper-V creates the recovery checkpoint: every virtual disk gets an AVHDX that takes "
         "all new writes; the VHDX below it is the point in time.",
         "C = B now per disk (the same kernel path as 2012 R2's step 5): live writes go to C",
         True, True, phase="checkpoint"),
    Step(6, "auto-recovery checkpoint",
         "The guest's snapshot is forked for its writers' fix-ups, as in 2012 R2 (inferred: "
         "see docs/generations.md).",
         "A = writable thin snapshot of B per disk (sibling of C)", True, True,
         phase="checkpoint"),
    Step(7, "internal snapshot",
         "The guest's shadow copy commits through the Hyper-V provider: the checkpoint is "
         "application-consistent.",
         "T0: C exists and the controller points at it", True, True, phase="T0"),
    Step(8, "thaw",
         "The guest resumes.",
         "guest `thaw` (window closes)", True, phase="thaw", mark="T0"),
    Step(9, "ready",
         "The checkpoint is ready for the backup application.",
         "guest `status`: thawed", True, phase="thaw"),
    Step(10, "auto-recovery",
         "The guest's writers fix up the forked snapshot.",
         "attach A, guest `post_snapshot` repairs A, detach (windows only)", True,
         phase="auto-recovery", mark="after auto-recovery"),
    Step(11, "read",
         "Veeam reads the checkpoint (no host shadow copy); with resilient change tracking, "
         "only the blocks changed since the last reference point.",
         "read the blocks the pool maps for A (incremental: thin_delta from the reference "
         "point) while the VM writes to C", False, phase="read", mark="before the merge"),
    Step(12, "merge, reference point",
         "The checkpoint is merged into the VM; with change tracking it becomes a reference "
         "point for the next incremental.",
         "A kept as the reference point (incremental) or removed; C merged into B", False,
         phase="cleanup", flush_before=True),
)

MODEL_2016 = Model(
    "2016", "Hyper-V 2016: recovery checkpoint C (with A for the guest's fix-ups), no host "
    "shadow copy, read from the checkpoint, reference points for change tracking",
    STEPS_2016,
    {1: actions.request, 2: actions.pass_to_guest, 3: actions.guest_requestor,
     4: actions.quiesce, 5: actions.backup_checkpoint, 6: actions.auto_recovery_checkpoint,
     7: actions.internal_snapshot, 8: actions.thaw, 9: actions.ready,
     10: actions.auto_recovery, 11: job.read, 12: job.merge},
    checkpoints=("C", "A"), source="A", base="B",
    points=("s05-one", "s05-snapshots", "s05-reloaded", "s06-one", "s10-attached",
            "s10-recovered", "s13-metadata", "s13-reading", "s13-image", "s14-references",
            "s14-one", "s14-base-removed", "s14-renamed", "finish-manifest"),
    artifacts=("B", "C", "A"))

MODEL_2012 = Model(
    "2012", "Hyper-V 2012 and 2008 R2: no checkpoint in the chain; the guest's own shadow "
    "copy on its disks, the host's shadow copy of the volume rolled back to it",
    STEPS_2012,
    {1: actions.request, 2: actions.pass_to_guest, 3: actions.guest_requestor,
     4: actions.quiesce, 5: shadow.guest_shadow_copy, 6: actions.thaw, 7: actions.ready,
     8: shadow.guest_auto_recovery, 9: shadow.external_snapshot, 10: shadow.roll_back,
     11: job.read, 12: shadow.delete},
    checkpoints=("D",), source="S_B", base="S_B", allocate=shadow.allocate_diff_areas,
    points=("gs-made", "gs-origin", "gs-recovered", "rv-merging", "s13-metadata",
            "s13-reading", "s13-image", "gs-dropped", "finish-manifest"),
    artifacts=("B", "D", "S_B", "S_D"))
