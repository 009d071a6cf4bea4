"""`make bench`'s plots: window.png, jobs.png, steps.png, reader.png, incremental.png, from
the results dict (report.py has its shape)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from hvlab.bench.report import READER_GOAL, WINDOW_LIMIT_S

if TYPE_CHECKING:  # matplotlib is imported when plotting: the bench's backups run in a
    # process as light as the CLI's (every guard fork copies the parent's page tables)
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PLOTS = ("window.png", "jobs.png", "steps.png", "reader.png", "incremental.png")


def _save(fig: Figure, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)


def _axes(title: str, xlabel: str, ylabel: str) -> tuple[Figure, Axes]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def plots(res: dict[str, Any], out_dir: Path) -> list[Path]:
    """window.png, jobs.png, steps.png, reader.png, incremental.png, models.png (a part
    without data: no plot)."""
    made: list[Path] = []
    pts = (res.get("window") or {}).get("points", [])
    if pts:
        fig, ax = _axes("freeze window vs disks", "disks in the VM", "seconds (log)")
        ax.set_yscale("log")
        ours = [(p["disks"], p["window_s"]) for p in pts if p.get("window_s")]
        floor = [(p["disks"], p["floor_s"]) for p in pts if p.get("floor_s")]
        if ours:
            ax.plot(*zip(*ours, strict=True), "o-", label="hvlab window (run record)")
        if floor:
            ax.plot(*zip(*floor, strict=True), "s--", label="floor: suspend+create_snap+resume")
        ax.axhline(WINDOW_LIMIT_S, color="red", label=f"limit {WINDOW_LIMIT_S:g} s")
        xs = [p["disks"] for p in pts]
        ax.plot(xs, [min(0.3 + 0.06 * (x - 1), 1.0) for x in xs], ":", color="green",
                label="goal: 0.3 s + 60 ms a disk, < 1 s")
        for p in pts:
            if p.get("error"):
                ax.plot([p["disks"]], [WINDOW_LIMIT_S], "rx", markersize=12)
        ax.set_xticks([p["disks"] for p in pts])
        ax.legend()
        made.append(out_dir / "window.png")
        _save(fig, made[-1])
    all_jp = [p for p in (res.get("jobs") or {}).get("points", []) if p.get("wall_s")]
    jp = [p for p in all_jp if not p.get("error")]
    failed = [p for p in all_jp if p.get("error")]
    if all_jp:
        fig, ax = _axes("job wall time vs VMs in one job", "VMs (one disk each)", "seconds")
        xs = [p["vms"] for p in all_jp]
        if jp:
            ax.plot([p["vms"] for p in jp], [p["wall_s"] for p in jp], "o-",
                    label="job wall time")
        if failed:  # where it stopped, not a job time
            ax.plot([p["vms"] for p in failed], [p["wall_s"] for p in failed], "rx",
                    markersize=12, label="failed (time until it failed)")
        quiet = [p for p in jp if p.get("quiet_wall_s")]
        if quiet:
            ax.plot([p["vms"] for p in quiet], [p["quiet_wall_s"] for p in quiet], "s--",
                    label="the guests' writers paused")
        one = next((p["wall_s"] for p in jp if p["vms"] == 1), None)
        if one:
            ax.plot(xs, [one * x for x in xs], ":", color="grey", label="N x one VM")
        ax.set_xticks(xs)
        ax.legend()
        made.append(out_dir / "jobs.png")
        _save(fig, made[-1])
    steps = (res.get("steps") or {}).get("steps", [])
    if steps:
        fig, ax = _axes("steps of the default backup", "seconds", "")
        labels = [f"{s['step']:02d} {s['name']}" + (f" ({s['vm']})" if s.get("vm") else "")
                  for s in steps]
        ax.barh(range(len(steps)), [s["seconds"] for s in steps],
                color=["#26c6da" if 4 <= s["step"] <= 8 else "#1565c0" for s in steps])
        ax.set_yticks(range(len(steps)), labels, fontsize=8)
        ax.invert_yaxis()
        made.append(out_dir / "steps.png")
        _save(fig, made[-1])
    r = res.get("reader") or {}
    if r.get("ours_MiB_s") and r.get("dd_MiB_s"):
        fig, ax = _axes("reading the same mapped extents + sha256", "", "MiB/s")
        o = r.get("off_host") or {}
        names = ["hvlab read_image", "dd | sha256sum"] + (["off-host over NBD"]
                                                          if o.get("MiB_s") else [])
        ax.bar(names, [r["ours_MiB_s"], r["dd_MiB_s"]] + ([o["MiB_s"]] if o.get("MiB_s")
                                                           else []),
               color=["#1565c0", "0.6", "#2e7d32"][:len(names)])
        ax.axhline(r["dd_MiB_s"] * READER_GOAL, color="red", linestyle="--",
                   label=f"goal {READER_GOAL:g}x dd")
        ax.legend()
        made.append(out_dir / "reader.png")
        _save(fig, made[-1])
    pts = (res.get("incremental") or {}).get("points", [])
    if pts:
        fig, ax = _axes("incremental: bytes read vs bytes changed since the reference",
                        "share of the disk changed", "MiB")
        xs = list(range(len(pts)))
        ax.bar([x - 0.2 for x in xs], [p["changed_bytes"] / 2**20 for p in pts], 0.4,
               label="changed (written)", color="0.6")
        ax.bar([x + 0.2 for x in xs], [p["read_bytes"] / 2**20 for p in pts], 0.4,
               label="read by the incremental", color="#1565c0")
        ax.set_xticks(xs, [f"{p['share']:.0%}" for p in pts])
        ax.legend()
        made.append(out_dir / "incremental.png")
        _save(fig, made[-1])
    pts = [p for p in (res.get("models") or {}).get("points", []) if p.get("wall_s")]
    if pts:
        fig, ax = _axes("the Hyper-V generations on the same lab (median)", "model", "seconds")
        xs = list(range(len(pts)))
        ax.bar([x - 0.2 for x in xs], [p.get("window_s") or 0 for p in pts], 0.4,
               label="freeze window", color="#26c6da")
        ax.bar([x + 0.2 for x in xs], [p["wall_s"] for p in pts], 0.4, label="job wall time",
               color="#1565c0")
        ax.set_xticks(xs, [p["model"] for p in pts])
        ax.legend()
        made.append(out_dir / "models.png")
        _save(fig, made[-1])
    return made
