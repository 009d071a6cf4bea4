"""`hvlab runs` and `hvlab explain RUN`: the timeline of a real run as rich tables, and the
commands each step ran."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.table import Table

from hvlab.console import console as make_console
from hvlab.lab import runs
from hvlab.lab.paths import Names
from hvlab.lab.record import ARTIFACTS, Event, Run

ARTS = ARTIFACTS


def runs_table(rows: list[Run]) -> Table:
    t = Table(title="backup runs")
    for col in ("id", "VMs", "mode", "state", "step", "consistency"):
        t.add_column(col)
    for r in rows:
        classes = sorted({v.cls for v in r.vm.values() if v.cls})
        t.add_row(r.id, " ".join(r.vms), r.mode, runs.effective_state(r),
                  str(r.last_step or "-"), ", ".join(classes) or "-")
    return t


def _ts(x: Any) -> str:
    if not isinstance(x, int | float):
        return "-"
    return time.strftime("%H:%M:%S", time.localtime(x)) + f".{int(x * 1000) % 1000:03d}"


def cell(fp: dict[str, Any] | None, prev: dict[str, Any] | None) -> str:
    """Short fingerprint; '*' marks a change since the artifact was last measured."""
    if not fp:
        return "-"
    if "sha256" not in fp:  # the live disk: its content moves, only its mapping is shown
        return f"live/{fp['mapped_blocks']}"
    mark = "" if prev is None or prev.get("sha256") == fp.get("sha256") else " [yellow]*[/]"
    return f"{str(fp['sha256'])[:8]}/{fp['mapped_blocks']}{mark}"


def timeline(run: Run, events: list[Event]) -> list[Table]:
    """One table per disk: per step, what B, C, A, S held and where the guest's writes went."""
    tables = []
    for vm, disk, _ in run.disks():
        key = f"{vm}/{disk}"
        v = run.vm[vm]
        w = v.window
        title = (f"{key}  ({v.cls}; T0 {_ts(v.t0)}; freeze window "
                 f"{w.seconds or 0:.3f} s)" if w else
                 f"{key}  ({v.cls}; T0 {_ts(v.t0)}; no freeze)")
        t = Table(title=title, caption="cells: sha256 prefix / mapped blocks; * = changed "
                  "since last measured; ~ = not hashed at this step (content is hashed at "
                  "T0, after auto-recovery and before the merge)")
        for col in ("step", "who", "what", "s", "writes", *ARTS):
            t.add_column(col, no_wrap=col != "what", min_width=18 if col == "what" else None)
        last: dict[str, dict[str, Any]] = {}
        for ev in events:
            if ev.vm not in (None, vm):
                continue
            fps = ev.fingerprints
            if fps is None and ev.step is not None:
                cells = ["~"] * len(ARTS)
            else:
                mine = (fps or {}).get(key, {})
                cells = []
                for a in ARTS:
                    cells.append(cell(mine.get(a), last.get(a)))
                    if mine.get(a):
                        last[a] = mine[a]
            name = ev.name + (" [red]FAILED[/]" if ev.error else "")
            skipped = ev.detail.get("skipped")
            if skipped:
                name += f" [dim](skipped: {skipped})[/]"
            kernel = kernel_note(ev, vm, disk)
            if kernel:
                name += f" [dim]kernel: {kernel}[/]"
            t.add_row(str(ev.step or "-"), ev.vm or "job", name, f"{ev.seconds:.2f}",
                      ev.writes(key) or "?", *cells)
        tables.append(t)
    return tables


def kernel_note(ev: Event, vm: str, disk: str) -> str:
    """The block devices of this disk the kernel added (+) and removed (-) in a step, by LV or
    device name without the lab prefix (from the step's uevents)."""
    mine = f"{vm}_{disk}"

    def short(name: str) -> str:
        # hvlab_<lab>-<lv> (LVM) or hvlab_<lab>_<ours>: keep what names the object
        return name.split("-", 1)[1] if "-" in name else name.split("_", 2)[-1]

    out = [f"+{short(n)}" for n in ev.devices_created if mine in n]
    out += [f"-{short(n)}" for n in ev.devices_removed if mine in n]
    return " ".join(out)


LANE_STYLE = {"B": "green", "C": "yellow", "A": "magenta", "S_B": "blue", "S_A": "blue",
              "D": "red", "S_D": "blue"}


def lanes(run: Run, events: list[Event]) -> list[Table]:
    """The picture, one per VM: a column per step (the VM's own 1-10, then the job's 11-14),
    per disk a lane for each artifact (present; * = changed since last measured), the guest's
    freeze and where its writes went."""
    out = []
    for vm in run.vms:
        evs = [ev for ev in events if ev.vm in (None, vm)]
        t = Table(title=f"{vm}: what exists after each step", box=None,
                  caption="[green]██[/] B  [yellow]██[/] C  [magenta]██[/] A  [blue]██[/] S  "
                          "[bold]*[/] changed  [cyan]❄[/] guest frozen  U unwind; writes: "
                          "what the guest's controller maps")
        t.add_column("", no_wrap=True)
        for ev in evs:
            t.add_column(str(ev.step or "U"), justify="center", no_wrap=True)
        for label, cells in lane_rows(run, evs, vm).items():
            t.add_row(label, *cells)
        out.append(t)
    return out


def lane_rows(run: Run, events: list[Event], vm: str | None = None) -> dict[str, list[str]]:
    """Row label -> one rich-markup cell per event (empty: absent / not frozen), for one VM's
    disks or all of them."""
    vms = [vm] if vm else run.vms
    rows: dict[str, list[str]] = {}
    present: set[tuple[str, str]] = {(f"{v}/{d}", "B") for v, d, _ in run.disks(vm)}
    last: dict[tuple[str, str], Any] = {}
    writes = {f"{v}/{d}": "B" for v, d, _ in run.disks(vm)}  # until a step moves them
    for i, ev in enumerate(events):
        present.update(ev.artifacts("made"))
        present.difference_update(ev.artifacts("removed") + ev.artifacts("merged"))
        if ev.step is None:  # unwind: only the live disks are left
            present = {p for p in present if p[1] == "B"}
        for v in vms:
            frozen = (ev.in_freeze and ev.vm == v
                      and run.vm[v].answers is not False)  # crash-consistent: never
            rows.setdefault(f"{v} guest", [""] * len(events))[i] = "[cyan]❄[/]" if frozen else ""
            for disk in run.vm[v].disks:
                key = f"{v}/{disk}"
                # a VM's step records its own disks only: the others' stay as they were
                wt = ev.writes(key) or writes.get(key, "?")
                writes[key] = wt
                rows.setdefault(f"{key} writes", [""] * len(events))[i] = (
                    f"[{LANE_STYLE.get(wt, 'white')}]{wt}[/]")
                fps = (ev.fingerprints or {}).get(key) or {}
                for a in ARTS:
                    cell = ""
                    if (key, a) in present:
                        fp = (fps.get(a) or {}).get("sha256")
                        changed = fp is not None and last.get((key, a)) not in (None, fp)
                        if fp is not None:
                            last[(key, a)] = fp
                        cell = f"[{LANE_STYLE[a]}]██[/]" + ("[bold]*[/]" if changed else " ")
                    rows.setdefault(f"{key} {a}", [""] * len(events))[i] = cell
    return {label: cells for label, cells in rows.items() if any(cells)}


def render_explain(run: Run, events: list[Event], console: Console | None = None) -> None:
    con = console or make_console()
    con.print(f"[bold]run {run.id}[/]  lab {run.lab}  VMs {' '.join(run.vms)}  "
              f"state {runs.effective_state(run)}  backup {run.dest}")
    cost = time_cost(events, run.pauses)
    if cost:
        con.print(cost)
    for t in lanes(run, events):
        con.print(t)
    for t in timeline(run, events):
        con.print(t)
    con.print(
        "B = live disk, frozen at T0 once the controller maps C; C = backup checkpoint (takes "
        "the live writes); A = auto-recovery checkpoint (fork of B@T0, fixed up in step 10); "
        "S_B/S_A = external snapshot set. Steps 4-7 are one instant seen from two sides: C and "
        "A are made while the guest holds its writes, so B at step 5 *is* the internal "
        "snapshot's state; auto-recovery fixes A up, the live VM never sees it (it writes C).")
    if run.link:  # one line each, whatever the width: what a person copies
        con.print(link_line(run.link), soft_wrap=True)
    for vm in run.vms:
        for disk, img in ((k, i) for k, i in run.images.items()
                          if k.startswith(f"{vm}/")):
            n = sum(r["length"] for r in img["auto_recovery_ranges"])
            con.print(f"{disk}: image {img['file']} sha256 {img['sha256'][:16]}; "
                      f"auto-recovery changed {n} bytes in "
                      f"{len(img['auto_recovery_ranges'])} ranges (thin_delta S_B..S_A)")
            c = img.get("chain") or {}
            if c.get("generation"):
                since = (f"; {c['changed_bytes']} bytes changed since {c['reference']} "
                         f"(thin_delta), {c['discarded_bytes']} discarded"
                         if c["kind"] == "incremental" else "")
                con.print(f"{disk}: {c['kind']} backup, chain {c['generation']}: "
                          f"{c['reason']}{since}", soft_wrap=True)


def link_line(link: dict[str, Any]) -> str:
    """Step 13 off-host: who read what over which link."""
    srv, prx = link["server"], link["proxy"]
    mib = 2 ** 20
    moved = (f": {link['nbd_bytes'] / mib:.1f} MiB over NBD for the "
             f"{link['mapped_bytes'] / mib:.1f} MiB it was handed (mapped, or changed since the "
             f"reference) in {link['extents']} extents, {link['link_bytes'] / mib:.1f} MiB on "
             f"the link"
             if "nbd_bytes" in link else " (the read did not finish)")
    return (f"step 13 off-host: the proxy ({prx['namespace']}, {prx['address']}) read S over "
            f"NBD from nbdkit at {srv['address']}:{srv['port']} ({srv['namespace']}, "
            f"read-only, one export per disk){moved}")


def command_lines(run: Run, events: list[Event]) -> list[str]:
    """Per step, the external commands it ran, shell-quoted (exit code and seconds after a
    #), with the lab's private LVM config so a person can run them by hand."""
    from shlex import join

    lvm_dir = f"LVM_SYSTEM_DIR={Names(run.lab).lvm_dir}"
    out = [f"# run {run.id}: LVM commands need {lvm_dir}"]
    for ev in events:
        head = f"# [{ev.step or 'U'}] {ev.vm or 'job'} {ev.name}"
        if ev.commands is None:
            out.append(f"{head}: not recorded (a run from before the program log)")
            continue
        out.append(f"{head}: {len(ev.commands)} command(s)" + (" FAILED" if ev.error else ""))
        for c in ev.commands:
            argv, cost = c.argv, f"rc {c.rc}, {c.seconds:.3f} s"
            if argv[:1] == ["dm-ioctl"]:  # no command to copy: the backup's own ioctl
                out.append(f"# ioctl: {' '.join(argv[1:])}  ({cost})")
            else:
                out.append(f"{join(argv)}  # {cost}")
    return out


def time_cost(events: list[Event], pauses: list[list[float]] | None = None) -> str:
    """The steps' own time against the job's wall time from the first step's start to the
    last step's end, less the time it stood paused: what observation and bookkeeping
    between the steps cost."""
    steps = [e for e in events if e.step]
    if not steps:
        return ""
    own = sum(e.seconds for e in steps)
    wall = max(e.end for e in steps) - min(e.start for e in steps)
    wall -= sum(b - a for a, b in pauses or [] if b > a)
    ratio = f" ({wall / own:.2f}x)" if own > 0 else ""
    return f"time: steps' own {own:.1f} s, wall {wall:.1f} s{ratio}"
