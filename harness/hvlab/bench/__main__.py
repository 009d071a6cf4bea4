"""`make bench` (issue 10): side by side in one run, in the lab VM or natively.

1. the freeze window of one VM of 1, 2, 4, 8 disks (real backups, from the run record), next
   to its floor measured in the same run (bench_floor: suspend + create_snap + resume of as
   many thin devices by ioctl) and the 10 s limit; the per-disk skew when recorded
2. the wall time of jobs of 1, 4, 8 one-disk VMs (the median of five) and its ratio to one
   VM, and each once more with the guests' writers paused; the time of each step of the
   default lab's vm01 backup
3. the full-backup reader against dd on the same mapped extents of the same snapshot

Writes bench-results/bench.json, bench.txt (the tables) and window/jobs/steps/reader.png.
`python -m hvlab.bench --quick`: fewer sizes and repeats (a smoke run, a few minutes).
Every lab is removed however a part ends; a failed part is named and the others still run
(exit 1 then).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hvlab.bench import floor as bench_floor
from hvlab.bench import flow as bench_flow
from hvlab.bench import incr as bench_incr
from hvlab.bench import models as bench_models
from hvlab.bench import plots
from hvlab.bench import read as bench_read
from hvlab.bench import report as bench_report
from hvlab.lab import paths
from hvlab.vm import runner


@dataclass(frozen=True)
class Config:
    window: tuple[int, ...]  # disks per VM
    jobs: tuple[int, ...]  # VMs per job
    floor_repeat: int
    read_repeat: int
    job_repeat: int
    model_rounds: int  # backups of each Hyper-V generation


FULL = Config(window=(1, 2, 4, 8), jobs=(1, 4, 8), floor_repeat=5, read_repeat=3, job_repeat=5,
              model_rounds=3)
QUICK = Config(window=(1, 2), jobs=(1, 2), floor_repeat=2, read_repeat=1, job_repeat=1,
               model_rounds=1)


def runner_name() -> str:
    if runner.in_vm():
        return f"uml lab VM (user-mode-linux {os.uname().release})"
    return runner.choose()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m hvlab.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="window for 1, 2 disks, jobs of 1, 2 VMs, fewer repeats")
    ap.add_argument("--out", type=Path, default=Path("bench-results"),
                    help="results folder (default: bench-results)")
    return ap.parse_args(argv)


def _interrupt_on_signals() -> None:
    """SIGTERM (the lab VM's agent passing on a Ctrl-C) and SIGHUP end the bench as Ctrl-C
    does: the running backup unwinds, the labs come down. Later signals are ignored so they
    cannot cut that short."""
    def interrupt(signum: int, _frame: object) -> None:
        for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)
        raise KeyboardInterrupt(f"signal {signum}")

    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, interrupt)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _interrupt_on_signals()
    cfg = QUICK if args.quick else FULL
    os.environ.setdefault("HVLAB_HOME", "/var/tmp/hvlab-bench")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    repo = Path(__file__).resolve().parents[3]  # harness/hvlab/bench/__main__.py
    res: dict[str, Any] = {
        "meta": {"kernel": os.uname().release, "runner": runner_name(),
                 "machine": bench_report.machine(),
                 "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
                 "git_commit": bench_report.git_commit(repo), "quick": args.quick,
                 "config": asdict(cfg),
                 "parts_s": {}},
        "floor": None, "window": {"limit_s": bench_report.WINDOW_LIMIT_S,
                                  "disk_size": bench_flow.DISK_SIZE, "fs": bench_flow.DISK_FS,
                                  "profile": bench_flow.PROFILE, "points": []},
        "jobs": {"points": []}, "steps": None, "reader": None, "incremental": None,
        "models": None, "goals": [],
        "errors": {}}

    def part(name: str, fn: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        try:
            return fn()
        except KeyboardInterrupt:
            res["errors"][name] = "interrupted"
            print(f"bench: interrupted in part {name}; removing its lab", file=sys.stderr)
            raise
        except Exception as exc:  # the others still run; the part is named in the results
            res["errors"][name] = f"{type(exc).__name__}: {exc}"
            print(f"bench: part {name} FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
            traceback.print_exc(limit=3)
            return None
        finally:
            res["meta"]["parts_s"][name] = round(time.perf_counter() - t, 1)

    try:
        bench_flow.say("bench: floor (suspend + create_snap + resume by ioctl) ...")
        res["floor"] = part("floor", lambda: bench_floor.measure(
            paths.home() / "bench-floor", counts=cfg.window, repeat=cfg.floor_repeat))
        part("window", lambda: bench_flow.window(cfg.window, res["floor"],
                                                 res["window"]["points"]))
        part("jobs", lambda: bench_flow.jobs(cfg.jobs, res["jobs"]["points"], cfg.job_repeat))
        bench_report.job_ratios(res["jobs"]["points"])
        res["steps"] = part("steps", bench_flow.default_steps)
        res["reader"] = part("reader", lambda: bench_read.measure(
            cfg.read_repeat, paths.home() / "bench-read"))
        res["incremental"] = part("incremental", lambda: bench_incr.measure(
            paths.home() / "bench-incr"))
        res["models"] = part("models", lambda: bench_models.measure(cfg.model_rounds))
    finally:  # an interrupt still leaves what was measured
        res["goals"] = bench_report.goals(res)
        (out / "bench.json").write_text(json.dumps(res, indent=2) + "\n")
        text = bench_report.render_text(res)
        (out / "bench.txt").write_text(text)
        plots.plots(res, out)
    print(text)
    if res["errors"]:
        print(f"bench: FAILED parts: {', '.join(res['errors'])}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
