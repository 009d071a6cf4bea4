#!/usr/bin/env python3
"""Write docs/generations.md and docs/img/generations.png from a real run of each Hyper-V
generation (`make docs` runs this where the lab runs: natively, or in a one-shot lab VM).

A private lab `gens` (the default lab's definition) in its own HVLAB_HOME (HVLAB_GENS_DIR,
default /var/tmp/hvlab-generations): one `hvlab backup vm01 --model M` per generation, each
verified, then `hvlab explain --compare` of the three (table and picture). The Markdown is
written only when every command succeeded and every verify said OK; the lab is removed
whatever happens.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from hvlab.flow import steps as S

REPO = Path(__file__).resolve().parent.parent

OUT = REPO / "docs" / "generations.md"
PICTURE = REPO / "docs" / "img" / "generations.png"
LAB = "gens"
HVLAB = str(REPO / ".venv" / "bin" / "hvlab")


class Failed(Exception):
    pass


def run(env: dict[str, str], *argv: str) -> str:
    shown = shlex.join(["hvlab", *argv])
    print(f"generations: $ {shown}", file=sys.stderr, flush=True)
    p = subprocess.run([HVLAB, *argv], env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=900, check=False)
    if p.returncode != 0:
        raise Failed(f"`{shown}` exited {p.returncode}:\n{p.stdout}")
    return p.stdout.rstrip()


def steps_table(name: str) -> str:
    m = S.model(name)
    rows = ["| # | step | Hyper-V | the lab |", "|---|---|---|---|"]
    for st in m.steps:
        who = "per VM" if st.per_vm else "job"
        frz = " (frozen)" if st.in_freeze else ""
        rows.append(f"| {st.number} | {st.name} ({who}{frz}) | {st.veeam} | {st.lab} |")
    return "\n".join(rows)


def main() -> int:
    work = Path(os.environ.get("HVLAB_GENS_DIR", "/var/tmp/hvlab-generations"))
    shutil.rmtree(work, ignore_errors=True)
    env = {**os.environ, "HVLAB_HOME": str(work / "home"), "COLUMNS": "200", "NO_COLOR": "1"}
    env.pop("HVLAB_LAB", None)
    facts: dict[str, dict[str, Any]] = {}
    try:
        run(env, "up", "-n", LAB)
        ids = {}
        for m in ("2012", "2012r2", "2016"):
            out = run(env, "backup", "vm01", "-n", LAB, "--model", m)
            rid = re.search(r"run (r\w+) done", out)
            if rid is None:
                raise Failed(f"no finished run in:\n{out}")
            ids[m] = rid.group(1)
            ver = run(env, "verify", ids[m], "-n", LAB)
            if "=> OK" not in ver:
                raise Failed(f"{m}: verify did not say OK:\n{ver}")
            rec = json.loads(run(env, "explain", ids[m], "-n", LAB, "--json"))["run"]
            v = rec["vm"]["vm01"]
            facts[m] = {"run": ids[m], "window_s": (v.get("window") or {}).get("seconds"),
                        "class": v.get("class"),
                        "t0_txid": (v.get("freeze_reply") or {}).get("ledger_last_txid"),
                        "rolled_back": {d: (x.get("reverted") or {}).get("chunks")
                                        for d, x in v["disks"].items()},
                        "read_mib": sum(i["bytes_read"] for i in rec["images"].values()) / 2**20,
                        "ledger": grab(r"ledger: (.*)", ver)}
        table = run(env, "explain", "--compare", *ids.values(), "-n", LAB,
                    "--png", str(PICTURE))
        table = "\n".join(ln for ln in table.splitlines() if not ln.startswith("saved "))
        run(env, "down", "-n", LAB, "--purge")
    except Failed as exc:
        print(f"generations: FAILED: {exc}", file=sys.stderr)
        subprocess.run([HVLAB, "down", "-n", LAB, "--purge"], env=env, check=False)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    OUT.write_text(render(ids, facts, table))
    print(f"generations: wrote {OUT} and {PICTURE}", file=sys.stderr)
    return 0


def grab(pattern: str, text: str) -> str:
    m = re.search(pattern, text)
    if m is None:
        raise Failed(f"no {pattern!r} in:\n{text}")
    return m.group(1)


def render(ids: dict[str, str], facts: dict[str, dict[str, Any]], table: str) -> str:
    def fig(m: str) -> str:
        f = facts[m]
        rolled = (", the host rolled back " + ", ".join(
            f"{d} {n} chunks of 4 KiB" for d, n in f["rolled_back"].items())
                  if m == "2012" else "")
        return (f"- **{m}** (run `{f['run']}`): {f['class']}, freeze window "
                f"{float(f['window_s'] or 0):.2f} s, {float(f['read_mib']):.1f} MiB read"
                f"{rolled}; `hvlab verify`: ledger {f['ledger']} (the guest's last committed "
                f"transaction when it froze: {f['t0_txid']})")

    return TEMPLATE.format(
        figures="\n".join(fig(m) for m in ids), table=table,
        cmds="\n".join(f"hvlab backup vm01 --model {m}" for m in ids)
        + f"\nhvlab explain --compare {' '.join(ids.values())} --png docs/img/generations.png",
        steps_2012=steps_table("2012"), steps_2012r2=steps_table("2012r2"),
        steps_2016=steps_table("2016"))


TEMPLATE = """# Three Hyper-V generations side by side

<!-- Written by docs/generations.py (`make docs`) from a real run of each model; edit the
script, not this file. -->

The question that started hvlab quotes Veeam's step 10 for Hyper-V 2012 R2: auto-recovery
"rolls back data on the VM to the consistent state", and its explanation: the host's writer
"rolls back a VM on the external snapshot to the state of the internal snapshot". That
wording was written for Hyper-V 2008 R2 and 2012, where it is literally true, and kept when
2012 R2 changed the mechanism. hvlab runs all three generations on the same lab, with the
same guest, the same kernel primitives and the same checks, so the difference can be seen:

```
hvlab backup vm01 --model 2012      # 2008 R2 and 2012
hvlab backup vm01 --model 2012r2    # the default: Veeam's 14 steps
hvlab backup vm01 --model 2016      # 2016 and later
hvlab explain --compare RUN RUN RUN [--png FILE] [--svg FILE]
```

| | 2012 (and 2008 R2) | 2012 R2 | 2016 |
|---|---|---|---|
| checkpoints in the VM's chain | none | C (backup) and A (auto-recovery), children of B | C (recovery checkpoint), and A |
| the guest's shadow copy lives | inside the VM's own storage (its diff area, D) | nowhere: the host's checkpoint files are the snapshot | as in 2012 R2 |
| where the live VM writes after T0 | B (each first write saves the old chunk in D) | C | C |
| where the guest's fix-ups land | the guest's shadow copy (D) | A | A |
| host shadow copy of the volume | yes, after the guest thawed: S_B and S_D | yes: S_B and S_A | none |
| "roll back" | yes: the host rolls S_B back to the guest's snapshot | no: A is a fork of B at T0, fixed up | no |
| the backup is read from | S_B, rolled back | S_A | A (the checkpoint) |
| afterwards | S deleted; the guest deletes its shadow copy (D) | S deleted, A dropped, C merged into B | A kept as a reference point (incrementals) or dropped, C merged |

## From a real run of each

{figures}

```
{cmds}
```

![the three generations side by side](img/generations.png)

```
{table}
```

Every model is held to the same invariants by the same parametrised tests
(`tests/integration/test_generations.py`, `test_flow_kill.py`, `test_eight_disks.py`): the
image is application-consistent and its last transaction is the one the guest had committed
when it froze (T0), nothing the VM wrote after T0 is in it, a restore is the image bit for
bit, the LV set is as before, and a backup killed at any fault point of its model is
recovered by the next command.

## 2012 and 2008 R2: the literal roll back

The guest quiesces and takes its own shadow copy with its software provider; its diff area
(the copy-on-write store) is on the VM's own disks. The guest thaws and goes on writing.
Only then does the host take its shadow copy of the volume: the VM's disks in it are newer
than the guest's snapshot. The host's Hyper-V writer then mounts those disks and uses the
guest's shadow copy, which is inside them, to roll them back: every change after the
internal snapshot is discarded. In the lab:

- **D**, a thin LV of the VM's, is the guest's diff area; **G**, a device-mapper snapshot of
  B whose store is D, is the guest's shadow copy; while G exists the controller is B's
  `snapshot-origin`, so each first write to a chunk of B copies the old chunk into D.
- The guest's writers fix up G (its writes land in D), as VSS's auto-recovery phase does
  for a writable shadow copy.
- **S_B** and **S_D** are the host's shadow copy (thin snapshots of B and D, taken with the
  controllers and G held, writable until its auto-recovery ends).
- The roll back is the kernel's `snapshot-merge` of S_D into S_B: the chunks the guest
  changed after T0 get their T0 content back, the fix-ups land. S_B is then made read-only
  and read. The run records how many chunks the merge moved.

{steps_2012}

## 2012 R2: a fork, not a roll back

Hyper-V presents itself to the guest as a hardware snapshot provider: the checkpoints C and
A are created at the instant the guest's shadow copy commits, while the guest holds its
writes. B is frozen at T0 from then on (the VM writes into C); A, a second child of B, takes
the writers' fix-ups; the host's shadow copy holds B and A; the backup reads A from it. See
[how-auto-recovery-works.md](how-auto-recovery-works.md).

{steps_2012r2}

## 2016: the checkpoint is the backup

The backup application asks Hyper-V for a recovery checkpoint of each VM through WMI, with
no shadow copy of the host's volume; the checkpoint is read directly; with resilient change
tracking it becomes a reference point and the next backup reads only what changed since.
In the lab the reference point is the checkpoint's A kept under a `_ref_` name, and
`thin_delta` between it and the next run's A is the changed-block list (`--incremental`).

{steps_2016}

## Documented and inferred

Documented (sources below): 2008 R2 and 2012 take the guest's snapshot with the guest's own
provider, then a host snapshot, then mount the disks from the host snapshot and "use VSS on
the host to roll back to the guest snapshot"; 2012 R2 creates the .avhdx files at the moment
the guest's shadow copy commits and removes the host-side mount and revert; 2016 decouples
the VM's checkpoint from the storage snapshot, reads the checkpoint, and tracks changes
(RCT) in the VHDX; Veeam's 2016 on-host mode takes a checkpoint and reads the base disk,
then merges the checkpoint.

Inferred, and how hvlab models it:
- **2012: where the diff area lives.** A Windows guest keeps its diff area in a file of the
  volume (System Volume Information). A block-level copy-on-write store cannot live inside
  the filesystem it protects on Linux, so hvlab gives it a thin LV of the VM's own that the
  host's snapshot takes together with B (the same set). What the roll back does with it is
  the same.
- **2012: the guest fixes up its own shadow copy** before the host's snapshot (VSS's
  auto-recovery phase for a writable shadow copy); Microsoft's history does not say in which
  order the guest's fix-ups and the host's snapshot come.
- **2016: the auto-recovery fork (A).** Microsoft's history says 2016 "took the middle
  piece" of 2012 R2's architecture and decoupled it from the storage snapshot; whether a
  2016 production checkpoint still forks an AutoRecovery.avhdx is not stated in the material
  we found. hvlab keeps A so that a writer's transaction left open at T0 is undone as in
  2012 R2, and reads the backup from A (Veeam: "the base disk", B at T0, which A is, with the
  fix-ups).
- **2016: reference points.** RCT tracks changes inside the VHDX; hvlab keeps the last
  backup's A as the reference and asks `thin_delta` for the difference.

Sources: Microsoft, "The history of Hyper-V backup" (MicrosoftDocs/Virtualization-Documentation,
prospective-docs/Hyper-V-Backup-2016.md); Veeam Help Center, Online Backup (Hyper-V 2012; 2016
and later); Microsoft KB3175561 (leftover AutoRecovery.avhdx); Didier Van Hoye, "What is
AutoRecovery.avhdx all about?" (2014); the Linux kernel's dm-snapshot documentation
(snapshot-origin, snapshot-merge).
"""

if __name__ == "__main__":
    sys.exit(main())
