"""`hvlab explain RUN --png/--svg`: a run's geometry (report/geometry.py) drawn with
matplotlib (Agg; no display). A red band inside the B or C bar is where the guest's writes go;
each VM's freeze window is shaded against the flush-and-hold limit and magnified below; step
starts are dotted lines. `figure` draws, `save` writes PNG or SVG.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.text import Annotation

from hvlab.flow import steps as S
from hvlab.lab.paths import ARTIFACT_ROLE
from hvlab.lab.record import Event, Run
from hvlab.report.geometry import Timeline, Window, build, stack

COLOR = {"B": "#2e7d32", "C": "#ef8f00", "A": "#8e24aa", "S_B": "#1565c0", "S_A": "#4f9fe8",
         "D": "#795548", "S_D": "#90a4ae"}
WRITES = "#d32f2f"
FROZEN = "#26c6da"
STEP_GREY = "0.45"
LIMIT = "#00838f"
RECOVERY = "#4a148c"
READ = "#0d47a1"
ZOOM_STEPS = {"4": "0.6", "5": "#f7c77f", "6": "#c692d4", "7": "0.6", "8": "0.6"}  # C, A colours
FORMATS = ("png", "svg")


def _text_px(text: str, fontsize: float) -> float:
    """A generous estimate of a text's width in pixels at 100 dpi (DejaVu Sans)."""
    return (len(text) * 0.62 * fontsize + 6) * 100 / 72


@dataclass
class _Labels:
    """Labels above an axes, at x positions, stacked into rows once the layout is known."""

    ax: Axes
    fontsize: float
    items: list[Annotation] = field(default_factory=list)
    title: str = ""

    def add(self, x: float, label: str, gid: str | None = None) -> None:
        self.items.append(self.ax.annotate(
            label, xy=(x, 1.0), xycoords=("data", "axes fraction"), xytext=(0, 2),
            textcoords="offset points", ha="center", va="bottom", fontsize=self.fontsize,
            color="0.15", annotation_clip=False, gid=gid))

    def row_offset(self, row: int) -> float:
        return 2 + (self.fontsize + 2.5) * row

    def guess(self, px_per_s: float) -> None:
        """Rows from estimated widths, so the first layout leaves about the right room."""
        self.place(stack([(x * px_per_s - w / 2, x * px_per_s + w / 2) for a in self.items
                          for x, w in [(float(a.xy[0]), _text_px(a.get_text(),
                                                                 self.fontsize))]]))

    def measure(self) -> None:
        """Rows from the drawn widths (after a layout pass)."""
        boxes = [a.get_window_extent() for a in self.items]
        self.place(stack([(b.x0, b.x1) for b in boxes]))

    def place(self, rows: list[int]) -> None:
        for a, row in zip(self.items, rows, strict=True):
            a.xyann = (0, self.row_offset(row))
        if self.title:
            self.ax.set_title(self.title, fontsize=9, color="0.25",
                              pad=self.row_offset(max(rows, default=-1) + 1) + 4)


def _note(ax: Axes, x: float, y: float, text: str, px_per_s: float, x_max: float,
          fontsize: float = 8.5, **kw: Any) -> None:
    """Text after x on a lane; before x (over the bar, on white) when there is no room."""
    gap = 6 / px_per_s
    if x + gap + _text_px(text, fontsize) / px_per_s <= x_max:
        ax.text(x + gap, y, text, va="center", fontsize=fontsize, zorder=6, **kw)
    else:
        ax.text(x - gap, y, text, va="center", ha="right", fontsize=fontsize, zorder=6,
                bbox={"fc": "white", "ec": "none", "alpha": 0.8, "pad": 1}, **kw)


def _bar(ax: Axes, x0: float, x1: float, yc: float, h: float, **kw: Any) -> None:
    ax.add_patch(Rectangle((x0, yc - h / 2), max(x1 - x0, 0.0), h, **kw))


def _vm_lanes(tl: Timeline, vm: str) -> list[str]:
    return [k for k, _ in tl.lanes if k.startswith((f"{vm} ", f"{vm}/"))]


def _draw_main(ax: Axes, tl: Timeline, width_px: float) -> _Labels:
    n = len(tl.lanes)
    y = {key: -i for i, (key, _) in enumerate(tl.lanes)}
    right = max([tl.t_end] + [w.start + max(w.limit, w.end - w.start) for w in tl.windows])
    x_max = right * 1.22 + 0.5  # room on the right for the notes
    px_per_s = width_px / (x_max * 1.01)
    ax.set_xlim(-0.01 * x_max, x_max)
    ax.set_ylim(-n + 0.45, 0.55)
    ax.set_yticks([y[k] for k, _ in tl.lanes], [label for _, label in tl.lanes], fontsize=9)
    ax.set_xlabel("seconds since the job started", fontsize=9.5)
    ax.tick_params(axis="x", labelsize=9)
    ax.grid(axis="x", color="0.92", lw=0.6)
    ax.set_axisbelow(True)
    for key, _ in tl.lanes:  # a line above every VM and every disk
        if key.endswith((" guest", " B")):
            ax.axhline(y[key] + 0.5, color="0.55", lw=0.9)

    for m in tl.steps:
        ax.axvline(m.start, color=STEP_GREY, lw=0.7, ls=":", zorder=1)
        _bar(ax, m.start, m.end, 0, 0.6, zorder=2, color="#b71c1c" if m.failed else "0.55",
             alpha=0.35 if m.skipped else 0.9, lw=0)
    ax.axvline(tl.t_end, color="0.3", lw=1.0, zorder=1)
    several = len({m.vm for m in tl.steps if m.vm}) > 1
    marks = [(m.start, f"{m.label} {m.vm}" if several and m.label == "1" else m.label)
             for m in tl.steps]
    marks.append((tl.t_end, tl.end_label))
    steps = S.model(tl.model).steps
    half = (len(steps) + 1) // 2
    names = ["    ".join(f"{s.number} {s.name}" for s in part)
             for part in (steps[:half], steps[half:])]
    labels = _Labels(ax, 8.5, title="steps:  " + names[0] + "\n" + names[1])
    seen: dict[str, int] = {}
    for i, (x, label) in enumerate(marks):  # SVG ids step-5, step-5-2 (a second VM), end
        n = seen[label] = seen.get(label, 0) + 1
        gid = "end" if i == len(marks) - 1 else f"step-{label.split()[0]}"
        labels.add(x, label, gid if n == 1 else f"{gid}-{n}")
    labels.guess(px_per_s)

    for w in tl.windows:  # shade the VM's lanes; the guest lane: frozen, and the limit
        lanes = _vm_lanes(tl, w.vm)
        top, bottom = max(y[k] for k in lanes) + 0.5, min(y[k] for k in lanes) - 0.5
        ax.add_patch(Rectangle((w.start, bottom), w.end - w.start, top - bottom,
                               color=FROZEN, alpha=0.18, lw=0, zorder=0))
        gy = y[f"{w.vm} guest"]
        _bar(ax, w.start, w.end, gy, 0.6, color=FROZEN, zorder=3, lw=0)
        _bar(ax, w.start, w.start + w.limit, gy, 0.6, fill=False, ls="--", ec=LIMIT, lw=1.0,
             zorder=3)
        text, box_end = _window_text(w), w.start + max(w.limit, w.end - w.start)
        if box_end + _text_px(text, 9.5) / px_per_s > x_max and w.start > _text_px(
                text, 9.5) / px_per_s:  # no room after the limit: before the freeze
            ax.text(w.start - 6 / px_per_s, gy, text, va="center", ha="right", fontsize=9,
                    fontweight="bold", color=_window_color(w))
        else:
            ax.text(box_end + 6 / px_per_s, gy, text, va="center", fontsize=9,
                    fontweight="bold", color=_window_color(w))
    for vm, text in tl.guest_notes.items():
        ax.text(0.01 * x_max, y[f"{vm} guest"], text, va="center", fontsize=9, color="0.3")

    for sp in tl.artifacts:
        a = sp.lane.rsplit(" ", 1)[1]
        _bar(ax, sp.start, sp.end, y[sp.lane], 0.64, color=COLOR[a], alpha=0.5, lw=0,
             zorder=2)
        if sp.open_end:
            ax.plot([sp.end], [y[sp.lane]], marker=">", color=COLOR[a], ms=7, zorder=4)
    for sp in tl.writes:
        _bar(ax, sp.start, sp.end, y[sp.lane], 0.22, color=WRITES, lw=0, zorder=4)
        text = "not written after T0: B stays the disk at T0"
        later = [x.start for x in tl.writes if x.lane == sp.lane and x.start > sp.end]
        room = (min(later) if later else tl.t_end) - sp.end
        if (sp.lane.endswith(" B") and not sp.open_end and sp.end > 0
                and room * px_per_s > _text_px(text, 8) + 12):
            ax.text(sp.end + 6 / px_per_s, y[sp.lane], text, va="center", fontsize=8,
                    color="#1b5e20", zorder=5)
    for sp in tl.recovery:
        _bar(ax, sp.start, sp.end, y[sp.lane], 0.64, fill=False, hatch="////", ec=RECOVERY,
             lw=0.8, zorder=3)
    for sp in tl.reads:
        _bar(ax, sp.start, sp.end, y[sp.lane], 0.64, fill=False, hatch="xxx", ec=READ, lw=0.8,
             zorder=3)
    for sp in tl.merged:
        _note(ax, sp.end, y[sp.lane], "merged into B", px_per_s, x_max, color="#8a4f00")
    for lane, text in tl.notes.items():
        if lane in y:
            ends = [sp.end for sp in tl.artifacts if sp.lane == lane]
            _note(ax, max(ends) if ends else tl.t_end, y[lane], text, px_per_s, x_max,
                  color=RECOVERY)
    return labels


def _window_text(w: Window) -> str:
    if w.seconds is None:
        return f"frozen until the unwind (never thawed by step 8; limit {w.limit:g} s)"
    return f"frozen {w.seconds:.2f} s of the {w.limit:g} s flush-and-hold limit"


def _window_color(w: Window) -> str:
    return "#b71c1c" if w.seconds is None or w.seconds > w.limit else "#00606b"


def _draw_zoom(ax: Axes, tl: Timeline, w: Window, width_px: float) -> _Labels:
    """One VM's freeze window, magnified: which step took how long inside it."""
    span = max(w.limit, w.end - w.start)
    ax.set_xlim(-0.02 * span, span * 1.03)
    ax.set_ylim(-0.5, 0.5)
    ax.set_yticks([0], [f"{w.vm} freeze window\n(zoom)"], fontsize=9)
    ax.set_xlabel(f"seconds since {w.vm}'s freeze began (step 4), "
                  f"{w.start:.2f} s into the job", fontsize=9.5)
    ax.tick_params(axis="x", labelsize=9)
    ax.grid(axis="x", color="0.92", lw=0.6)
    ax.set_axisbelow(True)
    _bar(ax, 0, w.end - w.start, 0, 1.0, color=FROZEN, alpha=0.25, lw=0, zorder=0)
    ax.axvline(w.limit, color=LIMIT, ls="--", lw=1.2)
    ax.text(w.limit, 0.42, f" {w.limit:g} s limit", color=LIMIT, fontsize=8.5, va="top",
            ha="right" if w.limit > 0.8 * span else "left")
    mine = [m for m in tl.steps if m.vm == w.vm and m.label in ZOOM_STEPS
            and m.end >= w.start - 1e-6]
    labels = _Labels(ax, 8.5)
    for m in mine:
        x0, x1 = m.start - w.start, m.end - w.start
        _bar(ax, x0, x1, 0, 0.42, color=ZOOM_STEPS[m.label], lw=0.6, ec="0.2", zorder=3)
        name = S.model(tl.model).step(int(m.label)).name
        labels.add((x0 + x1) / 2, f"{m.label} {name} {x1 - x0:.2f} s")
    if w.t0 is not None:
        ax.axvline(w.t0 - w.start, color="0.1", lw=1.0, zorder=4)
        ax.text(w.t0 - w.start, 0.42, "T0 (last C made) ", fontsize=8.5, va="top", ha="right",
                zorder=5)
    if w.seconds is not None:
        ax.text(w.seconds, -0.42, f" thawed: {w.seconds:.2f} s", fontsize=8.5,
                va="bottom", fontweight="bold", color=_window_color(w))
    labels.guess(width_px / (span * 1.05))
    return labels


def figure(tl: Timeline) -> Figure:
    """The picture of a timeline (a Figure on the Agg canvas): the whole job on top, then
    each VM's freeze window magnified."""
    n = len(tl.lanes)
    width = 16.0
    main_h = 0.34 * n + 0.6
    zoom_h = 1.0
    fig = Figure(figsize=(width, 2.6 + main_h + 1.1 * len(tl.windows) * zoom_h), dpi=100,
                 layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(1 + len(tl.windows), 1,
                            height_ratios=[main_h] + [zoom_h] * len(tl.windows))
    width_px = width * 100 * 0.8  # the axes, without the lane labels on the left
    labels = [_draw_main(fig.add_subplot(grid[0]), tl, width_px)]
    for i, w in enumerate(tl.windows):
        labels.append(_draw_zoom(fig.add_subplot(grid[1 + i]), tl, w, width_px))

    handles: list[Artist] = [Patch(color=COLOR[a], alpha=0.5, label=f"{a}: {ARTIFACT_ROLE[a]}")
                             for a in S.model(tl.model).artifacts]
    handles += [
        Patch(color=WRITES, label="the guest's writes go here (controller's target)"),
        Patch(color=FROZEN, label="guest frozen (flush-and-hold, steps 4-8)"),
        Patch(fill=False, ls="--", ec=LIMIT, label="flush-and-hold limit"),
        Patch(fill=False, hatch="////", ec=RECOVERY, label="step 10: auto-recovery writes A"),
        Patch(fill=False, hatch="xxx", ec=READ, label="step 13: read into the backup"),
        Patch(color="0.55", label="step running (gaps: hvlab measuring)"),
        Line2D([], [], color=STEP_GREY, ls=":", label="step start (number above)"),
    ]
    if any(sp.open_end for sp in tl.artifacts):
        handles.append(Line2D([], [], color="0.3", marker=">", ls="",
                              label="still there when the record ends"))
    fig.legend(handles=handles, loc="outside lower center", ncol=4, fontsize=8.5,
               frameon=False)
    fig.suptitle(tl.title, fontsize=12, fontweight="bold")
    fig.draw_without_rendering()  # a layout pass: now the labels have their real widths
    for group in labels:
        group.measure()
    return fig


def save(run: Run, events: list[Event], path: Path, fmt: str | None = None,
         state: str | None = None) -> Path:
    """Draw the run and write it to path (PNG or SVG, from fmt or the suffix)."""
    kind = fmt or path.suffix.lstrip(".").lower() or "png"
    if kind not in FORMATS:
        raise ValueError(f"picture format {kind!r}: use one of {', '.join(FORMATS)}")
    fig = figure(build(run, events, state))
    fig.savefig(path, format=kind, dpi=100)
    return path
