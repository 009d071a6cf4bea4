"""Power loss of the lab VM in the middle of a backup: nothing the guest committed is lost.

After step 5 the guest writes into the backup checkpoint C. A restart of the lab must map C
again (not B, which holds T0), the run must resume to a backup that verifies, and the killed
VM's helper processes must not outlive the next `hvlab up`.

Then power cuts at seeded random moments with the guest's writers running, on one lab: at a
named fault point of a backup (armed to hang, so the moment is known), after a random delay
into one, or between backups. Every transaction the guest acknowledged before the cut (asked
just before it, and the last line of the guest's own ack log, kept outside its disks) must
be committed on the live disks with its chain whole. HVLAB_POWER_SEED=N replays a seed,
HVLAB_POWER_CYCLES=N runs more cycles; the seed is printed (and named in every failure),
and so are the moments tried per step.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from hvlab_fixtures.plugin import lab_toml, one_vm_lab
from hvlab_fixtures.waits import wait_for

pytestmark = pytest.mark.vm
SEED_ENV = "HVLAB_POWER_SEED"
CYCLES_ENV = "HVLAB_POWER_CYCLES"
CYCLES = 3  # CI's share: each cycle is a lab VM boot, a lab restart and a backup or two

LAB = lab_toml(one_vm_lab([("256M", "ext4"), ("320M", "xfs")], name="pl", backing="2G",
                          # the test decides when the guest commits, so it compares exactly
                          workload={"ops_per_s": 20, "paused": True}))

# The random cycles' lab: two small disks (the ledger spans both), so a cycle stays lean.
LEAN_LAB = lab_toml(one_vm_lab(2, name="pl", workload={"ops_per_s": 20, "paused": True}))


def hvlab(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([sys.executable, "-m", "hvlab.cli", *args], capture_output=True,
                         text=True, timeout=timeout, env=os.environ, stdin=subprocess.DEVNULL)
    return res


def ok(*args: str) -> str:
    res = hvlab(*args)
    assert res.returncode == 0, f"hvlab {' '.join(args)}: {res.stdout}\n{res.stderr}"
    return res.stdout


def guest(vm: str = "vm01") -> dict[str, Any]:
    rows = json.loads(ok("guest", "status", "-n", "pl", "--json"))
    st: dict[str, Any] = rows[vm]["status"] or {}
    return st


def power_loss() -> set[int]:
    """The lab VM loses power; returns its lingering helpers (`hvlab up` must end them)."""
    from hvlab.vm import control

    return control.power_cut()


def test_power_loss_after_step_11_loses_no_committed_transaction(vm_env: Path) -> None:
    lab_file = vm_env / "pl.toml"
    lab_file.write_text(LAB)
    ok("up", "--lab", str(lab_file))
    ok("guest", "workload", "vm01", "-n", "pl", "--resume")
    out = ok("backup", "vm01", "-n", "pl", "--pause-after", "11")
    run_id = re.findall(r"\br\d{14}[0-9a-f]{4}\b", out)[0]
    t0_txid = json.loads((vm_env / "home" / "pl" / "runs" / run_id / "run.json").read_text()
                         )["vm"]["vm01"]["window"]["open_txid"]
    wait_for(lambda: guest()["committed_txid"] > (t0_txid or 0) + 5, 60,
             "the guest commits into C")
    ok("guest", "workload", "vm01", "-n", "pl", "--pause")
    before = guest()

    old = power_loss()
    out = ok("up", "--lab", str(lab_file))  # boots a new lab VM and restarts the lab
    assert "a backup's C" in out, out
    assert not [p for p in old if psutil.pid_exists(p)], \
        "helpers of the killed lab VM outlived `hvlab up`"
    after = guest()
    assert (after["committed_txid"], after["committed_hash"]) == (
        before["committed_txid"], before["committed_hash"]), "committed transactions lost"

    ok("backup", "--resume", run_id, "-n", "pl")
    ok("verify", run_id, "-n", "pl")
    # The merge kept C's data: the live ledger is still at the same head.
    after = guest()
    assert after["committed_txid"] == before["committed_txid"]
    ok("down", "-n", "pl")


# Run inside the lab VM after a restart: what the fixture plugin checks before a test's
# teardown (thin_check of the pool's metadata, LVM's and the kernel's transaction ids, every
# LV, controller and mount of the definition there and nothing else), as JSON lines.
IN_LAB = """
import json, sys
from hvlab_fixtures.plugin import LabHandle, lab_extras
from hvlab.lab.handle import Lab
print(json.dumps(lab_extras(LabHandle(Lab.open(sys.argv[1])))))
"""


def lab_problems() -> list[str]:
    out = ok("vm", "run", "--", sys.executable, "-c", IN_LAB, "pl")
    problems: list[str] = json.loads(out.strip().splitlines()[-1])
    return problems


def pick_moment(rng: random.Random) -> tuple[str, str | float]:
    """A named fault point (the backup hangs there), a delay after the backup starts, or a
    delay with no backup running (between runs)."""
    from hvlab.flow import steps

    x = rng.random()
    if x < 0.5:  # the default model's points: the backup below is 2012 R2's
        return "point", rng.choice(sorted(steps.model(steps.DEFAULT).fault_points))
    if x < 0.85:
        return "delay", round(rng.uniform(0.3, 6.0), 1)  # a backup here takes 3-5 s
    return "idle", round(rng.uniform(0.5, 5.0), 1)


def start_backup(moment: tuple[str, str | float]) -> tuple[subprocess.Popen[str], list[str],
                                                             threading.Event]:
    argv = [sys.executable, "-m", "hvlab.cli", "backup", "vm01", "-n", "pl", "--no-fingerprints"]
    kind, what = moment
    if kind == "point":
        argv += ["--inject", f"{what}:hang"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=os.environ, stdin=subprocess.DEVNULL)
    lines: list[str] = []
    hung = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if f"hanging at fault point {what} " in line:
                hung.set()

    threading.Thread(target=read, daemon=True).start()
    return proc, lines, hung


class Phases:
    """Seconds per phase of a cycle, printed with it (CI time is tight: shows where it goes)."""

    def __init__(self) -> None:
        self.t = time.monotonic()
        self.spent: list[str] = []

    def __call__(self, name: str) -> None:
        now = time.monotonic()
        self.spent.append(f"{name} {now - self.t:.0f}s")
        self.t = now


def killed_at(home: Path, known: set[str]) -> tuple[str, str]:
    """Where the cycle's run stood when the power went, as its record says (on hostfs): a
    text, and the step it was in (`between runs` when the cycle started none)."""
    from hvlab.flow import steps

    recs = [r for r in sorted((home / "pl" / "runs").glob("r*/run.json"))
            if r.parent.name not in known]
    if not recs:
        return "no run", "between runs"
    r = json.loads(recs[-1].read_text())
    last = r.get("last_step")
    if r["state"] == "done":
        step = "done"
    elif (last or 0) >= steps.LAST:
        step = "finishing"  # every step done, the record not yet closed
    else:
        step = f"step {(last or 0) + 1:2d}"
    return f"run {r['id']} {r['state']} after step {last}", step


def grab(pattern: str, text: str) -> str:
    m = re.search(pattern, text)
    assert m is not None, f"no {pattern!r} in {text}"
    return m.group(1)


def acked_on_disk(where: str, before: dict[str, Any], ack: tuple[int, str] | None) -> int:
    """After the restart: the ledger read back from the live disks (the writers paused, so
    it stands still) is consistent, and holds every transaction acknowledged before the cut:
    the guest's answer just before it, and its ack log's last line (the same hash when the
    ledger ends there). Returns the last committed txid."""
    from hvlab.lab.paths import Names

    ok("guest", "workload", "vm01", "-n", "pl", "--pause")
    after = guest()
    mounts = [str(Names("pl").mountpoint("vm01", d)) for d in ("disk0", "disk1")]
    check = ok("vm", "run", "--", sys.executable, "-m", "hvlab.cli", "guest", "check",
               *mounts)  # exit 1 when the chain is broken
    last = int(grab(r"last committed txid (\d+)", check))
    assert last == after["committed_txid"], f"{where}: the guest says {after}, disk {check}"
    acked = max(int(before["committed_txid"]), ack[0] if ack else 0)
    assert last >= acked, (f"{where}: acknowledged transactions lost: acked {acked} "
                           f"(guest {before['committed_txid']}, ack log {ack}), on disk {last}")
    if ack and last == ack[0]:
        assert after["committed_hash"] == ack[1], f"{where}: chain differs at txid {last}"
    ok("guest", "workload", "vm01", "-n", "pl", "--resume")
    return last


def test_power_cuts_at_random_moments_with_the_writers_running(vm_env: Path) -> None:
    """Each cycle: the guest commits all along; the lab VM loses power at the cycle's moment
    (in a backup, or between backups); `hvlab up` brings the lab back with its pool active
    and its metadata clean, every acknowledged transaction on the live disks; `hvlab recover`
    cleans what the run left, and the next backup verifies."""
    from hvlab.guest.writers import last_ack
    from hvlab.lab.paths import Names

    seed = int(os.environ.get(SEED_ENV) or random.SystemRandom().randrange(1_000_000))
    cycles = int(os.environ.get(CYCLES_ENV) or CYCLES)
    rng = random.Random(seed)
    print(f"power-cut seed {seed} ({SEED_ENV}={seed} replays it), {cycles} cycles")
    lab_file = vm_env / "pl.toml"
    lab_file.write_text(LEAN_LAB)
    ok("up", "--lab", str(lab_file))
    ok("guest", "workload", "vm01", "-n", "pl", "--resume")
    guest_dir = Names("pl").guest_dir("vm01")
    tried: dict[str, int] = {}
    for cycle in range(cycles):
        moment = pick_moment(rng)
        where = f"seed {seed}, cycle {cycle}, power cut at {moment[0]} {moment[1]}"
        spent = Phases()
        known = {p.name for p in (vm_env / "home" / "pl" / "runs").glob("r*")}
        proc = None
        if moment[0] == "idle":
            time.sleep(float(moment[1]))  # the writers commit meanwhile: that is the point
        else:
            proc, lines, hung = start_backup(moment)
            if moment[0] == "point":
                assert hung.wait(300), f"{where}: never got there:\n{''.join(lines)}"
            else:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(float(moment[1]))
        before = guest()  # acknowledged so far; the writers go on until the cut
        helpers = power_loss()
        if proc is not None:
            proc.wait(60)
        text, step = killed_at(vm_env / "home", known)
        tried[step] = tried.get(step, 0) + 1
        where += f" ({text})"
        spent("backup")
        ok("up", "--lab", str(lab_file))
        spent("up")
        assert not [p for p in helpers if psutil.pid_exists(p)], \
            f"{where}: helpers of the killed lab VM outlived `hvlab up`"
        last = acked_on_disk(where, before, last_ack(guest_dir))
        # What a restart may find: the dead run's checkpoints (B gone while its merge was
        # half done: C took its place); never damaged metadata, disagreeing transaction ids,
        # a missing controller or mount.
        left = r"LV \S+ (\((backup|auto-rec|ext)|is tagged as a backup)|missing LV vm01_disk\d$"
        bad = [p for p in lab_problems() if not re.match(left, p)]
        assert not bad, f"{where}: after the restart: {bad}"
        spent("checks")
        res = hvlab("recover", "-n", "pl")
        assert res.returncode == 0, f"{where}: recover: {res.stdout}{res.stderr}"
        assert lab_problems() == [], f"{where}: left after recover: {res.stdout}"
        spent("recover")
        out = ok("backup", "vm01", "-n", "pl", "--no-fingerprints")
        run_id = re.findall(r"\br\d{14}[0-9a-f]{4}\b", out)[0]
        spent("next backup")
        ok("verify", run_id, "-n", "pl")
        spent("verify")
        assert guest()["committed_txid"] > last, where
        print(f"{where}: {', '.join(spent.spent)}")
    print(f"power-cut seed {seed}: moments tried per step: "
          + ", ".join(f"{k} {v}" for k, v in sorted(tried.items())))
    ok("down", "-n", "pl")
