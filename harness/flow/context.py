"""One process working on one run: the lab, the run record, the console, and the names and
device facts every step needs."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hvlab.backup import thinmeta
from hvlab.guest.client import GuestClient
from hvlab.lab import guests, live, runs
from hvlab.lab.handle import Lab
from hvlab.lab.paths import Names
from hvlab.lab.record import Artifact, Disk, Run, Vm
from hvlab.sys import dm, fs
from hvlab.sys.lvm import LvRow
from hvlab.sys.uevents import wait_node

Say = Callable[[str], None]
ROLE_OF: dict[Artifact, str] = {"B": "role_base", "C": "role_checkpoint",
                                "A": "role_autorecovery", "S_B": "role_external",
                                "S_A": "role_external"}
KIND: dict[Artifact, str] = {"C": "c", "A": "a", "S_B": "sb", "S_A": "sa"}


def quiet(_: str) -> None:
    pass


def lv_name(vm: str, disk: str, art: Artifact, run_id: str) -> str:
    return f"{vm}_{disk}_{KIND[art]}_{run_id}"


def ar_ctl(names: Names, vm: str, disk: str) -> str:
    """The device that attaches A to the guest in step 10."""
    return f"{names.vg}_ar_{vm}_{disk}"


class Ctx:
    def __init__(self, lab: Lab, run: Run, say: Say = quiet, fingerprints: bool = True) -> None:
        self.lab = lab
        self.names = lab.names
        self.lvm = lab.lvm
        self.run = run
        self.say = say
        self.fingerprints = fingerprints
        self.progress: Any = None  # a rich Progress for step 13, when on a terminal
        self.block_digests: dict[int, bytes] = {}  # data block -> sha256 of its content
        self.thin_ids: dict[str, int] = {}  # an LV's thin id never changes
        self.last_dump: thinmeta.Dump | None = None  # step 13's metadata, for its hashes
        self.pending: tuple[dict[str, Any], Any] | None = None  # (event, pool) hashing
        self.pending_future: Any = None

    def save(self) -> None:
        runs.save(self.names, self.run)

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

    def snapshot(self, origin: str, name: str, art: Artifact, vm: str, disk: str,
                 read_only: bool = False) -> None:
        """A thin snapshot of origin, tagged with its role, active (-kn), node waited for."""
        self.lvm("lvcreate", "-q", "-s", "-kn", *(["-pr"] if read_only else []),
                 "-n", name, *self.tags(ROLE_OF[art], vm, disk), self.vg_lv(origin))
        wait_node(self.lv_dev(name))

    def lvs(self) -> dict[str, LvRow]:
        return self.lab.lvs()

    def exists(self, lv: str) -> bool:
        return lv in self.lvs()

    def remove_lv(self, lv: str) -> bool:
        """lvremove if present; False when it was already gone (a killed run did it)."""
        if not self.exists(lv):
            return False
        self.lvm("lvremove", "-q", "-y", self.vg_lv(lv))
        return True

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
            if lv is not None and lv in (disk.B, lv_name(v, d, "C", self.run.id)):
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
    """Thin device ids of lvs from the kernel's tables (`0 N thin <pool> <id>`): one dmsetup
    call for all of them."""
    want = {ctx.names.dm_lv_name(lv): lv for lv in lvs if lv not in ctx.thin_ids}
    if want:
        for name, fields in thinmeta.thin_tables().items():
            if name in want and len(fields) >= 5 and fields[2] == "thin":
                ctx.thin_ids[want[name]] = int(fields[4])
    return {lv: ctx.thin_ids[lv] for lv in lvs if lv in ctx.thin_ids}
