"""The compare picture: a lane per generation, a column per phase, each cell the steps that
ran there and what they did (compare.py), T0 marked, the live VM's write target coloured."""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from hvlab.report.compare import PHASES, Lane
from hvlab.report.draw import COLOR, FORMATS

T0_MARK = "#d32f2f"


def figure(ls: list[Lane]) -> Figure:
    rows = len(ls)
    fig = Figure(figsize=(2.1 * len(PHASES) + 1.6, 2.3 * rows + 1.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.09, 0.08, 0.9, 0.82))
    ax.set_xlim(0, len(PHASES))
    ax.set_ylim(0, rows)
    ax.invert_yaxis()
    ax.set_xticks([i + 0.5 for i in range(len(PHASES))], PHASES, fontsize=8)
    ax.xaxis.tick_top()
    ax.set_yticks([i + 0.5 for i in range(rows)],
                  [f"{ln.model}\n{ln.run}" for ln in ls], fontsize=8)
    ax.tick_params(length=0)
    for i, ln in enumerate(ls):
        for j, p in enumerate(PHASES):
            c = ln.cells[p]
            writes = c.writes.split("/")[0] if c.writes else ""
            face = COLOR.get(writes, "white") if c.steps else "white"
            ax.add_patch(Rectangle((j + 0.03, i + 0.05), 0.94, 0.9, fc=face, alpha=0.12,
                                   ec="0.6", lw=0.6))
            if c.t0:
                ax.plot([j + 0.5], [i + 0.12], marker="v", color=T0_MARK, ms=9)
            text = "\n".join([*(c.steps or ["-"]), *c.lines()])
            ax.text(j + 0.06, i + 0.2, text, fontsize=6.2, va="top", ha="left",
                    family="monospace", wrap=True)
        ax.text(len(PHASES) - 0.02, i + 0.97, f"backup: {ln.backup_holds}", fontsize=7,
                ha="right", va="bottom", style="italic")
    for y in range(1, rows):
        ax.axhline(y, color="0.3", lw=1.0)
    for sp in ax.spines.values():
        sp.set_visible(False)
    fig.suptitle("Hyper-V 2012, 2012 R2 and 2016 backups side by side on the same lab "
                 "(cell colour: what the live VM writes to; red mark: T0)", fontsize=10)
    return fig


def save(ls: list[Lane], path: Path, fmt: str | None = None) -> Path:
    kind = fmt or path.suffix.lstrip(".").lower() or "png"
    if kind not in FORMATS:
        raise ValueError(f"picture format {kind!r}: use one of {', '.join(FORMATS)}")
    figure(ls).savefig(path, format=kind, dpi=100)
    return path
