"""One process working on one run: the lab, the run record, the console, and the names and
device facts every step needs."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hvlab.backup import thinmeta
from hvlab.errors import HvlabError
from hvlab.flow.guards import Guards
from hvlab.flow.lvmview import LvmView
from hvlab.flow.model import Model
from hvlab.guest.client import GuestClient, GuestError
from hvlab.guest.quiesce import recover_after_crash
from hvlab.lab import guests, live, runs
from hvlab.lab.handle import Lab
from hvlab.lab.paths import ROLE_TAG, Names
from hvlab.lab.record import Artifact, Disk, Event, Run, Vm
from hvlab.sys import dm, fs
from hvlab.sys.uevents import Recorder, wait_node

Say = Callable[[str], None]


def quiet(_: str) -> None:
    pass


@dataclass
class Observer:
    """What the recorder (observe.py) keeps across a run's steps."""

    fingerprints: bool = True  # hash the artifacts at T0, after auto-recovery, before merge
    uevents: Recorder = field(default_factory=Recorder)  # the running step's
    block_digests: dict[int, bytes] = field(default_factory=dict)  # data block -> sha256
    last_dump: thinmeta.Dump | None = None  # step 13's metadata, for its hashes
    pending: tuple[Event, Any] | None = None  # a step's event, and the pool hashing it
    pending_future: Any = None


class Ctx:
    def __init__(self, lab: Lab, run: Run, say: Say = quiet, fingerprints: bool = True,
                 model: Model | None = None) -> None:
        self.lab = lab
        self._model = model
        self.names = lab.names
        self.view = LvmView(lab)  # LVM's view of the VG: one report, read again when stale
        self.run = run
        # Between a guest's freeze and its thaw the run record and events are written whole
        # but not fsync'd (each fsync costs tens of ms in the lab VM): a killed process loses
        # nothing by it, and after a power loss the guest is gone and recovery goes by what
        # exists (LVs, the live record, which is fsync'd). The thaw's save makes all durable.
        self.in_window = False
        self.say = say
        self.progress: Any = None  # a rich Progress for step 13, when on a terminal
        self.thin_ids: dict[str, int] = {}  # an LV's thin id never changes
        self.guards = Guards(frozen=lambda vm: self.vm(vm).frozen)
        self.obs = Observer(fingerprints)

    def save(self) -> None:
        runs.save(self.names, self.run, durable=not self.in_window)

    @property
    def model(self) -> Model:
        """The run's Hyper-V generation: its steps, actions and artifacts (the engine gives
        it; an unwind of orphans needs none)."""
        if self._model is None:
            raise HvlabError(f"run {self.run.id}: no Hyper-V model given to its context")
        return self._model

    def vm(self, vm: str) -> Vm:
        return self.run.vm[vm]

    def disks(self, vm: str | None = None) -> list[tuple[str, str, Disk]]:
        return self.run.disks(vm)

    def client(self, vm: str, timeout: float = 10.0) -> GuestClient:
        return GuestClient(guests.socket_path(self.names, vm), timeout=timeout)

    def thaw_window(self, vm: str) -> list[str]:
        """Close VM's freeze window any way there is: the guest's abort, else (a dead or hung
        guest) from the freeze marker it left; then its guard ends. Safe to call any time."""
        notes = []
        if self.vm(vm).answers:
            try:
                if self.client(vm).abort().get("thawed"):
                    notes.append(f"{vm}: thawed by abort")
            except GuestError as exc:
                notes.append(f"{vm}: abort: {exc}")
        rec = recover_after_crash(self.names.guest_dir(vm))
        if rec.get("thawed"):
            notes.append(f"{vm}: recovered freeze marker, thawed {rec['thawed']}")
        self.guards.windows.close(vm)
        self.vm(vm).frozen = False
        return notes

    def lv_dev(self, lv: str) -> str:
        return f"/dev/mapper/{self.names.dm_lv_name(lv)}"

    def vg_lv(self, lv: str) -> str:
        return f"{self.names.vg}/{lv}"

    def tags(self, role: str, vm: str, disk: str) -> list[str]:
        out = []
        for t in (self.names.tag, role, f"vm_{vm}", f"disk_{disk}", f"run_{self.run.id}"):
            out += ["--addtag", t]
        return out

    def snapshot_argv(self, origin: str, name: str, art: Artifact, vm: str, disk: str,
                      read_only: bool = False) -> list[str]:
        """lvcreate of a thin snapshot of origin, tagged with its role, active (-kn)."""
        return ["lvcreate", "-q", "-s", "-kn", *(["-pr"] if read_only else []),
                "-n", name, *self.tags(ROLE_TAG[art], vm, disk), self.vg_lv(origin)]

    def snapshot(self, origin: str, name: str, art: Artifact, vm: str, disk: str,
                 read_only: bool = False) -> None:
        """A thin snapshot of origin, tagged with its role, active (-kn), node waited for."""
        self.view.lvm(*self.snapshot_argv(origin, name, art, vm, disk, read_only))
        wait_node(self.lv_dev(name))

    # --- what the kernel says ---------------------------------------------------------------
    def mapped_lv(self, disk: Disk) -> str | None:
        """The LV the disk's controller maps now (sysfs: no command run)."""
        name = dm.slave_name(disk.ctl)
        prefix = f"{self.names.vg}-"
        if name is None or not name.startswith(prefix):
            return None
        return name[len(prefix):].replace("--", "-")

    def maps(self, disk: Disk, lv: str | None) -> bool:
        """Does the controller map lv? An LV left inactive by a kill inside lvcreate has no
        node, so nothing maps it."""
        if not lv or not os.path.exists(self.lv_dev(lv)):
            return False
        return dm.target_of(disk.ctl) == dm.majmin(self.lv_dev(lv))

    def sync_live(self, vm: str | None = None) -> None:
        """Record, per disk, the LV its controller maps now (what a restarted lab maps)."""
        for v, d, disk in self.disks(vm):
            lv = self.mapped_lv(disk)
            # C by its name, not the record: the step-5 guard runs this in a copy of the
            # process forked before C was named.
            if lv is not None and lv in (disk.B, Names.artifact_lv(v, d, "C", self.run.id)):
                live.record(self.names, v, d, lv)

    def detach_ar(self, name: str) -> bool:
        """Remove an auto-recovery attach device; first unmount it where a killed guest left
        it mounted (only mounts inside the lab dir: nothing else is ours). True if it
        existed."""
        if not any(x.name == name for x in dm.list_devices()):
            return False
        node = os.path.realpath(f"/dev/mapper/{name}")
        for m in fs.mounts_under(self.names.dir):
            if m.source.startswith("/dev/") and os.path.realpath(m.source) == node:
                fs.umount(Path(m.target))
                for d in (Path(m.target), Path(m.target).parent):  # the guest's ar-XXXX/<disk>
                    with contextlib.suppress(OSError):
                        d.rmdir()
        dm.remove(name)
        return True


def thin_ids(ctx: Ctx, lvs: list[str]) -> dict[str, int]:
    """Thin device ids of lvs from the kernel's tables (`0 N thin <pool> <id>`), read by
    ioctl (no command run)."""
    want = {ctx.names.dm_lv_name(lv): lv for lv in lvs if lv not in ctx.thin_ids}
    if want:
        for name, fields in thinmeta.thin_tables().items():
            if name in want and len(fields) >= 5 and fields[2] == "thin":
                ctx.thin_ids[want[name]] = int(fields[4])
    return {lv: ctx.thin_ids[lv] for lv in lvs if lv in ctx.thin_ids}
