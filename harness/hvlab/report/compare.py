"""`hvlab explain --compare RUN RUN ...`: one lane per run (a Hyper-V generation each) on a
shared axis of phases (request ... cleanup), from the runs' own events: which steps ran in
each phase, what they made, removed or merged, where the live VM writes, where T0 is, where
the guest's fix-ups land and what the backup reads. Pure: the table (rich) and the picture
(compare_draw) are views of it."""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.table import Table

from hvlab.errors import BadInput
from hvlab.flow import steps as S
from hvlab.lab.record import Event, Run

PHASES = ("request", "guest", "freeze", "checkpoint", "T0", "thaw", "auto-recovery",
          "host snapshot", "read", "cleanup")
# What each artifact is, in the lanes' words.
NAMES = {"B": "B", "C": "C (checkpoint)", "A": "A (auto-recovery)", "S_B": "S_B (host)",
         "S_A": "S_A (host)", "D": "D (guest diff area)", "S_D": "S_D (host)",
         "G": "G (guest shadow copy)"}


@dataclass
class Cell:
    steps: list[str] = field(default_factory=list)  # "5 backup checkpoint"
    seconds: float = 0.0
    made: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    merged: list[str] = field(default_factory=list)
    writes: str = ""  # what the live VM writes to after the phase (B, C)
    t0: bool = False
    fixups: list[str] = field(default_factory=list)  # where the guest's fix-ups land
    reads: str = ""  # what the backup is read from

    def lines(self) -> list[str]:
        out = []
        if self.t0:
            out.append("T0")
        out += [f"+{x}" for x in self.made] + [f"-{x}" for x in self.removed]
        out += [f"{x} merged into B" for x in self.merged]
        out += [f"fix-ups -> {x}" for x in self.fixups]
        if self.reads:
            out.append(f"backup <- {self.reads}")
        if self.writes:
            out.append(f"VM writes {self.writes}")
        return out


@dataclass
class Lane:
    run: str
    model: str
    title: str
    state: str
    cells: dict[str, Cell]
    backup_holds: str  # in one line: what the image is


def _uniq(xs: list[str]) -> list[str]:
    return list(dict.fromkeys(xs))


def lane(run: Run, events: list[Event]) -> Lane:
    m = S.model(run.model)
    cells = {p: Cell() for p in PHASES}
    for ev in events:
        if ev.step is None:
            continue
        st = m.step(ev.step)
        c = cells[st.phase]
        label = f"{st.number} {st.name}"
        if label not in c.steps:
            c.steps.append(label)
        c.seconds += ev.seconds
        c.made = _uniq(c.made + [NAMES[a] for _, a in ev.artifacts("made")]
                       + [NAMES["G"] for x in ev.detail.get("made") or []
                          if isinstance(x, dict) and x.get("shadow")])
        c.removed = _uniq(c.removed + [NAMES.get(a, a) for _, a in ev.artifacts("removed")])
        c.merged = _uniq(c.merged + [a for _, a in ev.artifacts("merged")])
        roles = {w.get("artifact") for w in ev.writes_to.values()}
        if roles:
            c.writes = "/".join(sorted(str(r) for r in roles))
        if "t0" in ev.detail or st.phase == "T0":
            c.t0 = True
        if st.phase == "auto-recovery" and not ev.detail.get("skipped") and not ev.error:
            c.fixups.append("A (a fork of B at T0)" if "A" in m.artifacts else
                            "G (its store D)" if ev.vm else "S_B (rolled back to G)")
        if st.phase == "read" and not ev.error:
            c.reads = NAMES[m.source]
    holds = {"2012": "S_B rolled back to the guest's shadow copy: B at T0 + fix-ups",
             "2012r2": "S_A: A (B at T0 + fix-ups) in the host's snapshot",
             "2016": "A: B at T0 + fix-ups, read from the checkpoint"}.get(run.model, "?")
    return Lane(run.id, run.model, m.title, run.state, cells, holds)


def lanes(runs: list[tuple[Run, list[Event]]]) -> list[Lane]:
    if len(runs) < 2:
        raise BadInput("--compare needs two runs or more (one per Hyper-V generation)")
    return [lane(r, evs) for r, evs in runs]


def table(ls: list[Lane]) -> Table:
    t = Table(title="the Hyper-V generations side by side (one lane per run, phases left "
                    "to right)", show_lines=True)
    t.add_column("phase", no_wrap=True)
    for ln in ls:
        t.add_column(f"{ln.model}\nrun {ln.run} ({ln.state})")
    for p in PHASES:
        row = []
        for ln in ls:
            c = ln.cells[p]
            head = ", ".join(c.steps) if c.steps else "-"
            row.append("\n".join([f"[bold]{head}[/]", *c.lines()]))
        t.add_row(p, *row)
    t.add_row("the backup holds", *[ln.backup_holds for ln in ls])
    return t
