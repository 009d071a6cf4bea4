"""`make soak`: random backups of random VMs, killed or failed at random fault points, then
resumed, aborted or recovered at random, with the guests writing throughout; step 13 reads
on-host or off-host (over NBD, through the proxy's namespace) at random.

Every cycle checks that nothing the guests acknowledged was lost, that nothing is frozen and
that no artifact is left. At the end: every finished backup verifies, `thin_check` of the
pool's metadata is clean, and the lab comes down leaving nothing. A failure prints the seed
and the cycle, so `make soak SEED=N` replays it. Results: soak-results/soak-<seed>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hvlab.backup import restore, thinmeta
from hvlab.errors import BadInput
from hvlab.flow import engine, recover
from hvlab.flow import steps as S
from hvlab.guest import ledger
from hvlab.guest.client import GuestClient
from hvlab.lab import definition, guests, runs, substrate, teardown
from hvlab.lab.handle import Lab
from hvlab_fixtures.plugin import LabHandle, lab_extras

# The guests start with their writers paused (the soak lets them go): after a power cut the
# restarted lab's ledgers stand still at what survived, so they compare exactly.
LAB = {"lab": {"name": "soak", "backing_size": "1G"},
       "vm": [{"name": "vm01", "profile": "windows", "workload": {"paused": True},
               "disk": [{"name": "disk0", "size": "64M", "fs": "ext4"}]},
              {"name": "vm02", "profile": "linux", "workload": {"paused": True},
               "disk": [{"name": "disk0", "size": "64M", "fs": "ext4"}]}]}
FREEZE = {"step-05", "step-06", "step-07", "step-08", "s05-one", "s05-snapshots",
          "s05-reloaded", "s06-one"}


class SoakFailure(AssertionError):
    pass


def check(cond: bool, what: str) -> None:
    if not cond:
        raise SoakFailure(what)


def acked(lab: Lab) -> dict[str, int]:
    """The last transaction each guest acknowledged as committed."""
    out = {}
    for vm in lab.state.definition.vms:
        st = GuestClient(guests.socket_path(lab.names, vm.name)).status()
        if isinstance(st.get("committed_txid"), int):
            out[vm.name] = st["committed_txid"]
    return out


def live_ledgers(lab: Lab) -> dict[str, ledger.CheckResult]:
    """Each VM's ledger read back from its live disks (through the mounts): what survived,
    whatever the guest believes."""
    return {vm.name: ledger.check({d.name: lab.names.mountpoint(vm.name, d.name)
                                   for d in vm.disks})
            for vm in lab.state.definition.vms}


def live_txids(lab: Lab) -> dict[str, int]:
    return {vm: c.last_txid for vm, c in live_ledgers(lab).items()}


def writers(lab: Lab, *, pause: bool) -> None:
    for vm in lab.state.definition.vms:
        GuestClient(guests.socket_path(lab.names, vm.name)).workload(pause=pause)


def cycle(lab: Lab, rng: random.Random, base: set[str]) -> dict[str, Any]:
    names = [v.name for v in lab.state.definition.vms]
    vms = sorted(rng.sample(names, rng.randint(1, len(names))))
    model = rng.choice(list(S.MODELS))  # each Hyper-V generation, its own fault points
    point = rng.choice([*S.model(model).fault_points, None])
    action = rng.choice(["kill", "kill", "kill", "raise"])
    mode = rng.choice(["on-host", "off-host"])  # the read either way
    before = acked(lab)
    known = {x.id for x in runs.all_runs(lab.names)}
    argv = [sys.executable, "-m", "hvlab.cli", "backup", *vms, "-n", lab.name,
            "--no-fingerprints", "--mode", mode, "--model", model]
    if point:
        argv += ["--inject", f"{point}:{action}"]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=900,
                         stdin=subprocess.DEVNULL)
    new = [x for x in runs.all_runs(lab.names) if x.id not in known]
    out: dict[str, Any] = {"vms": vms, "mode": mode, "model": model, "point": point,
                           "action": action if point else None, "exit": res.returncode}
    if len(new) != 1:
        raise SoakFailure(f"{len(new)} runs recorded: {res.stderr.strip()[-300:]}")
    r = new[0]
    state = runs.effective_state(r)
    out.update(run=r.id, state=state)
    if state == "interrupted":
        how = rng.choice(["resume", "abort", "recover"])
        if how == "resume":
            try:
                r = engine.resume(lab.name, r.id, fingerprints=False)
            except BadInput as exc:  # killed inside the freeze window: abort instead
                check("freeze window" in str(exc), f"resume refused: {exc}")
                how = "abort"
        if how == "abort":
            r = engine.abort(lab.name, r.id)
        if how == "recover":
            rep = recover.recover(lab.name)
            check(not rep.left, f"recover left {rep.left}")
            r = runs.load(lab.names, r.id)
        out["recovered_by"] = how
    out["final"] = runs.effective_state(r)
    check(out["final"] in ("done", "failed", "aborted"), f"run ended {out['final']}")
    after = live_txids(lab)
    lost = {vm: (before[vm], after.get(vm)) for vm in before
            if after.get(vm) is None or after[vm] < before[vm]}
    check(not lost, f"acknowledged transactions lost (acked, on the live disk): {lost}")
    for vm in names:
        st = GuestClient(guests.socket_path(lab.names, vm)).status()
        check(not st.get("frozen"), f"{vm} left frozen")
    left = set(lab.lvs()) - base
    check(not left, f"left behind: {sorted(left)}")
    # Every device, mount and guest the lab holds, against its definition (the test
    # plugin's own check): a leak fails the cycle that made it, before anything cleans up.
    extra = lab_extras(LabHandle(lab))
    check(not extra, f"the lab holds more or less than its definition: {extra}")
    return out


def cycle_rng(seed: int, k: int) -> random.Random:
    """Cycle k's own generator: a soak resumed at cycle k (after a power cut) replays it."""
    return random.Random(f"{seed}:{k}")


def journal_line(path: Path | None, **line: Any) -> None:
    """One line of the soak's journal, on disk before the cycle goes on: what the power-cut
    driver (bench/soakcuts) reads after the lab VM is killed. None: no journal."""
    if path is None:
        return
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")
        f.flush()
        os.fsync(f.fileno())


def finish(lab: Lab) -> dict[str, Any]:
    """The end of a soak: every finished backup of the lab verifies, the pool's metadata is
    clean."""
    done = [r.id for r in runs.all_runs(lab.names) if runs.effective_state(r) == "done"]
    for rid in done:
        rep = restore.verify(lab.name, rid)
        check(rep["ok"], f"backup {rid} does not verify")
    problems = thinmeta.check(lab.names)
    check(not problems, f"thin_check: {problems}")
    return {"verified": len(done), "thin_check": "clean"}


def main() -> int:
    ap = argparse.ArgumentParser(prog="hvlab.bench.soak")
    ap.add_argument("--cycles", type=int, default=15)
    ap.add_argument("--seed", type=int, default=None)
    # Used by the power-cut driver (bench/soakcuts), which runs a soak in parts around cuts:
    ap.add_argument("--first", type=int, default=0, help="number of the first cycle")
    ap.add_argument("--attach", action="store_true", help="the lab is up: use it as it is")
    ap.add_argument("--keep", action="store_true", help="leave the lab up, no final checks")
    ap.add_argument("--journal", type=Path, default=None)
    ap.add_argument("--after-cut", action="store_true",
                    help="print the live disks' last txids and the lab's problems as JSON")
    args = ap.parse_args()
    if args.after_cut:  # the guests' writers paused (the lab's definition): exact figures
        lab = Lab.open(definition.parse(LAB).name)
        live = {vm: {"txid": c.last_txid, "hash": c.last_hash, "consistent": c.consistent}
                for vm, c in live_ledgers(lab).items()}
        print(json.dumps({"live": live, "problems": lab_extras(LabHandle(lab))}))
        return 0
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    os.environ.setdefault("HVLAB_HOME", "/var/tmp/hvlab-soak")
    out_dir = Path("soak-results")
    out_dir.mkdir(exist_ok=True)
    defn = definition.parse(LAB)
    if args.attach:
        lab = Lab.open(defn.name)
    else:
        teardown.down(defn.name, missing_ok=True, purge=True)
        lab = substrate.up(defn, start_guests=True)
    base = set(lab.lvs())  # with --attach, the driver checked first that nothing else is
    writers(lab, pause=False)
    result: dict[str, Any] = {"seed": seed, "first": args.first, "cycles": [], "ok": False}
    start = time.time()
    last = args.first + args.cycles
    try:
        for k in range(args.first, last):
            if args.journal:
                journal_line(args.journal, cycle=k, event="start", acked=acked(lab),
                             runs=len(runs.all_runs(lab.names)), clock=time.time())
            c = cycle(lab, cycle_rng(seed, k), base)
            result["cycles"].append(c)
            journal_line(args.journal, cycle=k, event="end", result=c)
            print(f"[{k + 1}/{last}] {' '.join(c['vms'])} ({c['model']}, {c['mode']}) "
                  f"{c['point'] or '-'}:{c['action'] or '-'} -> {c['state']}"
                  f"{' -> ' + c['recovered_by'] if 'recovered_by' in c else ''} "
                  f"-> {c['final']}", flush=True)
        if not args.keep:
            result.update(finish(lab))
        result["ok"] = True
    except Exception as exc:
        result["failure"] = f"cycle {args.first + len(result['cycles']) + 1}: " \
                            f"{type(exc).__name__}: {exc}"
        print(f"SOAK FAILED (seed {seed}): {result['failure']}", flush=True)
    finally:
        result["seconds"] = round(time.time() - start, 1)
        if not args.keep:
            try:
                teardown.down(defn.name, missing_ok=True, purge=True)
            except Exception as exc:
                result["ok"] = False
                result["teardown"] = str(exc)
        name = f"soak-{seed}" + (f"-from-{args.first}" if args.first else "")
        (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1))
    n = len(result["cycles"])
    print(f"soak seed {seed}: {n} cycles, {result.get('verified', 0)} backups verified, "
          f"thin_check {result.get('thin_check', 'not run')}, {result['seconds']} s: "
          f"{'ok' if result['ok'] else 'FAILED'}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
