"""`hvlab explain RUN --png/--svg` on a real backup run, through the real command line: the
timeline picture of what the 14 steps did to a two-disk windows VM (run in the lab VM)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hvlab.flow import engine
from hvlab.lab.record import Event, Run
from hvlab.report import geometry
from hvlab_fixtures.pictures import check_png, check_svg
from hvlab_fixtures.plugin import LabHandle

pytestmark = pytest.mark.integration


def test_explain_draws_a_real_run(lab_with_guests: LabHandle, tmp_path: Path) -> None:
    h = lab_with_guests
    n = h.defn.name
    run_ = engine.start(n, ["vm01"]).to_dict()  # the record as run.json has it
    assert run_["state"] == "done"
    rid = run_["id"]
    work = tmp_path / "work"
    work.mkdir()
    # Relative paths: the command resolves them against its directory and says where it wrote.
    res = subprocess.run([sys.executable, "-m", "hvlab.cli", "explain", "-n", n, rid,
                          "--png", "t.png", "--svg", "../t.svg", "--table-svg", "tables.svg"],
                         capture_output=True, text=True, env=os.environ, timeout=300, cwd=work)
    assert res.returncode == 0, res.stderr
    png, svg = work / "t.png", tmp_path / "t.svg"
    for path in (png, svg, work / "tables.svg"):
        assert f"saved {path}\n" in res.stdout, res.stdout[-500:]
    w, hgt = check_png(png)
    assert w >= 1200 and hgt >= 600, (w, hgt)
    window = run_["vm"]["vm01"]["window"]["seconds"]
    ranges = {k: i["auto_recovery_ranges"] for k, i in run_["images"].items()}
    assert any(ranges.values()), "auto-recovery changed nothing in A"
    notes = [f"auto-recovery changed {sum(r['length'] for r in rs) / 1024:,.0f} KiB in "
             f"{len(rs)} range" for rs in ranges.values()]
    check_svg(svg, [f'<g id="step-{s}">' for s in range(1, 15)] + [
        rid, "vm01 (application-consistent)", "disk1  S_A",
        f"frozen {window:.2f} s of the 10 s flush-and-hold limit", *notes])
    assert check_svg(work / "tables.svg", []).count("<svg") >= 1
    # What the picture says is what the events say: C from step 5 until the merge in 14.
    raw = subprocess.run([sys.executable, "-m", "hvlab.cli", "explain", "-n", n, rid, "--json"],
                         capture_output=True, text=True, env=os.environ, timeout=300, check=True)
    rec = json.loads(raw.stdout)
    tl = geometry.build(Run.from_dict(rec["run"]), [Event.from_dict(e) for e in rec["events"]])
    by_step = {m.label: m for m in tl.steps}
    bars = {sp.lane: sp for sp in tl.artifacts}
    for disk in ("disk0", "disk1"):
        assert bars[f"vm01/{disk} C"].start == by_step["5"].start
        assert bars[f"vm01/{disk} C"].end == by_step["14"].end
        assert bars[f"vm01/{disk} A"].end == by_step["12"].end
        assert any(sp.lane == f"vm01/{disk} C" and sp.start == by_step["5"].end
                   for sp in tl.writes), "writes go to C from the end of step 5"
    # Bad paths: one line, exit 2, nothing written.
    bad = subprocess.run([sys.executable, "-m", "hvlab.cli", "explain", "-n", n, rid,
                          "--png", str(tmp_path / "no" / "t.png")],
                         capture_output=True, text=True, env=os.environ, timeout=300)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "no directory" in bad.stderr and not (tmp_path / "no").exists()
