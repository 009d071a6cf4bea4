"""Where every artifact, write target, freeze window and step of a run lies in time: pure
functions of the typed run record and its events (report/draw.py draws it).

x = seconds since the job started (the run's registration). Per VM a lane for the guest (its
freeze window against the flush-and-hold limit), per disk a lane per artifact (B, C, A, S_B,
S_A) with a bar over its lifetime: from the start of the step that made it to the end of the
step that removed or merged it (or to the end of the record). The guest's writes are a span
inside the B or C bar (the controller's target after each step, `writes_to`). Steps are
marks labelled 1-14 (U: unwind).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from hvlab.flow import steps as S
from hvlab.flow.consistency import CRASH
from hvlab.lab.paths import ARTIFACT_ROLE
from hvlab.lab.record import Event, Run

FLUSH_AND_HOLD_S = 10.0  # Hyper-V's flush-and-hold limit, when the run did not record it


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
    model: str = "2012r2"  # the run's Hyper-V generation (its step names)


def _lanes(ev: Event, what: str, art_of: dict[str, str]) -> list[str]:
    """Lanes of the explicit artifact list `what` ({vm, disk, artifact, lv}); records made
    before artifacts were explicit name LVs ("c -> b" for a merge)."""
    out = [f"{key} {art}" for key, art in ev.artifacts(what)]
    for x in ev.detail.get(what) or []:
        if not isinstance(x, dict) and (lv := str(x).split(" -> ")[0]) in art_of:
            out.append(art_of[lv])
    return out


def title_of(run: Run, state: str) -> str:
    vms = ", ".join(f"{vm} ({run.vm[vm].cls or 'class not decided'})" for vm in run.vms)
    return f"hvlab run {run.id}  -  lab {run.lab}  -  {vms}  -  {run.mode}, {state}"


def build(run: Run, events: list[Event], state: str | None = None) -> Timeline:
    """Where every artifact, write target, freeze window and step lies in time. `state`
    replaces the run's own (e.g. `interrupted` for a run whose process died)."""
    state = state or run.state
    origin = run.created or min((ev.start for ev in events), default=0.0)

    def t(x: float) -> float:
        return max(0.0, x - origin)

    t_end = max([t(ev.end) for ev in events] + [1e-3])
    model = S.model(run.model)
    lanes: list[tuple[str, str]] = [("steps", "job steps")]
    art_of: dict[str, str] = {}  # LV name -> lane
    for vm in run.vms:
        v = run.vm[vm]
        lanes.append((f"{vm} guest", f"{vm} guest ({v.profile})"))
        for disk, info in v.disks.items():
            for a in model.artifacts:
                lanes.append((f"{vm}/{disk} {a}", f"{disk}  {a}  {ARTIFACT_ROLE[a]}"))
                if lv := info.lv(a):
                    art_of[lv] = f"{vm}/{disk} {a}"
    tl = Timeline(title=title_of(run, state), t_end=t_end, lanes=lanes, end_label=state,
                  model=run.model)
    keys = [f"{vm}/{d}" for vm, d, _ in run.disks()]
    born: dict[str, float] = {f"{k} B": 0.0 for k in keys}  # lane -> start of its bar
    target = {k: ("B", 0.0) for k in keys}  # disk -> (artifact the guest writes, since)

    def close(lane: str, end: float, open_end: bool = False) -> None:
        if lane in born:
            tl.artifacts.append(Span(lane, born.pop(lane), end, open_end))

    for ev in events:
        s, e = t(ev.start), t(ev.end)
        tl.steps.append(StepMark(s, e, str(ev.step) if ev.step else "U", ev.vm,
                                 failed=bool(ev.error), skipped=bool(ev.detail.get("skipped"))))
        for lane in _lanes(ev, "made", art_of):
            born.setdefault(lane, s)
        for fp_key, fps in (ev.fingerprints or {}).items():  # made by a killed step
            for art in fps or {}:
                lane = f"{fp_key} {art}"
                if lane not in born and not any(x.lane == lane for x in tl.artifacts):
                    born[lane] = s
        for lane in _lanes(ev, "removed", art_of):
            close(lane, e)
        for lane in _lanes(ev, "merged", art_of):
            close(lane, e)
            tl.merged.append(Span(lane, s, e))
        if ev.step is None:  # an unwind leaves only the live disks
            for lane in [x for x in born if not x.endswith(" B")]:
                close(lane, e)
        for k in ev.writes_to:
            if k not in target:
                continue
            now = ev.writes(k) or "?"
            cur, since = target[k]
            if now != cur:
                if cur in ("B", "C"):
                    tl.writes.append(Span(f"{k} {cur}", since, e))
                target[k] = (now, e)
        phase = model.step(ev.step).phase if ev.step else ""
        if phase == "auto-recovery" and not ev.detail.get("skipped") and not ev.error:
            # what the fix-ups write: A; in 2012 the guest's store D, then the host's S_B
            fixed = "A" if "A" in model.artifacts else "D" if ev.vm else "S_B"
            tl.recovery += [Span(f"{k} {fixed}", s, e) for k in keys
                            if ev.vm is None or k.startswith(f"{ev.vm}/")]
        if phase == "read" and not ev.error:
            tl.reads += [Span(f"{k} {model.source}", s, e) for k in keys]
    for lane in list(born):
        close(lane, t_end, open_end=state != "done")
    for k, (cur, since) in target.items():
        if cur in ("B", "C"):
            tl.writes.append(Span(f"{k} {cur}", since, t_end, open_end=True))
    for vm in run.vms:
        _guest(tl, run, vm, t, t_end)
    proxy = ((run.link or {}).get("proxy") or {}).get("address")
    for key, img in run.images.items():
        if proxy:
            tl.notes[f"{key} S_A"] = f"read off-host over NBD by the proxy at {proxy}"
        ranges = img.get("auto_recovery_ranges") or []
        n = sum(int(r.get("length", 0)) for r in ranges)
        tl.notes[f"{key} A"] = (f"auto-recovery changed {n / 1024:,.0f} KiB in {len(ranges)} "
                                f"range{'s' if len(ranges) != 1 else ''}")
    return tl


def _guest(tl: Timeline, run: Run, vm: str, t: Callable[[float], float], t_end: float) -> None:
    """The VM's freeze window against its flush-and-hold limit, or why it had none."""
    v = run.vm[vm]
    limit = float((v.freeze_reply or {}).get("timeout_s") or FLUSH_AND_HOLD_S)
    if v.window is not None:
        fs, secs = v.window.freeze_start, v.window.seconds
        if secs is not None:
            end = t(fs + secs)
        else:  # failed inside the window: the guest stayed frozen until the unwind
            after = [m.end for m in tl.steps if m.start >= t(fs) and m.label == "U"]
            end = min(after) if after else t_end
        tl.windows.append(Window(vm, t(fs), end, secs, limit,
                                 t(v.t0) if v.t0 is not None else None))
    elif v.answers is False:
        tl.guest_notes[vm] = (f"no freeze: {v.cls or 'crash-consistent'} "
                              f"(the guest did not answer)")
    elif v.cls == CRASH:
        tl.guest_notes[vm] = "no freeze: crash-consistent"


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
