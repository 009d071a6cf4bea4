"""`hvlab runs` and `hvlab explain RUN`: the timeline of a real run as rich tables."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.table import Table

from harness.flow import runs

ARTS = ("B", "C", "A", "S_B", "S_A")


def runs_table(rows: list[dict[str, Any]]) -> Table:
    t = Table(title="backup runs")
    for col in ("id", "VMs", "mode", "state", "step", "consistency"):
        t.add_column(col)
    for r in rows:
        classes = sorted({str(v.get("class")) for v in r.get("vm", {}).values()
                          if v.get("class")})
        t.add_row(r["id"], " ".join(r["vms"]), str(r.get("mode", "on-host")),
                  runs.effective_state(r), str(r.get("last_step", "-")),
                  ", ".join(classes) or "-")
    return t


def _ts(x: Any) -> str:
    if not isinstance(x, int | float):
        return "-"
    return time.strftime("%H:%M:%S", time.localtime(x)) + f".{int(x * 1000) % 1000:03d}"


def cell(fp: dict[str, Any] | None, prev: dict[str, Any] | None) -> str:
    """Short fingerprint; '*' marks a change since the artifact was last measured."""
    if not fp:
        return "-"
    mark = "" if prev is None or prev.get("sha256") == fp.get("sha256") else " [yellow]*[/]"
    return f"{str(fp['sha256'])[:8]}/{fp['mapped_blocks']}{mark}"


def timeline(run: dict[str, Any], events: list[dict[str, Any]]) -> list[Table]:
    """One table per disk: per step, what B, C, A, S held and where the guest's writes went."""
    tables = []
    for vm in run["vms"]:
        for disk in run["vm"][vm]["disks"]:
            key = f"{vm}/{disk}"
            v = run["vm"][vm]
            w = v.get("window") or {}
            title = (f"{key}  ({v.get('class')}; T0 {_ts(v.get('t0'))}; freeze window "
                     f"{w.get('seconds', 0):.3f} s)" if w else
                     f"{key}  ({v.get('class')}; T0 {_ts(v.get('t0'))}; no freeze)")
            t = Table(title=title, caption="cells: sha256 prefix / mapped blocks; * = changed "
                      "since last measured; ~ = not measured inside the freeze window")
            for col in ("step", "who", "what", "s", "writes to", *ARTS):
                t.add_column(col, no_wrap=col != "what")
            last: dict[str, dict[str, Any]] = {}
            for ev in events:
                if ev.get("vm") not in (None, vm):
                    continue
                dur = f"{ev['end'] - ev['start']:.2f}"
                wt = (ev.get("writes_to") or {}).get(key, {})
                fps = ev.get("fingerprints")
                if fps is None and ev.get("step") is not None:
                    cells = ["~"] * len(ARTS)
                else:
                    mine = (fps or {}).get(key, {})
                    cells = []
                    for a in ARTS:
                        cells.append(cell(mine.get(a), last.get(a)))
                        if mine.get(a):
                            last[a] = mine[a]
                name = ev["name"] + (" [red]FAILED[/]" if ev.get("error") else "")
                skipped = (ev.get("detail") or {}).get("skipped")
                if skipped:
                    name += f" [dim](skipped: {skipped})[/]"
                t.add_row(str(ev.get("step") or "-"), ev.get("vm") or "job", name, dur,
                          f"{wt.get('artifact', '?')} {wt.get('lv', '')}", *cells)
            tables.append(t)
    return tables


def render_explain(run: dict[str, Any], events: list[dict[str, Any]],
                   console: Console | None = None) -> None:
    con = console or Console()
    con.print(f"[bold]run {run['id']}[/]  lab {run['lab']}  VMs {' '.join(run['vms'])}  "
              f"state {runs.effective_state(run)}  backup {run['dest']}")
    for t in timeline(run, events):
        con.print(t)
    con.print(
        "B = live disk, frozen at T0 once the controller maps C; C = backup checkpoint (takes "
        "the live writes); A = auto-recovery checkpoint (fork of B@T0, fixed up in step 10); "
        "S_B/S_A = external snapshot set. Steps 4-7 are one instant seen from two sides: C and "
        "A are made while the guest holds its writes, so B at step 5 *is* the internal "
        "snapshot's state; auto-recovery fixes A up, the live VM never sees it (it writes C).")
    for vm in run["vms"]:
        for disk, img in ((k, i) for k, i in run.get("images", {}).items()
                          if k.startswith(f"{vm}/")):
            n = sum(r["length"] for r in img["auto_recovery_ranges"])
            con.print(f"{disk}: image {img['file']} sha256 {img['sha256'][:16]}; "
                      f"auto-recovery changed {n} bytes in "
                      f"{len(img['auto_recovery_ranges'])} ranges (thin_delta S_B..S_A)")
