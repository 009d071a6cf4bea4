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

from hvlab.bench.soak import LAB, SoakFailure, check
from hvlab.flow import steps
from hvlab.guest.writers import last_ack
from hvlab.lab import definition
from hvlab.lab.paths import Names
from hvlab.vm import control, runner
from hvlab_fixtures.plugin import lab_toml

NAME = "soak"
VMS = [vm.name for vm in definition.parse(LAB).vms]
GAP = 4  # cycles between the cycles two cuts aim at
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


def moment(lines: list[dict[str, Any]], names: Names) -> tuple[int, str]:
    """The cycle the power went in (the last one started) and where it stood, from the
    journal and its run's record, read after the cut."""
    start = [x for x in lines if x["event"] == "start"][-1]
    k = start["cycle"]
    if any(x["cycle"] == k and x["event"] == "end" for x in lines):
        return k, "between cycles"
    recs = sorted(names.runs_dir.glob("r*/run.json"))[start["runs"]:]
    if not recs:
        return k, "before the backup"
    r = json.loads(recs[-1].read_text())
    last = r.get("last_step") or 0
    if r["state"] in ("running", "paused"):
        return k, "finishing" if last >= steps.LAST else f"step {last + 1:2d}"
    if r["state"] == "aborting":
        return k, "unwinding"
    return k, f"the cycle's recovery and checks (its run {r['state']})"


def plan(rng: random.Random, cycles: int, cuts: int) -> list[int]:
    """The cycles N cuts are aimed at, GAP apart: a cut lands up to 6 s into its cycle,
    which may be a later one (a cycle takes 2-5 s); the soak goes on from the next."""
    if cuts * (GAP + 1) > cycles:
        raise SoakFailure(f"{cuts} power cuts need at least {cuts * (GAP + 1)} cycles")
    return [x + GAP * i for i, x in enumerate(sorted(rng.sample(range(cycles - GAP * cuts),
                                                                cuts)))]


def lost(acked: dict[str, int], acks: dict[str, tuple[int, str] | None],
         live: dict[str, dict[str, Any]]) -> dict[str, str]:
    """What a restart lost of what the guests acknowledged: per VM, the ledger read back is
    consistent, at or past the acknowledged txid, and where it ends at the ack log's last
    line, with that line's chain hash."""
    out = {}
    for vm, n in acked.items():
        got, ack = live.get(vm), acks.get(vm)
        if got is None or not got["consistent"]:
            out[vm] = f"ledger unreadable or inconsistent: {got}"
        elif got["txid"] < n:
            out[vm] = f"acknowledged txid {n}, on the live disks {got['txid']}"
        elif ack is not None and got["txid"] == ack[0] and got["hash"] != ack[1]:
            out[vm] = f"txid {ack[0]}: chain hash {got['hash']} on disk, {ack[1]} acknowledged"
    return out


def main() -> int:
    ap = argparse.ArgumentParser(prog="hvlab.bench.soakcuts")
    ap.add_argument("--cycles", type=int, default=15)
    ap.add_argument("--cuts", type=int, default=1)
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    rng = random.Random(f"{seed}:cuts")
    os.environ.setdefault("HVLAB_HOME", "/var/tmp/hvlab-soak")
    # A lab VM of its own: the cuts must not kill one the user's labs live in.
    os.environ.setdefault("HVLAB_VM_DIR", "/var/tmp/hvlab-soak-vm")
    names = Names(NAME)
    out_dir = Path("soak-results").resolve()
    out_dir.mkdir(exist_ok=True)
    path = out_dir / f"journal-{seed}.jsonl"
    path.unlink(missing_ok=True)
    lab_file = out_dir / "soak-lab.toml"
    lab_file.write_text(lab_toml(LAB))
    result: dict[str, Any] = {"seed": seed, "cycles": args.cycles, "cuts": [], "ok": False}
    start = time.time()
    try:
        if runner.choose() != "uml":
            raise SoakFailure("power cuts need the lab VM (user-mode-linux), and this host "
                              "runs labs natively or not at all: use `make soak` without CUTS")
        aims = plan(rng, args.cycles, args.cuts)
        print(f"soak seed {seed}: {args.cycles} cycles, power cuts aimed at cycles "
              f"{', '.join(str(c + 1) for c in aims)}", flush=True)
        down()
        hvlab("up", "--lab", str(lab_file))
        first = 0
        for aim in [*aims, None]:
            if aim is not None and aim < first:
                continue  # an earlier cut landed past it
            part = Part(["--attach", "--first", str(first), "--cycles",
                         str(args.cycles - first), "--seed", str(seed), "--journal", str(path),
                         *(["--keep"] if aim is not None else [])])
            if aim is None:
                part.proc.wait()
                check(part.proc.returncode == 0, "the last part failed: "
                      + "".join(part.tail[-3:]).strip())
                break
            while not any(x["cycle"] == aim for x in journal(path)):
                check(part.proc.poll() is None, "a part ended before cycle "
                      f"{aim + 1}: " + "".join(part.tail[-3:]).strip())
                time.sleep(0.05)
            delay = round(rng.uniform(0.3, 6.0), 1)
            with contextlib.suppress(subprocess.TimeoutExpired):
                part.proc.wait(delay)
            check(not part.failed(), "a part failed: " + "".join(part.tail[-3:]).strip())
            control.power_cut()
            part.proc.wait(60)
            lines = journal(path)
            k, where = moment(lines, names)
            begun = next(x for x in lines if x["cycle"] == k and x["event"] == "start")
            acks = {vm: last_ack(names.guest_dir(vm)) for vm in VMS}
            acked = {vm: max(int(begun["acked"].get(vm, 0)), a[0] if a else 0)
                     for vm, a in acks.items()}
            t = time.monotonic()
            hvlab("up", "--lab", str(lab_file))
            seen = after_cut()
            gone = lost(acked, acks, seen["live"])
            check(not gone, f"cycle {k + 1}, cut {where}: acknowledged transactions lost: "
                            f"{gone}")
            bad = [p for p in seen["problems"] if not LEFT_BY_A_RUN.match(p)]
            check(not bad, f"cycle {k + 1}, cut {where}: after the restart: {bad}")
            said = hvlab("recover", "-n", NAME)
            left = after_cut()["problems"]
            check(not left, f"cycle {k + 1}, cut {where}: left after recover: {left}; {said}")
            live = {vm: x["txid"] for vm, x in seen["live"].items()}
            result["cuts"].append({"cycle": k + 1, "aimed": aim + 1, "delay": delay,
                                   "at": where, "acked": acked, "live": live,
                                   "recover_s": round(time.monotonic() - t, 1)})
            print(f"power cut in cycle {k + 1}, {delay} s after cycle {aim + 1} began: {where};"
                  f" up and recover in {time.monotonic() - t:.0f} s, acknowledged {acked}, on "
                  f"the live disks {live}", flush=True)
            first = k + 1
        result["ok"] = True
    except (SoakFailure, subprocess.TimeoutExpired) as exc:
        result["failure"] = str(exc)
        print(f"SOAK FAILED (seed {seed}): {exc}", flush=True)
    finally:
        result["seconds"] = round(time.time() - start, 1)
        result["moments"] = dict(Counter(c["at"] for c in result["cuts"]))
        (out_dir / f"soak-{seed}-cuts.json").write_text(json.dumps(result, indent=1))
        if result["ok"]:
            down()
            subprocess.run([sys.executable, "-m", "hvlab.cli", "vm", "down"],
                           capture_output=True, stdin=subprocess.DEVNULL, timeout=120)
        else:  # the evidence stays: the lab, its guests' logs, the VM
            print(f"the lab {NAME} is kept for a look (HVLAB_HOME={os.environ['HVLAB_HOME']}, "
                  f"HVLAB_VM_DIR={os.environ['HVLAB_VM_DIR']}); `hvlab down -n {NAME} "
                  f"--purge --force` removes it", flush=True)
    print(f"soak seed {seed}: {args.cycles} cycles, {len(result['cuts'])} power cuts "
          f"({', '.join(f'{k} {v}' for k, v in sorted(result['moments'].items()))}), "
          f"{result['seconds']} s: {'ok' if result['ok'] else 'FAILED'}", flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
