"""`make bench`, parts 1 and 2: real `hvlab backup` runs (the flow's Python API, default
settings) on small labs of their own, read back from their run records and step events.

- the freeze window of one VM of N disks: the run record's Window.seconds (steps 4-8), and
  the per-disk skew when the record has one
- the wall time of a job of N one-disk VMs (one `backup vm01 ... vmN` in a lab of N VMs)
- the time of each step of the default lab's vm01 backup (the step events' start and end)

Each lab is `bench`-prefixed, brought up with its guests and removed (down --purge: its
backups too) however the part ends; a leftover of an earlier, killed bench goes first.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from hvlab.errors import HvlabError
from hvlab.flow import engine
from hvlab.lab import definition, runs, substrate, teardown
from hvlab.lab.definition import LabDef
from hvlab.lab.paths import Names
from hvlab.lab.record import Event

DISK_SIZE = "64M"
DISK_FS = "ext4"
PROFILE = "windows"  # the guest really freezes (writers hold, FIFREEZE every disk)


def vm_doc(name: str, disks: int) -> dict[str, Any]:
    return {"name": name, "profile": PROFILE,
            "disk": [{"name": f"disk{i}", "size": DISK_SIZE, "fs": DISK_FS}
                     for i in range(disks)]}


def lab_doc(name: str, vms: list[tuple[str, int]]) -> dict[str, Any]:
    return {"lab": {"name": name, "backing_size": "2G"},
            "vm": [vm_doc(v, n) for v, n in vms]}


@contextmanager
def lab_up(defn: LabDef, *, start_guests: bool = True) -> Iterator[Names]:
    """The lab up for the block, then down with its backups; nothing of it left after."""
    teardown.down(defn.name, missing_ok=True, purge=True)  # a killed bench's leftover
    try:
        substrate.up(defn, start_guests=start_guests)
        yield Names(defn.name)
    finally:
        teardown.down(defn.name, missing_ok=True, purge=True)


def _raw_record(names: Names, run_id: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((runs.run_dir(names, run_id) / "run.json").read_text())
    return data


def skew_of(vm_rec: dict[str, Any]) -> dict[str, Any] | None:
    """Every `*skew*` field of a VM's disks (and of its window) in the raw run record; None
    when the flow records none (older records)."""
    out: dict[str, Any] = {}
    for d, disk in (vm_rec.get("disks") or {}).items():
        for k, v in disk.items():
            if "skew" in k:
                out[f"{d}.{k}" if k != "skew" else d] = v
    for k, v in (vm_rec.get("window") or {}).items():
        if "skew" in k:
            out[f"window.{k}"] = v
    return out or None


def step_times(events: list[Event]) -> list[dict[str, Any]]:
    return [{"step": e.step, "name": e.name, "vm": e.vm, "seconds": round(e.seconds, 4)}
            for e in events]


def backup(lab: str, vms: list[str], model: str = "2012r2") -> dict[str, Any]:
    """One backup with the CLI's defaults (of `model`); what its run record says (also when
    it failed)."""
    names = Names(lab)
    before = {r.id for r in runs.all_runs(names)}
    t = time.perf_counter()
    error = None
    try:
        engine.start(lab, vms, model=model)
    except HvlabError as exc:  # failed and unwound (or refused): the record says how far
        error = f"{type(exc).__name__}: {exc}"
    wall = time.perf_counter() - t
    new = [r for r in runs.all_runs(names) if r.id not in before]
    if not new:
        return {"wall_s": wall, "error": error or "no run record", "run": None}
    run = new[-1]
    raw = _raw_record(names, run.id)
    evs = runs.events(names, run.id)
    return {
        "run": run.id, "state": run.state, "error": error or run.error, "wall_s": wall,
        "events_s": (max(e.end for e in evs) - min(e.start for e in evs)) if evs else None,
        "windows_s": {v: w.seconds if (w := run.vm[v].window) else None for v in run.vms},
        "class": {v: run.vm[v].cls for v in run.vms},
        "skew": {v: skew_of(raw["vm"][v]) for v in run.vms},
        "steps": step_times(evs),
    }


def say(text: str) -> None:
    print(text, flush=True)


def window(counts: tuple[int, ...], floor: dict[str, Any] | None,
           points: list[dict[str, Any]]) -> None:
    """Per N: a lab `benchw<N>` of one VM of N disks, one backup of it, into points (what
    was measured stays there when a later N fails)."""
    from hvlab.bench.report import floor_s

    for n in counts:
        defn = definition.parse(lab_doc(f"benchw{n}", [("vm01", n)]))
        with lab_up(defn) as _names:
            say(f"bench: window, one VM of {n} disks ...")
            b = backup(defn.name, ["vm01"])
        w = (b.get("windows_s") or {}).get("vm01")
        points.append({"disks": n, "window_s": w, "floor_s": floor_s(floor, n),
                       "skew": (b.get("skew") or {}).get("vm01"), "wall_s": b["wall_s"],
                       "run": b.get("run"), "state": b.get("state"),
                       "class": (b.get("class") or {}).get("vm01"), "error": b.get("error")})
        say(f"bench:   window {w if w is None else round(w, 3)} s, wall {b['wall_s']:.1f} s"
            + (f", FAILED: {b['error']}" if b.get("error") else ""))


def quiet_guests(lab: str, vms: list[str], paused: bool) -> None:
    """Pause (or resume) every writer of the lab's guests: the job measured without their
    load, to show how much of a job's time is the guests' share of the CPU."""
    from hvlab.guest.client import GuestClient
    from hvlab.lab import guests

    for vm in vms:
        GuestClient(guests.socket_path(Names(lab), vm)).workload(pause=paused)


def jobs(counts: tuple[int, ...], points: list[dict[str, Any]], repeat: int = 3) -> None:
    """Per N: a lab `benchj<N>` of N one-disk VMs (N guests running, as many LVs), `repeat`
    jobs of all of them (the median is the job's time: one run varies by 10-15 % in the lab
    VM), then one more with the guests' writers paused."""
    from hvlab.bench.report import median

    for n in counts:
        vms = [f"vm{i + 1:02d}" for i in range(n)]
        defn = definition.parse(lab_doc(f"benchj{n}", [(v, 1) for v in vms]))
        runs_: list[dict[str, Any]] = []
        quiet: dict[str, Any] = {}
        with lab_up(defn):
            for i in range(repeat):
                say(f"bench: job of {n} VMs ({i + 1}/{repeat}) ...")
                runs_.append(backup(defn.name, vms))
                if runs_[-1].get("error"):
                    break
            if not runs_[-1].get("error"):
                say(f"bench: job of {n} VMs, the guests' writers paused ...")
                quiet_guests(defn.name, vms, True)
                quiet = backup(defn.name, vms)
        bad = next((b for b in runs_ if b.get("error")), None)
        walls = [b["wall_s"] for b in runs_]
        last = bad or runs_[-1]
        points.append({"vms": n, "wall_s": median(walls), "walls_s": walls,
                       "quiet_wall_s": None if quiet.get("error") else quiet.get("wall_s"),
                       "windows_s": last.get("windows_s"), "run": last.get("run"),
                       "state": last.get("state"), "error": last.get("error")})
        say(f"bench:   wall {' / '.join(f'{w:.1f}' for w in walls)} s"
            + (f", writers paused {quiet['wall_s']:.1f} s" if quiet.get("wall_s") else "")
            + (f", FAILED: {last['error']}" if last.get("error") else ""))


def default_steps() -> dict[str, Any]:
    """The default lab (as `hvlab up` makes it, named benchd): `backup vm01`, its steps."""
    defn = definition.load(None, name="benchd")
    with lab_up(defn):
        say("bench: default backup of vm01 ...")
        b = backup(defn.name, ["vm01"])
    steps = b.get("steps") or []
    return {"lab": "default", "vm": "vm01", "wall_s": b["wall_s"], "events_s": b.get("events_s"),
            "steps_s": sum(s["seconds"] for s in steps), "steps": steps, "run": b.get("run"),
            "state": b.get("state"), "window_s": (b.get("windows_s") or {}).get("vm01"),
            "error": b.get("error")}
