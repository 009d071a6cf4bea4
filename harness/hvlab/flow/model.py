"""A Hyper-V generation's backup as data: its steps and the lab action of each (steps.py
holds 2012 R2's, generations.py 2012's and 2016's)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hvlab.errors import BadInput
from hvlab.lab.record import Artifact

# An action takes the run's Ctx and its VM (None for a job step); typed loosely here, as the
# context imports this module (the actions themselves are typed).
Action = Callable[..., dict[str, Any]]


@dataclass(frozen=True)
class Step:
    number: int
    name: str
    veeam: str
    lab: str
    per_vm: bool
    in_freeze: bool = False
    # Where the generations line up (the compare picture's shared axis): request, guest,
    # freeze, T0, thaw, auto-recovery, host snapshot, read, cleanup.
    phase: str = ""
    # Hash the artifacts after this step (the invariants need content there): its label.
    mark: str | None = None
    # A background hash still running ends first (a freeze window, or a step that suspends
    # or removes what it reads).
    flush_before: bool = False


@dataclass(frozen=True)
class Model:
    """One Hyper-V generation: its steps, what each does in the lab, and its artifacts."""

    name: str
    title: str
    steps: tuple[Step, ...]
    actions: dict[int, Action]
    checkpoints: tuple[Artifact, ...]  # allocated per disk before the window (step 4)
    source: Artifact  # what the backup's image is read from
    base: Artifact  # B at T0 as the backup job sees it (the auto-recovery delta's left side)
    # Step 4's allocation before the window (None: C and A, actions.allocate_checkpoints).
    allocate: Action | None = None
    points: tuple[str, ...] = ()  # the fault points inside steps that this model passes
    # Its artifacts per disk (the explain picture's lanes).
    artifacts: tuple[Artifact, ...] = ("B", "C", "A", "S_B", "S_A")

    def step(self, number: int) -> Step:
        return self.steps[number - 1]

    @property
    def last(self) -> int:
        return self.steps[-1].number

    @property
    def freeze_steps(self) -> frozenset[int]:
        return frozenset(s.number for s in self.steps if s.in_freeze)

    @property
    def fault_points(self) -> list[str]:
        """Every fault point a run of this model passes: the step boundaries, the end, and
        the points inside its steps."""
        return [f"step-{s.number:02d}" for s in self.steps] + ["finish", *self.points]

    def plan(self, vms: list[str]) -> list[tuple[int, str | None]]:
        """The order of execution: the per-VM steps VM by VM, then the job's steps once."""
        out: list[tuple[int, str | None]] = []
        for vm in vms:
            out += [(s.number, vm) for s in self.steps if s.per_vm]
        out += [(s.number, None) for s in self.steps if not s.per_vm]
        return out

    def pause_position(self, vms: list[str], after: int | None) -> int | None:
        """Index in plan(vms) after which to pause (the last VM's step N), or None."""
        if after is None:
            return None
        fz = self.freeze_steps
        if after in fz:
            raise BadInput(f"cannot pause after step {after}: steps {min(fz)}-{max(fz)} are "
                           f"inside the guest's freeze window, and a paused run must never "
                           f"hold a guest frozen")
        if not 1 <= after < self.last:
            raise BadInput(f"--pause-after must be a step from 1 to {self.last - 1} (not "
                           f"{min(fz)}-{max(fz)}), got {after}")
        p = self.plan(vms)
        return max(i for i, (n, _) in enumerate(p) if n == after)
