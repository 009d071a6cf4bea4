"""One process working on one run: the lab, the run record, the console, and the names and
device facts every step needs."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hvlab.backup import thinmeta
from hvlab.errors import HvlabError
from hvlab.guest.client import GuestClient
from hvlab.lab import guests, live, runs
from hvlab.lab.handle import Lab
from hvlab.lab.paths import ROLE_TAG, Names
from hvlab.lab.record import Artifact, Disk, Event, Run, Vm
from hvlab.sys import dm, fs
from hvlab.sys.lvm import Lvm, LvRow
from hvlab.sys.run import Result
from hvlab.sys.uevents import Recorder, wait_node

Say = Callable[[str], None]


def quiet(_: str) -> None:
    pass


def _nothing() -> None:
    pass


REPORTS = frozenset({"lvs", "vgs", "pvs", "fullreport"})


@dataclass
class TrackedLvm(Lvm):
    """The lab's Lvm, telling its Ctx before any command that may change LVM's view: the
    Ctx's cached report is then read again when next needed (a command that failed or was
    killed half-way leaves nothing stale behind)."""

    changing: Callable[[], None] = _nothing

    def __call__(self, *args: str, check: bool = True, timeout: float = 120.0) -> Result:
        if not args or args[0] not in REPORTS:
            self.changing()
        return super().__call__(*args, check=check, timeout=timeout)

    def batch(self, commands: Sequence[Sequence[str]], *, timeout: float = 300.0) -> Result:
        self.changing()
        return super().batch(commands, timeout=timeout)


class BatchFailed(HvlabError):
    """An lvm batch left LVM short of what it was to make or remove."""


class Ctx:
    def __init__(self, lab: Lab, run: Run, say: Say = quiet, fingerprints: bool = True) -> None:
        self.lab = lab
        self.names = lab.names
        # One `lvs` (0.5 s of CPU in the lab VM) serves every question until a command
        # through self.lvm may have changed the answer; a new process reads afresh.
        self._rows: dict[str, LvRow] | None = None
        self.lvm: Lvm = TrackedLvm(lab.lvm.conf_dir, self.forget)
        self.run = run
        # Between a guest's freeze and its thaw the run record and events are written whole
        # but not fsync'd (each fsync costs tens of ms in the lab VM): a killed process loses
        # nothing by it, and after a power loss the guest is gone and recovery goes by what
        # exists (LVs, the live record, which is fsync'd). The thaw's save makes all durable.
        self.in_window = False
        self.uevents = Recorder()  # the running step's (observe.run_step sets it)
        self.say = say
        self.fingerprints = fingerprints
        self.progress: Any = None  # a rich Progress for step 13, when on a terminal
        self.block_digests: dict[int, bytes] = {}  # data block -> sha256 of its content
        self.thin_ids: dict[str, int] = {}  # an LV's thin id never changes
        self.last_dump: thinmeta.Dump | None = None  # step 13's metadata, for its hashes
        self.pending: tuple[Event, Any] | None = None  # (event, pool) hashing
        self.pending_future: Any = None

    def save(self) -> None:
        runs.save(self.names, self.run, durable=not self.in_window)

    def vm(self, vm: str) -> Vm:
        return self.run.vm[vm]

    def disks(self, vm: str | None = None) -> list[tuple[str, str, Disk]]:
        return self.run.disks(vm)

    def client(self, vm: str, timeout: float = 10.0) -> GuestClient:
        return GuestClient(guests.socket_path(self.names, vm), timeout=timeout)

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
        self.lvm(*self.snapshot_argv(origin, name, art, vm, disk, read_only))
        wait_node(self.lv_dev(name))

    def forget(self) -> None:
        """Drop the cached report: LVM's view may change."""
        self._rows = None

    def lvs(self, fresh: bool = False) -> dict[str, LvRow]:
        """Every LV of the lab's VG, from one `lvs` reused until a command through self.lvm
        may have changed it (or fresh)."""
        if self._rows is None or fresh:
            self._rows = self.lab.lvs()
        return self._rows

    def activated(self, lv: str, major: int, minor: int) -> None:
        """An LV activated by ioctl, not by LVM (steps 5 and 6): LVM's metadata is unchanged,
        so the cached report stays, with that row active. Kept, it spares every later VM of
        a job's step 4 an `lvs` (0.35-0.6 s in the lab VM)."""
        rows = self._rows
        if rows is None or lv not in rows:
            self.forget()
            return
        row = rows[lv]
        attr = row.attr[:4] + "a" + row.attr[5:] if len(row.attr) > 4 else row.attr
        rows[lv] = replace(row, attr=attr, active=True, major=major, minor=minor)

    def take(self, rows: dict[str, LvRow]) -> dict[str, LvRow]:
        """Keep a full `lvs` report read some other way (at the end of a batch)."""
        self._rows = dict(rows)
        return self._rows

    def exists(self, lv: str) -> bool:
        return lv in self.lvs()

    def remove_lvs(self, lvs: Sequence[str]) -> list[str]:
        """One lvremove for those of lvs that exist (a killed run may have removed some);
        returns them. The cached report stays valid: lvremove exits 0 only when all went."""
        rows = self.lvs()
        present = [lv for lv in dict.fromkeys(lvs) if lv in rows]
        if present:
            self.lvm("lvremove", "-q", "-y", *map(self.vg_lv, present))
            self._rows = {k: r for k, r in rows.items() if k not in present}
        return present

    def remove_lv(self, lv: str) -> bool:
        """lvremove if present; False when it was already gone (a killed run did it)."""
        return bool(self.remove_lvs([lv]))

    def batch(self, commands: Sequence[Sequence[str]], *, present: Sequence[str] = (),
              absent: Sequence[str] = (), active: bool = True) -> dict[str, LvRow]:
        """Commands in one `lvm` process, ending with a report to check what they did: every
        LV of `present` exists (and, when active, is active), none of `absent` does. The
        shell exits 0 whatever happened: a shortfall is an error naming the LVs and quoting
        what LVM said. Returns the report."""
        if not commands:
            return self.lvs()
        res, report = self.lvm.batch_report(commands, self.names.vg)
        rows = self.take(report)
        short = [f"{lv} missing" for lv in present if lv not in rows]
        short += [f"{lv} inactive" for lv in present
                  if active and lv in rows and rows[lv].major is None]
        short += [f"{lv} still present" for lv in absent if lv in rows]
        if short:
            said = " | ".join(ln.strip() for ln in res.stderr.splitlines() if ln.strip())
            raise BatchFailed(f"lvm batch of {len(commands)} commands "
                              f"({', '.join(sorted({c[0] for c in commands}))}): "
                              f"{', '.join(short)}; lvm said: {said or '(nothing)'}")
        return rows

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
