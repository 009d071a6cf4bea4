"""The run record of a backup, typed: one `Run` with a `Vm` per VM and a `Disk` per disk.

Stored as `runs/<id>/run.json` (see `runs.py`); the JSON keys are the field names, except
`Vm.cls` which is stored as "class". The engine, the manifest, explain and the commands all
read these types; nothing reads the JSON by string keys.

Artifacts per disk: B (the live disk, frozen at T0), C (backup checkpoint), A (auto-recovery
checkpoint), S_B and S_A (the external snapshot set); in the 2012 model also D (the guest's
shadow copy's diff area, on the VM's storage) and S_D (the host's snapshot of it). `<art>`
names the LV, `<art>_exists` says whether the run made it and has not removed it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

Artifact = Literal["B", "C", "A", "S_B", "S_A", "D", "S_D"]
ARTIFACTS: tuple[Artifact, ...] = ("B", "C", "A", "S_B", "S_A", "D", "S_D")
ACTIVE = ("running", "paused", "aborting")
FINAL = ("done", "failed", "aborted")


def _plain(obj: Any) -> dict[str, Any]:
    """A record dataclass's fields as a dict, for JSON, made at once: a run is saved a few
    times per step, and `asdict` (a deep copy of everything) costs more than the write.
    Nested records become dicts; lists and dicts are shared, not copied (serialize now)."""
    return {f.name: _value(getattr(obj, f.name)) for f in fields(obj)}


def _value(v: Any) -> Any:
    if isinstance(v, Vm):
        return v.to_dict()
    if isinstance(v, (Disk, Window)):
        return _plain(v)
    if isinstance(v, dict):
        return {k: _value(x) for k, x in v.items()}
    return v


def _pick(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """The keys of data that are fields of cls: older or newer records still load."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


@dataclass
class Disk:
    B: str
    ctl: str
    size: int
    fs: str
    C: str | None = None
    C_exists: bool = False
    c_created_at: float | None = None
    redirected: bool = False  # the controller maps C (step 5 done)
    merged: bool = False  # C took B's place (step 14 or an unwind)
    A: str | None = None
    A_exists: bool = False
    ar_ctl: str | None = None  # the auto-recovery attach device of step 10
    S_B: str | None = None
    S_B_exists: bool = False
    S_A: str | None = None
    S_A_exists: bool = False
    D: str | None = None  # 2012: the guest's diff area (its shadow copy's copy-on-write store)
    D_exists: bool = False
    S_D: str | None = None
    S_D_exists: bool = False
    shadow: str | None = None  # 2012: the guest's shadow copy (a dm-snapshot of B on D)
    reverted: dict[str, Any] | None = None  # 2012: S_B rolled back to the guest's snapshot
    # Allocated before the window: artifact -> {lv, thin_id, uuid} (flow/checkpoint.py).
    slots: dict[str, dict[str, Any]] = field(default_factory=dict)
    skew_s: float | None = None  # C taken this long after the VM's first C (same suspension)

    def lv(self, art: Artifact) -> str | None:
        value: str | None = getattr(self, art)
        return value

    def exists(self, art: Artifact) -> bool:
        return art == "B" or bool(getattr(self, f"{art}_exists"))

    def set_exists(self, art: Artifact, value: bool) -> None:
        setattr(self, f"{art}_exists", value)

    def present(self) -> dict[Artifact, str]:
        """Artifact -> LV of everything this disk has now."""
        return {a: lv for a in ARTIFACTS if (lv := self.lv(a)) and self.exists(a)}


@dataclass
class Window:
    """The guest's flush-and-hold window (steps 4-8)."""

    freeze_start: float
    frozen_at: float | None = None
    open_txid: int | None = None
    thawed_at: float | None = None
    seconds: float | None = None  # the freeze request to the thaw's answer, as the host saw it
    # The filesystems frozen to the thaw's answer: what the 10 s flush-and-hold limit bounds
    # (the writers' quiesce before it has its own bound, as VSS gives writers).
    held_s: float | None = None
    guest_frozen_for_s: float | None = None


@dataclass
class Vm:
    profile: str
    disks: dict[str, Disk]
    answers: bool | None = None  # the integration services answered (step 2)
    cls: str | None = None  # consistency class: application-/filesystem-/crash-consistent
    frozen: bool = False
    auto_recovery: bool = False
    guest_profile: str | None = None
    no_answer: str | None = None
    writer_timeout_s: float | None = None  # how long the guest's writers may take to quiesce
    window: Window | None = None
    fallback: str | None = None  # why an application-aware backup fell back (policy try)
    freeze_reply: dict[str, Any] | None = None
    t0: float | None = None
    auto_recovery_result: dict[str, Any] | None = None

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Vm:
        d = dict(d)
        disks = {k: Disk(**_pick(Disk, v)) for k, v in d.pop("disks").items()}
        cls = d.pop("class", None)
        window = d.pop("window", None)
        vm = Vm(disks=disks, cls=cls, **_pick(Vm, {k: v for k, v in d.items()
                                                  if k not in ("disks", "cls")}))
        vm.window = Window(**_pick(Window, window)) if window else None
        return vm

    def to_dict(self) -> dict[str, Any]:
        d = _plain(self)
        d["class"] = d.pop("cls")
        return d


@dataclass
class Run:
    id: str
    lab: str
    vms: list[str]
    dest: str
    created: float
    vm: dict[str, Vm]
    state: str = "running"  # running | paused | aborting | done | failed | aborted
    mode: str = "on-host"
    model: str = "2012r2"  # the Hyper-V generation (flow/steps.py MODELS)
    incremental: bool = False  # asked for: each disk says what it got (images[..]["chain"])
    app_aware: str = "try"  # require | try | off: Veeam's application-aware processing
    pos: int = 0  # index into the plan of the next step
    pause_at: int | None = None
    pause_after: int | None = None
    last_step: int | None = None
    error: str | None = None
    pid: int | None = None
    pid_started: float | None = None
    updated: float | None = None
    dest_made: bool = False
    pre: dict[str, Any] | None = None  # LV set and pool usage before (invariant 8)
    post: dict[str, Any] | None = None
    snapshot_set: dict[str, Any] | None = None
    link: dict[str, Any] | None = None  # off-host: the proxy, the server, the bytes moved
    images: dict[str, dict[str, Any]] = field(default_factory=dict)
    pauses: list[list[float]] = field(default_factory=list)  # [paused at, resumed at]
    unwound: list[str] | None = None
    unwind_error: str | None = None

    def disks(self, vm: str | None = None) -> list[tuple[str, str, Disk]]:
        """(vm, disk name, disk) of one VM or of the whole job, in definition order."""
        vms = [vm] if vm else self.vms
        return [(v, d, info) for v in vms for d, info in self.vm[v].disks.items()]

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Run:
        vm = {k: Vm.from_dict(v) for k, v in d["vm"].items()}
        return Run(vm=vm, **_pick(Run, {k: v for k, v in d.items() if k != "vm"}))

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)


@dataclass
class Command:
    """One external command a step ran (the program log), or an ioctl named `dm-ioctl`."""

    argv: list[str]
    rc: int
    seconds: float


@dataclass
class Event:
    """What one step did, as `flow/observe.py` records it (one line of `events.jsonl`).

    `step` is None for an unwind's event. `detail` is the step's own report (its action's
    return value; `made`/`removed`/`merged` list artifacts as {vm, disk, artifact, lv}).
    `writes_to` is, per disk key "vm/disk", the LV the guest's controller maps after the
    step and its role letter. `fingerprints` (per disk key, per artifact) are there at T0,
    after auto-recovery and before the merge; None where the step was not hashed.
    `commands` is None for runs recorded before the program log.
    """

    run: str
    step: int | None
    name: str
    vm: str | None
    start: float
    end: float
    veeam: str = ""
    lab: str = ""
    in_freeze: bool = False
    detail: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    devices_created: list[str] = field(default_factory=list)
    devices_removed: list[str] = field(default_factory=list)
    commands: list[Command] | None = None
    writes_to: dict[str, dict[str, str | None]] = field(default_factory=dict)
    fingerprints: dict[str, dict[str, Any]] | None = None
    fingerprints_note: str | None = None
    observed_s: float | None = None

    @property
    def seconds(self) -> float:
        return self.end - self.start

    def writes(self, key: str) -> str | None:
        """The role letter the guest's writes on disk `key` go to after this step."""
        return (self.writes_to.get(key) or {}).get("artifact")

    def artifacts(self, what: str) -> list[tuple[str, str]]:
        """(disk key, artifact) of the detail's explicit list `what` (made/removed/merged)."""
        return [(f"{x['vm']}/{x['disk']}", str(x["artifact"]))
                for x in self.detail.get(what) or [] if isinstance(x, dict)]

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Event:
        cmds = d.get("commands")
        known = _pick(Event, {k: v for k, v in d.items() if k != "commands"})
        known["detail"] = known.get("detail") or {}
        known["writes_to"] = known.get("writes_to") or {}
        known["devices_created"] = known.get("devices_created") or []
        known["devices_removed"] = known.get("devices_removed") or []
        for key, default in (("run", ""), ("step", None), ("name", "?"), ("vm", None),
                             ("start", 0.0)):
            known.setdefault(key, default)  # a record older than these fields
        known.setdefault("end", known["start"])
        return Event(**known, commands=None if cmds is None else [
            Command(list(c["argv"]), int(c["rc"]), float(c["seconds"])) for c in cmds])

    def to_dict(self) -> dict[str, Any]:
        d = _plain(self)
        if self.commands is not None:
            d["commands"] = [_plain(c) for c in self.commands]
        return d
