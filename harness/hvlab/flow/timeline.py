"""`hvlab explain RUN --png/--svg`: a run as a timeline picture (matplotlib, Agg; no display).

x = seconds since the job started (the run's registration). Per VM a lane for the guest (its
freeze window against the flush-and-hold limit), per disk a lane per artifact (B, C, A, S_B,
S_A) with a bar over its lifetime: from the start of the step that made it to the end of the
step that removed or merged it (or to the end of the record). A red band inside the B or C bar
is where the guest's writes go (the controller's target after each step, `writes_to`). Step
starts are dotted lines labelled 1-14 (U: unwind). Pure functions of the run record and its
events: `build` computes the geometry, `figure` draws it, `save` writes PNG or SVG.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.text import Annotation

from hvlab.flow import steps as S
from hvlab.flow.consistency import CRASH

ARTS = ("B", "C", "A", "S_B", "S_A")
ROLE = {"B": "live disk", "C": "backup checkpoint", "A": "auto-recovery ckpt",
        "S_B": "host snapshot of B", "S_A": "host snapshot of A"}
COLOR = {"B": "#2e7d32", "C": "#ef8f00", "A": "#8e24aa", "S_B": "#1565c0", "S_A": "#4f9fe8"}
WRITES = "#d32f2f"
FROZEN = "#26c6da"
STEP_GREY = "0.45"
LIMIT = "#00838f"
RECOVERY = "#4a148c"
READ = "#0d47a1"
ZOOM_STEPS = {"4": "0.6", "5": "#f7c77f", "6": "#c692d4", "7": "0.6", "8": "0.6"}  # C, A colours
FLUSH_AND_HOLD_S = 10.0  # Hyper-V's flush-and-hold limit, when the run did not record it
FORMATS = ("png", "svg")


@dataclass(frozen=True)
class Span:
    """Something on a lane from start to end (seconds since the job started)."""

    lane: str
    start: float
    end: float
    open_end: bool = False  # still there when the record ends


@dataclass(frozen=True)
class StepMark:
    start: float
    end: float
    label: str  # "1".."14", "U" for an unwind
    vm: str | None
    failed: bool = False
    skipped: bool = False


@dataclass(frozen=True)
class Window:
    """A VM's freeze window (step 4 to the thaw in step 8)."""

    vm: str
    start: float
    end: float
    seconds: float | None  # the measured length; None: never thawed by step 8
    limit: float
    t0: float | None = None  # step 7: the last C made (the backup's point in time)


@dataclass
class Timeline:
    title: str
    t_end: float
    lanes: list[tuple[str, str]]  # (key, label), top to bottom
    artifacts: list[Span] = field(default_factory=list)
    writes: list[Span] = field(default_factory=list)
    recovery: list[Span] = field(default_factory=list)  # step 10 writing A
    reads: list[Span] = field(default_factory=list)  # step 13 reading S_A
    steps: list[StepMark] = field(default_factory=list)
    windows: list[Window] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)  # lane -> text after its last bar
    guest_notes: dict[str, str] = field(default_factory=dict)  # vm -> text (no freeze)
    merged: list[Span] = field(default_factory=list)  # C lanes merged into B at `end`
    end_label: str = "end"  # the run's state where the record ends


def _lanes(detail: dict[str, Any], key: str, art_of: dict[str, str]) -> list[str]:
    """Lanes of the explicit artifact list `key` ({vm, disk, artifact, lv}); records made
    before artifacts were explicit name LVs ("c -> b" for a merge)."""
    out = []
    for x in detail.get(key) or []:
        if isinstance(x, dict):
            out.append(f"{x['vm']}/{x['disk']} {x['artifact']}")
        elif (lv := str(x).split(" -> ")[0]) in art_of:
            out.append(art_of[lv])
    return out


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


def disk_keys(run: dict[str, Any]) -> list[tuple[str, str]]:
    """(vm, disk) of every disk in the run, in the run's order."""
    return [(vm, d) for vm in run["vms"] for d in run["vm"][vm]["disks"]]


class Record(Protocol):
    """A typed run record that converts to the JSON shape of run.json."""

    def to_dict(self) -> dict[str, Any]: ...


RunRecord = Mapping[str, Any] | Record


def as_dict(run: RunRecord, state: str | None = None) -> dict[str, Any]:
    """The run in run.json's shape (keys as stored, "class" for the consistency class),
    with state replaced when given (e.g. `interrupted` for a run whose process died)."""
    out = dict(run) if isinstance(run, Mapping) else run.to_dict()
    if state is not None:
        out["state"] = state
    return out


def title_of(run: dict[str, Any]) -> str:
    vms = ", ".join(f"{vm} ({run['vm'][vm].get('class') or 'class not decided'})"
                    for vm in run["vms"])
    return (f"hvlab run {run.get('id', '?')}  -  lab {run.get('lab', '?')}  -  {vms}  -  "
            f"{run.get('mode', 'on-host')}, {run.get('state', '?')}")


def build(record: RunRecord, events: list[dict[str, Any]], state: str | None = None
          ) -> Timeline:
    """Where every artifact, write target, freeze window and step lies in time."""
    run = as_dict(record, state)
    starts = [x for ev in events if (x := _num(ev.get("start"))) is not None]
    origin = _num(run.get("created")) or (min(starts) if starts else 0.0)

    def t(x: Any) -> float:
        v = _num(x)
        return 0.0 if v is None else max(0.0, v - origin)

    t_end = max([t(ev.get("end")) for ev in events] + [1e-3])
    lanes: list[tuple[str, str]] = [("steps", "job steps")]
    art_of: dict[str, str] = {}  # LV name -> lane
    for vm in run["vms"]:
        v = run["vm"][vm]
        lanes.append((f"{vm} guest", f"{vm} guest ({v.get('profile', '?')})"))
        for disk, info in v["disks"].items():
            for a in ARTS:
                lanes.append((f"{vm}/{disk} {a}", f"{disk}  {a}  {ROLE[a]}"))
                if info.get(a):
                    art_of[str(info[a])] = f"{vm}/{disk} {a}"
    tl = Timeline(title=title_of(run), t_end=t_end, lanes=lanes,
                  end_label=str(run.get("state") or "end"))
    keys = [f"{vm}/{d}" for vm, d in disk_keys(run)]
    born: dict[str, float] = {f"{k} B": 0.0 for k in keys}  # lane -> start of its bar
    target = {k: ("B", 0.0) for k in keys}  # disk -> (artifact the guest writes, since)

    def close(lane: str, end: float, open_end: bool = False) -> None:
        if lane in born:
            tl.artifacts.append(Span(lane, born.pop(lane), end, open_end))

    for ev in events:
        s, e = t(ev.get("start")), t(ev.get("end"))
        detail = ev.get("detail") or {}
        step = ev.get("step")
        tl.steps.append(StepMark(s, e, str(step) if step else "U", ev.get("vm"),
                                 failed=bool(ev.get("error")),
                                 skipped=bool(detail.get("skipped"))))
        for lane in _lanes(detail, "made", art_of):
            born.setdefault(lane, s)
        for fp_key, fps in (ev.get("fingerprints") or {}).items():  # made by a killed step
            for a in fps or {}:
                lane = f"{fp_key} {a}"
                if lane not in born and not any(x.lane == lane for x in tl.artifacts):
                    born[lane] = s
        for lane in _lanes(detail, "removed", art_of):
            close(lane, e)
        for lane in _lanes(detail, "merged", art_of):
            close(lane, e)
            tl.merged.append(Span(lane, s, e))
        if step is None:  # an unwind leaves only the live disks
            for lane in [x for x in born if not x.endswith(" B")]:
                close(lane, e)
        for k, where in (ev.get("writes_to") or {}).items():
            if k not in target:
                continue
            now = (where or {}).get("artifact", "?")
            cur, since = target[k]
            if now != cur:
                if cur in ("B", "C"):
                    tl.writes.append(Span(f"{k} {cur}", since, e))
                target[k] = (now, e)
        if step == 10 and not detail.get("skipped") and not ev.get("error"):
            tl.recovery += [Span(f"{k} A", s, e) for k in keys if k.startswith(f"{ev['vm']}/")]
        if step == 13 and not ev.get("error"):
            tl.reads += [Span(f"{k} S_A", s, e) for k in keys]
    for lane in list(born):
        close(lane, t_end, open_end=run.get("state") != "done")
    for k, (cur, since) in target.items():
        if cur in ("B", "C"):
            tl.writes.append(Span(f"{k} {cur}", since, t_end, open_end=True))
    for vm in run["vms"]:
        v = run["vm"][vm]
        w = v.get("window") or {}
        fs = _num(w.get("freeze_start"))
        limit = _num((v.get("freeze_reply") or {}).get("timeout_s")) or FLUSH_AND_HOLD_S
        if fs is not None:
            secs = _num(w.get("seconds"))
            if secs is not None:
                end = t(fs + secs)
            else:  # failed inside the window: the guest stayed frozen until the unwind
                after = [m.end for m in tl.steps if m.start >= t(fs) and m.label == "U"]
                end = min(after) if after else t_end
            t0 = _num(v.get("t0"))
            tl.windows.append(Window(vm, t(fs), end, secs, limit,
                                     t(t0) if t0 is not None else None))
        elif v.get("answers") is False:
            tl.guest_notes[vm] = (f"no freeze: {v.get('class') or 'crash-consistent'} "
                                  f"(the guest did not answer)")
        elif v.get("class") == CRASH:
            tl.guest_notes[vm] = "no freeze: crash-consistent"
    proxy = ((run.get("link") or {}).get("proxy") or {}).get("address")
    for key, img in (run.get("images") or {}).items():
        if proxy:
            tl.notes[f"{key} S_A"] = f"read off-host over NBD by the proxy at {proxy}"
        ranges = img.get("auto_recovery_ranges") or []
        n = sum(int(r.get("length", 0)) for r in ranges)
        tl.notes[f"{key} A"] = (f"auto-recovery changed {n / 1024:,.0f} KiB in {len(ranges)} "
                                f"range{'s' if len(ranges) != 1 else ''}")
    return tl


def stack(spans: list[tuple[float, float]], gap: float = 6.0) -> list[int]:
    """A row for each (left, right) span so that no two spans in a row overlap (greedy,
    left to right); rows count up from 0."""
    right: list[float] = []  # per row: where its last span ends
    rows = [0] * len(spans)
    for i in sorted(range(len(spans)), key=lambda i: spans[i][0]):
        left, end = spans[i]
        row = next((r for r, e in enumerate(right) if left > e + gap), len(right))
        if row == len(right):
            right.append(end)
        right[row] = end
        rows[i] = row
    return rows


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
    half = (len(S.STEPS) + 1) // 2
    names = ["    ".join(f"{s.number} {s.name}" for s in part)
             for part in (S.STEPS[:half], S.STEPS[half:])]
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
        name = S.step(int(m.label)).name
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

    handles: list[Artist] = [Patch(color=COLOR[a], alpha=0.5, label=f"{a}: {ROLE[a]}")
                             for a in ARTS]
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


def save(run: RunRecord, events: list[dict[str, Any]], path: Path, fmt: str | None = None,
         state: str | None = None) -> Path:
    """Draw the run and write it to path (PNG or SVG, from fmt or the suffix)."""
    kind = fmt or path.suffix.lstrip(".").lower() or "png"
    if kind not in FORMATS:
        raise ValueError(f"picture format {kind!r}: use one of {', '.join(FORMATS)}")
    fig = figure(build(run, events, state))
    fig.savefig(path, format=kind, dpi=100)
    return path
