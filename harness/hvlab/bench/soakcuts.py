"""`make soak CUTS=N`: the soak with power cuts added to its kills and raises.

The soak's cycles run in the lab VM; a power cut kills the VM itself, so this driver runs on
the host. It picks N of the cycles; the soak runs in parts (`soak --attach --keep`) up to
each of them, and a random 0.3-6 s into that cycle (a backup running, its kill or recovery,
or after it) the VM loses power. Then, as after a real outage: `hvlab up` (a new VM, the lab
restarted with its data), every transaction a guest acknowledged before the cut (the
journal's figure at the cycle's start and the guest's own ack log, kept outside its disks)
must be on its live disks, nothing may be wrong but what the dead run left, and `hvlab
recover` must leave the lab exactly as defined. The soak goes on with the next cycle, each
cycle replaying from the seed whatever was cut before it. At the end: every finished backup
verifies and thin_check is clean (the last part's checks), and the moments tried per step.
Results: soak-results/soak-<seed>-cuts.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

from hvlab.bench.soak import LAB, SoakFailure, check
from hvlab.flow import steps
from hvlab.guest.writers import last_ack
from hvlab.lab.paths import Names
from hvlab.vm import control
from hvlab_fixtures.plugin import lab_toml

NAME = "soak"
# What a restart may find before recover: the dead run's checkpoints and snapshots (B gone
# while a merge was half done: C took its place), never damaged metadata, disagreeing
# transaction ids, or a missing controller or mount.
LEFT_BY_A_RUN = re.compile(r"LV \S+ (\(|is tagged as a backup)|missing LV vm0\d_disk\d$")


def hvlab(*args: str, timeout: float = 900) -> str:
    res = subprocess.run([sys.executable, "-m", "hvlab.cli", *args], capture_output=True,
                         text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    check(res.returncode == 0, f"hvlab {' '.join(args)}: {res.stdout[-800:]}"
                               f"{res.stderr[-800:]}")
    return res.stdout


def down() -> None:
    """The soak's lab gone, whatever state a failure left it in (a purge: its backups too)."""
    subprocess.run([sys.executable, "-m", "hvlab.cli", "down", "-n", NAME, "--purge",
                    "--force"], capture_output=True, stdin=subprocess.DEVNULL, timeout=900)


def after_cut() -> dict[str, Any]:
    out = hvlab("vm", "run", "--", sys.executable, "-m", "hvlab.bench.soak", "--after-cut")
    got: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return got


class Part:
    """One part of the soak, in the lab VM, its output echoed here."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "hvlab.cli", "vm", "run", "--",
                                      sys.executable, "-m", "hvlab.bench.soak", *argv],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, stdin=subprocess.DEVNULL)
        self.tail: list[str] = []
        threading.Thread(target=self._echo, daemon=True).start()

    def _echo(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            self.tail = [*self.tail[-20:], line]

    def failed(self) -> bool:
        return self.proc.poll() not in (None, 0)


def journal(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):  # the last line, torn by the cut
            out.append(json.loads(line))
    return out


def moment(lines: list[dict[str, Any]], cut: int, names: Names) -> str:
    """Where cycle `cut` stood when the power went, from the journal and its run's record."""
    if any(x["cycle"] == cut and x["event"] == "end" for x in lines):
        return "between cycles"
    start = next(x for x in lines if x["cycle"] == cut and x["event"] == "start")
    recs = sorted(names.runs_dir.glob("r*/run.json"))[start["runs"]:]
    if not recs:
        return "before the backup"
    r = json.loads(recs[-1].read_text())
    last = r.get("last_step") or 0
    if r["state"] in ("running", "paused"):
        return "finishing" if last >= steps.LAST else f"step {last + 1:2d}"
    if r["state"] == "aborting":
        return "unwinding"
    return f"after a {r['state']} run (the cycle's recovery and checks)"


def main() -> int:
    ap = argparse.ArgumentParser(prog="hvlab.bench.soakcuts")
    ap.add_argument("--cycles", type=int, default=15)
    ap.add_argument("--cuts", type=int, default=1)
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    rng = random.Random(f"{seed}:cuts")
    cuts = sorted(rng.sample(range(args.cycles), min(args.cuts, args.cycles)))
    os.environ.setdefault("HVLAB_HOME", "/var/tmp/hvlab-soak")
    names = Names(NAME)
    out_dir = Path("soak-results").resolve()
    out_dir.mkdir(exist_ok=True)
    path = out_dir / f"journal-{seed}.jsonl"
    path.unlink(missing_ok=True)
    lab_file = out_dir / "soak-lab.toml"
    lab_file.write_text(lab_toml(LAB))
    print(f"soak seed {seed}: {args.cycles} cycles, power cuts in cycles "
          f"{', '.join(str(c + 1) for c in cuts)}", flush=True)
    result: dict[str, Any] = {"seed": seed, "cycles": args.cycles, "cuts": [], "ok": False}
    start = time.time()
    first = 0
    try:
        down()
        hvlab("up", "--lab", str(lab_file))
        check(not cuts or control.pid() is not None,
              "power cuts need the lab VM, and this host runs labs natively")
        for cut in [*cuts, None]:
            last = args.cycles if cut is None else cut + 1
            part = Part(["--attach", "--first", str(first), "--cycles", str(last - first),
                         "--seed", str(seed), "--journal", str(path),
                         *(["--keep"] if cut is not None else [])])
            if cut is None:
                part.proc.wait()
                check(part.proc.returncode == 0, "the last part failed: "
                      + "".join(part.tail[-3:]).strip())
                break
            while not any(x["cycle"] == cut for x in journal(path)):
                check(not part.failed(), "a part failed: " + "".join(part.tail[-3:]).strip())
                time.sleep(0.05)
            delay = round(rng.uniform(0.3, 6.0), 1)
            with contextlib.suppress(subprocess.TimeoutExpired):
                part.proc.wait(delay)
            check(not part.failed(), "a part failed: " + "".join(part.tail[-3:]).strip())
            lines = journal(path)
            where = moment(lines, cut, names)
            helpers = control.power_cut()
            part.proc.wait(60)
            start_line = next(x for x in lines if x["cycle"] == cut and x["event"] == "start")
            acked = dict(start_line["acked"])
            for vm in acked:
                ack = last_ack(names.guest_dir(vm))
                acked[vm] = max(acked[vm], ack[0] if ack else 0)
            t = time.monotonic()
            hvlab("up", "--lab", str(lab_file))
            check(not [p for p in helpers if psutil.pid_exists(p)],
                  "helpers of the killed lab VM outlived `hvlab up`")
            seen = after_cut()
            lost = {vm: (n, seen["live"].get(vm)) for vm, n in acked.items()
                    if (seen["live"].get(vm) or 0) < n}
            check(not lost, f"cycle {cut + 1}, cut {where}: acknowledged transactions lost "
                            f"(acked, on the live disk): {lost}")
            bad = [p for p in seen["problems"] if not LEFT_BY_A_RUN.match(p)]
            check(not bad, f"cycle {cut + 1}, cut {where}: after the restart: {bad}")
            said = hvlab("recover", "-n", NAME)
            left = after_cut()["problems"]
            check(not left, f"cycle {cut + 1}, cut {where}: left after recover: {left}; {said}")
            result["cuts"].append({"cycle": cut + 1, "delay": delay, "at": where,
                                   "acked": acked, "live": seen["live"],
                                   "recover_s": round(time.monotonic() - t, 1)})
            print(f"power cut in cycle {cut + 1}, {delay} s in: {where}; up and recover in "
                  f"{time.monotonic() - t:.0f} s, acknowledged {acked}, on the live disks "
                  f"{seen['live']}", flush=True)
            first = cut + 1
        result["ok"] = True
    except (SoakFailure, subprocess.TimeoutExpired) as exc:
        result["failure"] = str(exc)
        print(f"SOAK FAILED (seed {seed}): {exc}", flush=True)
    finally:
        result["seconds"] = round(time.time() - start, 1)
        result["moments"] = dict(Counter(c["at"] for c in result["cuts"]))
        (out_dir / f"soak-{seed}-cuts.json").write_text(json.dumps(result, indent=1))
        down()
    print(f"soak seed {seed}: {args.cycles} cycles, {len(result['cuts'])} power cuts "
          f"({', '.join(f'{k} {v}' for k, v in sorted(result['moments'].items()))}), "
          f"{result['seconds']} s: {'ok' if result['ok'] else 'FAILED'}", flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
