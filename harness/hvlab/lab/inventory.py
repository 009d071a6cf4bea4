"""What of a lab exists right now, found by ownership (path, prefix, uuid), not by memory;
which labs there are, and which one a command means."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from hvlab.lab import guests, links
from hvlab.lab.paths import Names
from hvlab.lab.state import State
from hvlab.sys import dm, fs, loop


@dataclass
class Inventory:
    """What of a lab exists right now, found by ownership (path, prefix, uuid), not by memory."""

    loops: list[loop.Loop] = field(default_factory=list)
    dm_devices: list[dm.DmDevice] = field(default_factory=list)
    mounts: list[fs.Mount] = field(default_factory=list)
    guests: list[int] = field(default_factory=list)
    links: list[str] = field(default_factory=list)  # off-host: namespaces, stray veths

    def empty(self) -> bool:
        return not (self.loops or self.dm_devices or self.mounts or self.guests or self.links)

    def describe(self) -> str:
        parts = [lo.name for lo in self.loops] + [d.name for d in self.dm_devices]
        parts += [m.target for m in self.mounts] + [f"guest pid {p}" for p in self.guests]
        return ", ".join(parts + self.links)


def owned_dm(names: Names, loops: list[loop.Loop] | None = None) -> list[dm.DmDevice]:
    """The lab's dm devices, by ownership, never by name alone: ours carry the lab's uuid
    prefix (PVs, controllers, attach devices); LVM's carry its LVM- uuid, a name in the lab's
    VG, and sit on nothing but the lab's own loops. A device that merely looks like ours by
    name (hvlab_<lab>_x made by someone else) is left alone."""
    loops = loop.loops_under(names.dir) if loops is None else loops
    ours_below = {Path(lo.name).name for lo in loops}

    def ours(d: dm.DmDevice) -> bool:
        if d.uuid.startswith(names.uuid_prefix):
            return True
        if not (d.uuid.startswith("LVM-") and d.name.startswith(names.dm_prefixes[0])):
            return False
        leaves = dm.leaves(d)
        return bool(leaves) and leaves <= ours_below

    return [d for d in dm.list_devices() if ours(d)]


def of(lab: str) -> Inventory:
    names = Names(lab)
    # By path even when the directory is gone: a loop on a deleted backing file is ours too.
    loops = loop.loops_under(names.dir)
    return Inventory(
        loops=loops,
        dm_devices=owned_dm(names, loops),
        mounts=fs.mounts_under(names.dir),
        guests=guests.running_pids(names),
        links=links.owned(names),
    )


def is_up(lab: str) -> bool:
    st = State.load(lab)
    return st is not None and st.phase == "up" and bool(of(lab).loops)


def pv_devices(names: Names) -> list[str]:
    """The lab's PVs as LVM must see them: our dm-linears, or (a lab brought up by an older
    hvlab, whose PVs were the loops themselves) the loops."""
    pvs = [d.path for d in dm.list_devices() if d.uuid.startswith(f"{names.uuid_prefix}pv-")]
    return sorted(pvs) or [lo.name for lo in loop.loops_under(names.dir)]


def lab_names() -> list[str]:
    from hvlab.lab.paths import home

    root = home()
    if not root.exists():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "state.json").exists())


def resolve_name(name: str | None) -> str:
    """The lab a command means: -n NAME, else $HVLAB_LAB, else the only lab, else 'hvlab'."""
    from hvlab.lab.definition import check_name

    if name is not None:  # `-n ""` is a bad name, not "the default lab"
        return check_name("lab", name)
    if os.environ.get("HVLAB_LAB"):
        return check_name("lab", os.environ["HVLAB_LAB"])
    labs = lab_names()
    return labs[0] if len(labs) == 1 else "hvlab"
