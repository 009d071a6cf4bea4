"""`make bench`, part 5: the three Hyper-V generations on the same lab, side by side in one
run. The default lab (as `hvlab up` makes it, named benchm); rounds of one backup of vm01
per model, the models' order rotated each round so that none always runs first; per model
the median freeze window (the run record's) and job wall time."""

from __future__ import annotations

from typing import Any

from hvlab.bench.flow import backup, lab_up, say
from hvlab.bench.report import median
from hvlab.flow import steps as S
from hvlab.lab import definition


def measure(rounds: int) -> dict[str, Any]:
    models = list(S.MODELS)
    got: dict[str, list[dict[str, Any]]] = {m: [] for m in models}
    defn = definition.load(None, name="benchm")
    with lab_up(defn):
        for r in range(rounds):
            order = models[r % len(models):] + models[:r % len(models)]
            for m in order:
                say(f"bench: model {m}, round {r + 1}/{rounds} ...")
                got[m].append(backup(defn.name, ["vm01"], model=m))
    out = []
    for m in models:
        ok = [b for b in got[m] if not b.get("error")]
        wins = [w for b in ok if (w := (b.get("windows_s") or {}).get("vm01")) is not None]
        out.append({"model": m, "title": S.model(m).title, "runs": len(got[m]),
                    "window_s": median(wins), "windows_s": wins,
                    "wall_s": median([b["wall_s"] for b in ok]),
                    "walls_s": [b["wall_s"] for b in ok],
                    "steps": len(S.model(m).steps),
                    "error": next((b["error"] for b in got[m] if b.get("error")), None)})
    return {"lab": "default", "vm": "vm01", "rounds": rounds, "points": out}
