"""Named fault points: where a test (or a curious user) makes a backup die, fail or hang.

`HVLAB_INJECT=POINT:ACTION[,POINT:ACTION...]` (or the hidden `hvlab backup --inject`) arms
points; ACTION is `kill` (SIGKILL, as a crash would), `raise` (a step fails: the run unwinds)
or `hang` (sleep until killed, at most an hour; it says so on stderr first, so a test knows
the moment has come), or `wait` (pause until the file named by HVLAB_INJECT_GO exists, at most
an hour: the moment for a test to do something to the devices, e.g. fill the pool inside the
freeze window; `<file>.waiting` appears while it waits). Every step boundary is a point
(`step-NN`, before step NN starts; `finish` after the last step), and so is every place inside
a step that does more than one thing. A point fires once per process.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from hvlab.errors import BadInput, HvlabError

ENV = "HVLAB_INJECT"
GO_ENV = "HVLAB_INJECT_GO"
ACTIONS = ("kill", "raise", "hang", "wait")

INSIDE: dict[str, str] = {
    "s05-one": "step 5: one C made (of possibly several), controllers suspended",
    "s05-snapshots": "step 5: every C made, controllers suspended, not yet redirected",
    "s05-reloaded": "step 5: C tables loaded, controllers still suspended",
    "s06-one": "step 6: one A made (of possibly several)",
    "s10-attached": "step 10: A attached to the guest, auto-recovery not yet asked",
    "s10-recovered": "step 10: the guest repaired A, A still attached",
    "s11-one": "step 11: the snapshot set made (one lvm batch), not yet recorded",
    "s12-one": "step 12: every A removed (one lvremove), not yet recorded",
    "s13-metadata": "step 13: the pool's metadata snapshot reserved",
    "s13-reading": "step 13: the first part of an image read and written (mid-read)",
    "s13-image": "step 13: one disk image written (mid-read of the job)",
    "s14-references": "step 14: S_A kept as the reference point (incremental runs), C not "
                      "yet merged",
    "s14-one": "step 14: every S (and each B a C replaces) removed, not yet recorded",
    "s14-base-removed": "step 14: B removed, C not yet renamed to B",
    "s14-renamed": "step 14: C renamed to B, its tags not yet fixed",
    "finish-manifest": "manifest written, run not yet marked done",
    # the 2012 model's own (flow/shadow.py)
    "gs-made": "2012 step 5: the guest's shadow copy G made, controller not yet B's origin",
    "gs-origin": "2012 step 5: every controller loaded as B's snapshot-origin, still held",
    "gs-recovered": "2012 step 8: the guest fixed up its shadow copy",
    "rv-merging": "2012 step 10: S_B being rolled back (snapshot-merge running)",
    "gs-dropped": "2012 step 12: the host's shadow copy removed, the guest's not yet",
}
BOUNDARIES: dict[str, str] = {
    **{f"step-{n:02d}": f"before step {n}" for n in range(1, 15)},
    "finish": "after step 14, before the manifest",
}
POINTS: dict[str, str] = {**BOUNDARIES, **INSIDE}


class InjectedFault(HvlabError):
    """Raised at an armed point with ACTION raise."""


def parse(spec: str) -> dict[str, str]:
    """'a:kill,b:raise' -> {a: kill, b: raise}; one line naming what is wrong otherwise."""
    armed: dict[str, str] = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        point, _, action = item.partition(":")
        if point not in POINTS:
            raise BadInput(f"unknown fault point {point!r}: one of {', '.join(POINTS)}")
        if action not in ACTIONS:
            raise BadInput(f"unknown fault action {action!r} at {point}: "
                           f"one of {', '.join(ACTIONS)}")
        armed[point] = action
    return armed


_fired: set[str] = set()


def point(name: str) -> None:
    """Pass a fault point: does nothing unless it is armed."""
    assert name in POINTS, f"unregistered fault point {name}"
    spec = os.environ.get(ENV)
    if not spec or name in _fired:
        return
    action = parse(spec).get(name)
    if action is None:
        return
    _fired.add(name)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "wait":
        _wait(name)
        return
    if action == "hang":
        sys.stderr.write(f"hvlab: hanging at fault point {name} (injected)\n")
        sys.stderr.flush()
        deadline = time.monotonic() + 3600
        while time.monotonic() < deadline:
            time.sleep(0.5)
    raise InjectedFault(f"injected fault at {name}")


def _wait(name: str) -> None:
    go = os.environ.get(GO_ENV)
    if not go:
        raise InjectedFault(f"fault point {name}: wait needs {GO_ENV}=FILE")
    waiting = f"{go}.waiting"
    with open(waiting, "w") as f:
        f.write(f"{os.getpid()} {name}\n")
    try:
        deadline = time.monotonic() + 3600
        while not os.path.exists(go) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        os.unlink(waiting)
    if os.path.exists(go):
        os.unlink(go)
