#!/usr/bin/env python3
"""Write docs/walkthrough.md from a real session: every command is run, its output recorded.

`make docs` runs this (as root, with the repository's virtualenv). It drives the `hvlab` CLI as
a user types it from the host: a private lab called `walk` (docs/walkthrough.toml), a backup
paused after step 10, A and B@T0 mounted read-only and compared, resume, explain, verify,
restore, then `hvlab down` and `hvlab vm down`. On a kernel without device-mapper the lab runs
in the lab VM and commands that must see the lab's devices go through `hvlab vm run --`.

Where things go (all outside the user's own lab and lab VM):
- HVLAB_HOME and HVLAB_VM_DIR: taken from the environment when set, else `<work>/home` and
  `<work>/vm`;
- `<work>` (mount points, the backup): `--work-dir`, else HVLAB_WALK_DIR, else
  /var/tmp/hvlab-walkthrough. Not /tmp: inside the lab VM /tmp is a different place.

The Markdown is written only when every command gave the exit status the text expects and
every fact the text states was checked; otherwise the exit status is 1 and the old file stays.
Whatever happens, the lab is taken down, the lab VM stopped and the mounts and backups removed.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LAB_FILE = "docs/walkthrough.toml"
LAB = "walk"
VM = "vm01"
DISKS = ("disk0", "disk1")
OUT = REPO / "docs" / "walkthrough.md"
COLUMNS = "160"
TIMEOUT_S = 900.0


class WalkFailed(Exception):
    """A command gave an unexpected exit status, or a stated fact did not hold."""


@dataclass
class Result:
    argv: list[str]
    shown: str
    rc: int
    out: str
    seconds: float


@dataclass
class Session:
    """Runs commands, records them as Markdown, and remembers what must be undone."""

    env: dict[str, str]
    work: Path
    runner: str = "?"
    md: list[str] = field(default_factory=list)
    paused_run: str | None = None
    mounted: list[Path] = field(default_factory=list)
    readonly: list[str] = field(default_factory=list)  # devices set read-only by us

    # ---------------------------------------------------------------- running
    def _argv(self, argv: Sequence[str]) -> list[str]:
        if argv and argv[0] == "hvlab":
            return [str(REPO / ".venv" / "bin" / "hvlab"), *argv[1:]]
        return list(argv)

    def run(self, argv: Sequence[str], *, expect: Sequence[int] | None = (0,),
            quiet: bool = False) -> Result:
        shown = shlex.join(argv)
        print(f"walkthrough: $ {shown}", file=sys.stderr, flush=True)
        start = time.monotonic()
        try:
            proc = subprocess.run(self._argv(argv), cwd=REPO, env=self.env,
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, timeout=TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired as exc:
            raise WalkFailed(f"`{shown}` did not finish within {TIMEOUT_S:g} s") from exc
        res = Result(list(argv), shown, proc.returncode,
                     proc.stdout.decode(errors="replace").rstrip(),
                     time.monotonic() - start)
        if not quiet and res.out:
            print(res.out, file=sys.stderr, flush=True)
        if expect is not None and res.rc not in expect:
            raise WalkFailed(f"`{shown}` exited {res.rc}, expected "
                             f"{' or '.join(map(str, expect))}:\n{res.out}")
        return res

    def mount_ro(self, dev: str, at: Path) -> list[Result]:
        """Mark the device read-only, then mount it read-only without journal replay."""
        out = [self.run(self.inside(["blockdev", "--setro", dev]))]
        self.readonly.append(dev)
        out.append(self.run(self.inside(["mount", "-o", "ro,noload", dev, str(at)])))
        self.mounted.append(at)
        return out

    def umount_all(self) -> list[Result]:
        """Unmount what we mounted, then make the devices writable again, as they were."""
        out = []
        while self.mounted:
            out.append(self.run(self.inside(["umount", str(self.mounted[0])])))
            self.mounted.pop(0)
        while self.readonly:
            out.append(self.run(self.inside(["blockdev", "--setrw", self.readonly[0]])))
            self.readonly.pop(0)
        return out

    def inside(self, argv: Sequence[str]) -> list[str]:
        """A command that must see the lab's devices and mounts: in the lab VM when the lab
        runs there, else here."""
        return ["hvlab", "vm", "run", "--", *argv] if self.runner == "uml" else list(argv)

    # ---------------------------------------------------------------- writing
    def text(self, paragraph: str) -> None:
        self.md.append(paragraph.strip() + "\n")

    def show(self, *results: Result, keep: tuple[int, int] | None = None) -> None:
        """One console block: each command, its output (trimmed to keep=(head, tail) lines),
        and its exit status and duration."""
        lines = ["```console"]
        for r in results:
            lines.append(f"$ {r.shown}")
            out = r.out.splitlines()
            if keep is not None and len(out) > keep[0] + keep[1] + 1:
                head, tail = keep
                cut = len(out) - head - tail
                out = [*out[:head], f"[... {cut} lines left out ...]",
                       *(out[-tail:] if tail else [])]
            lines += [line.rstrip() for line in out]
            lines.append(f"# exit {r.rc}, {r.seconds:.1f} s")
        lines.append("```")
        self.md.append("\n".join(lines) + "\n")

    def step(self, argv: Sequence[str], *, expect: Sequence[int] = (0,),
             keep: tuple[int, int] | None = None) -> Result:
        res = self.run(argv, expect=expect)
        self.show(res, keep=keep)
        return res


def check(cond: bool, what: str) -> None:
    """A fact the text states about this run: if it does not hold, no document."""
    if not cond:
        raise WalkFailed(f"the walkthrough's text would be wrong: {what}")


def grab(pattern: str, text: str, what: str) -> str:
    m = re.search(pattern, text, re.MULTILINE)
    if m is None:
        raise WalkFailed(f"cannot find {what} in:\n{text}")
    return m.group(1)


def fingerprints(out: str, disk: str) -> dict[int, dict[str, str]]:
    """From `hvlab explain`: step -> column -> cell, one disk. Artifact cells: 'sha/blocks',
    'live/blocks' (C), '-' absent, '~' not hashed at that step; 'writes': B or C."""
    lines = out.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.strip().startswith(f"{disk}  ("))
    header = next(ln for ln in lines[start:] if "┃ step" in ln)
    cols = [c.strip() for c in header.split("┃")]
    rows: dict[int, dict[str, str]] = {}
    for ln in lines[start:]:
        if ln.startswith("└"):
            break
        cells = [c.strip() for c in ln.split("│")]
        if len(cells) == len(cols) and cells[1].isdigit():
            rows[int(cells[1])] = {a: cells[cols.index(a)].removesuffix(" *")
                                   for a in ("writes", "B", "C", "A", "S_B", "S_A")}
    if sorted(rows) != list(range(1, 15)):
        raise WalkFailed(f"cannot read the timeline of {disk} from `hvlab explain`")
    return rows


def table_cell(out: str, row: str, column: str) -> str:
    """A cell of a rich table (box characters │ / ┃) by row label and column header."""
    header = next((ln for ln in out.splitlines() if "┃" in ln and column in ln), None)
    line = next((ln for ln in out.splitlines() if ln.startswith("│") and
                 ln.split("│")[1].strip() == row), None)
    if header is None or line is None:
        raise WalkFailed(f"no row {row!r} / column {column!r} in:\n{out}")
    cols = [c.strip() for c in header.split("┃")]
    return line.split("│")[cols.index(column)].strip()


# -------------------------------------------------------------------- the session
def walkthrough(s: Session) -> None:
    w = s.work
    mnt = w / "mnt"
    dest = w / "backups" / "vm01-first"

    def mp(kind: str, disk: str) -> Path:
        return mnt / kind / disk

    s.text(f"""
# Walkthrough: one backup, paused after auto-recovery

This file is generated: `make docs` runs `docs/walkthrough.py`, which runs every command below
as shown (from the repository's top folder, `hvlab` being `.venv/bin/hvlab`, as root) and
records its real output, exit status and duration. Long outputs are trimmed where marked;
nothing else is edited. If a command fails, or a statement below about this run's numbers is
false, the file is not written and `make docs` fails. Why the steps look the way they do:
[how auto-recovery works](how-auto-recovery-works.md).

Generated {datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")} on a host with
Linux {os.uname().release}.

## 1. A lab of its own

The walkthrough never touches your labs: it uses its own lab name (`{LAB}`), its own
`HVLAB_HOME` and its own lab VM directory (`HVLAB_VM_DIR`). To type along, set the same:

```sh
export HVLAB_HOME={shlex.quote(s.env["HVLAB_HOME"])}
export HVLAB_VM_DIR={shlex.quote(s.env["HVLAB_VM_DIR"])}
```
""")
    res = s.step(["hvlab", "vm", "status"])
    s.runner = grab(r"^runner: (\S+)", res.out, "the runner")
    check(s.runner in ("uml", "native"), f"runner {s.runner!r} cannot run a lab")
    if s.runner == "uml":
        s.text("""
This kernel has no device-mapper, so every lab command is forwarded into the lab VM (Debian's
user-mode-linux kernel, Linux 6.1, the host's filesystem shared through hostfs). `hvlab up`
starts the VM. Commands that must see the lab's devices or mounts (`mount`, `cmp`) are
prefixed with `hvlab vm run --`.
""")
    else:
        s.text("This kernel has dm-thin: the lab runs natively, commands run as typed.")
    s.text("""
The lab: one VM with the Windows profile (VSS-aware writers, auto-recovery) and two virtual
disks. Its ledger (a transactional store) keeps the write-ahead log on `disk0` and the data
pages on `disk1`, so the two disks are only consistent if both come from the same instant.
""")
    s.show(s.run(["cat", LAB_FILE]))
    res = s.run(["hvlab", "up", "--lab", LAB_FILE])
    s.show(res)
    check("lab walk is up" in res.out, "`hvlab up` says the lab is up")
    s.text("""
The guest emulator of `vm01` started with the lab. Its three writers run all the time: the
ledger (VSS-aware), scratch files (a VSS writer excludes them from backups) and an appender
(not VSS-aware: only the filesystem freeze stops it).
""")
    s.step(["hvlab", "guest", "status", "-n", LAB])

    # ------------------------------------------------------------ backup, paused
    s.text("""
## 2. Back up, stop after step 10

`--pause-after 10` runs steps 1-10 (quiesce, the checkpoints C and A inside the freeze, thaw,
auto-recovery on A) and stops with every artifact in place. `--dest` names the backup folder.
""")
    res = s.run(["hvlab", "backup", VM, "-n", LAB, "--dest", str(dest), "--pause-after", "10"])
    run_id = grab(r"^run (\S+): backup of", res.out, "the run id")
    s.paused_run = run_id
    s.show(res)
    window = float(grab(r"window_s=([\d.]+)", res.out, "the freeze window"))
    check("consistent_after=True" in res.out, "step 10 left A consistent")
    check(window < 10, "the freeze window is under 10 s")
    s.text(f"""
The run is `{run_id}`. Steps 4-7 are the freeze window: it lasted {window:.2f} s (Hyper-V's
limit is 10 s). From step 5 on, the guest's writes go to C (`writes: ...->C`): the controller,
the dm device the guest's filesystem sits on, was redirected from B to C while the guest was
frozen. Step 10 attached A to the guest, whose writers repaired it
(`consistent_after=True`). The device tree now shows each LV's role:
""")
    res = s.step(["hvlab", "devices", "-n", LAB])
    live = Path(grab(rf"mount (\S+/{VM}/disk0) \(", res.out, "the guest's mount of disk0"))

    # ------------------------------------------------------------ A versus B@T0
    s.text("""
## 3. Look at A and at B@T0

B has not changed since T0: the guest writes to C. So B *is* the image of the instant the
guest's shadow copy committed. A is a fork of that same B, changed only by auto-recovery. Mount
both read-only, and mean it: `mount -o ro` alone is not enough, because ext4 may still write to
a writable device on a read-only mount (journal replay, orphan cleanup), and a write here would
change B or A. So first `blockdev --setro` each device (the kernel then refuses every write);
`noload` skips the journal replay.
""")
    made = [s.run(["mkdir", "-p", *(str(mp(k, d)) for k in ("B", "A") for d in DISKS)])]
    for d in DISKS:
        for kind, lv in (("B", f"{VM}_{d}"), ("A", f"{VM}_{d}_a_{run_id}")):
            made += s.mount_ro(f"/dev/hvlab_{LAB}/{lv}", mp(kind, d))
    s.show(*made)
    s.text("""
The writers' own consistency check (`hvlab guest check`, the one `hvlab verify` runs on a
backup) reads the ledger on both. It is a lab command, so it runs where the mounts are. First
B@T0, then A:
""")
    b = s.run(["hvlab", "guest", "check", *(str(mp("B", d)) for d in DISKS)], expect=(1,))
    a = s.run(["hvlab", "guest", "check", *(str(mp("A", d)) for d in DISKS)])
    s.show(b, a)
    t0_txid = int(grab(r"last committed txid (\d+)", b.out, "B's last txid"))
    open_txid = int(grab(r"unfinished transaction: (\d+)", b.out, "B's open txn"))
    b_scratch = int(grab(r"excluded files .*: (\d+)", b.out, "B's excluded files"))
    check(int(grab(r"last committed txid (\d+)", a.out, "A's last txid")) == t0_txid,
          "A ends at the same committed txid as B@T0")
    check("unfinished transaction: -" in a.out, "A has no unfinished transaction")
    check(open_txid == t0_txid + 1, "the open transaction follows the last committed one")
    check(b_scratch > 0 and "excluded files (scratch/*.tmp): 0" in a.out,
          "the excluded files are on B and not on A")
    s.text(f"""
B@T0 is what the guest's writers left at the freeze: transaction {t0_txid} is the last
committed one, transaction {open_txid} was open (its debit written, its credit not), so the
accounts' total is off; {b_scratch} excluded scratch files are there. A holds the same
{t0_txid} committed transactions, with {open_txid} undone and the excluded files gone. That is
all auto-recovery does: the standard VSS repair of a writable shadow copy, on a fork of the
frozen image. Nothing is rolled back in time. Which files differ:
""")
    res = s.step(s.inside(["diff", "-rq", str(mnt / "B"), str(mnt / "A")]), expect=(1,))
    check("ledger/wal.log" in res.out and "ledger/pages.db" in res.out,
          "the WAL and the pages differ between B and A")
    check("appender" not in res.out, "the appender's files are the same on B and A")
    wal = s.run(s.inside(["cmp", str(mp("B", "disk0") / "ledger" / "wal.log"),
                          str(mp("A", "disk0") / "ledger" / "wal.log")]), expect=(1,))
    pages = s.run(s.inside(["cmp", str(mp("B", "disk1") / "ledger" / "pages.db"),
                            str(mp("A", "disk1") / "ledger" / "pages.db")]), expect=(1,))
    s.show(wal, pages)
    check("EOF on " in wal.out and "/A/disk0/" in wal.out, "A's WAL is a prefix of B's")
    cut = int(grab(r"after byte (\d+)", wal.out, "where A's WAL ends"))
    first = int(grab(r"differ: (?:char|byte) (\d+)", pages.out, "the first differing byte"))
    page = (first - 1) // 4096
    s.text(f"""
A's write-ahead log is B's cut after byte {cut}: the BEGIN record of transaction {open_txid}
is gone. The data pages first differ in page {page} (byte {first}): the undo image from that
BEGIN record was written back. The appender is not VSS-aware and has no repair: its files are
the same on B and A. On the live disk it has moved on, as the guest's ledger has:
""")
    tail = s.run(s.inside(["tail", "-n", "1", str(mp("B", "disk0") / "appender" / "log.txt"),
                           str(mp("A", "disk0") / "appender" / "log.txt"),
                           str(live / "appender" / "log.txt")]))
    status = s.run(["hvlab", "guest", "status", "-n", LAB])
    s.show(tail, status)
    seqs = [int(x) for x in re.findall(r"^(\d+) \d+\.\d+ ", tail.out, re.MULTILINE)]
    check(len(seqs) == 3 and seqs[0] == seqs[1] < seqs[2],
          "B and A end at the same appender line, the live disk later")
    live_txid = int(table_cell(status.out, VM, "txid"))
    check(live_txid > t0_txid, "the live ledger committed past T0")
    s.text(f"""
B and A end at appender line {seqs[0]}; the live disk (the guest's mount, on C) is at line
{seqs[2]}, and the live ledger at transaction {live_txid}. None of that reaches A or B. At the
block level, auto-recovery's changes are small (the ledger's blocks, the scratch files' blocks,
the filesystem's own metadata and journal):
""")
    nbytes = s.step(s.inside(["sh", "-c", f"cmp -l /dev/hvlab_{LAB}/{VM}_disk1 "
                              f"/dev/hvlab_{LAB}/{VM}_disk1_a_{run_id} | wc -l"]))
    ndiff = int(grab(r"^(\d+)$", nbytes.out, "the count of differing bytes"))
    check(0 < ndiff < 1 << 20, "A and B differ in a few bytes, not megabytes")
    s.text(f"`disk1`: {ndiff} bytes of 256 MiB differ. Unmount and make the devices writable "
           "again before the run goes on:")
    s.show(*s.umount_all())

    # ------------------------------------------------------------ finish the backup
    s.text("""
## 4. Finish the backup

Step 11 takes the external snapshot set (S_B of B, S_A of A, for every disk of the job), step
12 removes A from the live side, step 13 reads S_A into the backup, step 14 deletes S and
merges C into B (C takes B's name; the controller already maps it, the guest notices nothing).
""")
    res = s.step(["hvlab", "backup", "-n", LAB, "--resume", run_id])
    s.paused_run = None
    check(f"run {run_id} done" in res.out and "application-consistent" in res.out,
          "the run is done and application-consistent")
    s.text("""
`hvlab explain` draws the run from its event log: first per step which artifacts exist, where
the guest's writes go and when it was frozen; then per disk each artifact's content
fingerprint (sha256 of its mapped blocks / number of mapped 64 KiB blocks) after each step.
""")
    res = s.step(["hvlab", "explain", "-n", LAB, run_id])
    for d in DISKS:
        fp = fingerprints(res.out, f"{VM}/{d}")

        def seen(art: str, first: int, last: int, fp: dict[int, dict[str, str]] = fp
                 ) -> list[str]:
            """The artifact's cells where it exists and was measured, steps first..last."""
            return [fp[n][art] for n in range(first, last + 1) if fp[n][art] not in "~-"]

        b_t0, a_t0 = fp[8]["B"], fp[8]["A"]
        check(b_t0 not in "~-" and set(seen("B", 8, 13)) == {b_t0},
              f"{d}: B is measured at T0 and the same up to step 13")
        check(a_t0 == b_t0, f"{d}: A equals B at T0")
        a_fixed = seen("A", 10, 12)
        check(bool(a_fixed) and a_fixed[0] != b_t0, f"{d}: step 10 changes A")
        check(set(seen("S_B", 11, 13)) == {b_t0}, f"{d}: S_B is B@T0")
        check(set(seen("S_A", 11, 13)) == {a_fixed[0]}, f"{d}: S_A is A")
        check([fp[n]["writes"] for n in range(5, 15)] == ["C"] * 9 + ["B"],
              f"{d}: the guest writes to C from step 5 to 13, then to B")
        check(fp[14]["C"] in "~-", f"{d}: C is gone after step 14")
    changed = re.findall(r"auto-recovery changed (\d+) bytes in (\d+) ranges", res.out)
    check(len(changed) == len(DISKS) and all(int(n) > 0 for n, _ in changed),
          "thin_delta finds auto-recovery's ranges on every disk")
    ranges = ", ".join(f"{int(n) // 1024} KiB in {r} ranges on {d}"
                       for (n, r), d in zip(changed, DISKS, strict=True))
    s.text(f"""
What to read in it: a cell is a fingerprint (`~` where the content was not hashed at that
step; the caption says where it is). B's fingerprint at T0 (step 8) is the same up to the read
(step 13): that is B@T0, and looking at it in section 3 changed nothing. At step 8 A has B's
fingerprint (a fork, nothing written yet); after step 10 A differs and B does not. C is the
live disk (`writes` is C from step 5 to step 13): its cell only counts its mapped blocks. S_B
has B@T0's fingerprint and S_A has A's. After step 14 C is gone: it became the live disk under
B's name (`writes` is B again). The last lines come from `thin_delta` between S_B and S_A:
auto-recovery changed {ranges} (thin pool blocks of 64 KiB; the manifest lists them as
`auto_recovery_ranges`).

The backup content is B@T0 plus A's changes, which is exactly A: step 13 reads S_A.
""")

    # ------------------------------------------------------------ verify, restore
    s.text("""
## 5. Verify and restore

`hvlab verify` checks the images' checksums, restores each into a temporary LV, runs
`fsck -n`, mounts it read-only and runs the writers' check:
""")
    res = s.step(["hvlab", "verify", "-n", LAB, str(dest)])
    check(f"last txid {t0_txid}," in res.out and "=> OK" in res.out,
          "the verified backup ends at the T0 transaction")
    s.text(f"""
The backup's ledger ends at transaction {t0_txid}, the last one committed before T0, although
the guest committed up to {live_txid} and beyond while the backup ran. `hvlab restore` makes a
new disk set from it:
""")
    s.step(["hvlab", "restore", "-n", LAB, str(dest), "--as", "rest01"])
    made = [s.run(["mkdir", "-p", *(str(mp("R", d)) for d in DISKS)])]
    for d in DISKS:
        made += s.mount_ro(f"/dev/mapper/hvlab_{LAB}_ctl_rest01_{d}", mp("R", d))
    res = s.run(["hvlab", "guest", "check", *(str(mp("R", d)) for d in DISKS)])
    made.append(res)
    made += s.umount_all()
    s.show(*made)
    check(f"last committed txid {t0_txid} " in res.out and "excluded files (scratch/*.tmp): 0"
          in res.out, "the restored ledger is A's")
    s.text(f"""
The restored disks hold B@T0 with auto-recovery's repair: a consistent ledger at transaction
{t0_txid}, no excluded files. Restoring B@T0 alone would give back the open transaction
{open_txid}.

## 6. Incremental, and off-host

`--incremental` keeps each disk's S_A as its reference point after the backup. The first
such backup has none to compare with, so it is full, and says why:
""")
    chain_full = w / "backups" / "vm01-chain-full"
    res = s.step(["hvlab", "backup", VM, "-n", LAB, "--no-fingerprints", "--incremental",
                  "--dest", str(chain_full)])
    check("no earlier backup" in res.out, "the first backup of a chain is full")
    s.text("""
The guest goes on writing. The next one reads only the chunks `thin_delta` finds changed
between the reference and its own S_A, and reads them off-host: the snapshot set is exported
read-only by nbdkit on a veth pair between two network namespaces, and a proxy in its own
namespace reads it with libnbd:
""")
    second = w / "backups" / "vm01-chain-inc"
    res = s.step(["hvlab", "backup", VM, "-n", LAB, "--no-fingerprints", "--incremental",
                  "--mode", "off-host", "--dest", str(second)])
    check("incremental" in res.out and "over NBD" in res.out, "an off-host incremental")
    inc_id = grab(r"^run (\S+) done", res.out, "the incremental's run id")
    res = s.run(["hvlab", "explain", "-n", LAB, inc_id])
    said = [x for x in res.out.splitlines() if "step 13 off-host" in x or "backup, chain" in x]
    check(len(said) >= 2, "explain names the proxy and the chain")
    s.text("`hvlab explain` of it says, among the rest:\n\n```\n" + "\n".join(said)
           + "\n```\n")
    s.text("""
`hvlab devices` shows the disks' reference points (and no namespace: the link lives only
inside step 13). `hvlab verify` of the incremental checks both links of the chain, then
restores the incremental's point (the full image, then the changed chunks) and checks it:
""")
    res = s.step(["hvlab", "devices", "-n", LAB])
    check("reference point" in res.out, "devices shows the reference points")
    res = s.step(["hvlab", "verify", "-n", LAB, str(second)])
    check("=> OK" in res.out, "the incremental verifies")
    s.text("""
## 7. Clean up

`hvlab down` removes every device, mount and file of the lab and checks nothing is left;
`hvlab vm down` stops the lab VM.
""")
    res = s.step(["hvlab", "down", "-n", LAB])
    check("nothing left" in res.out, "`hvlab down` left nothing")
    if s.runner == "uml":
        s.step(["hvlab", "vm", "down"])


# -------------------------------------------------------------------- setup and cleanup
def cleanup(s: Session) -> list[str]:
    """Undo whatever is left; returns what could not be undone."""
    problems = []
    lab_dir = Path(s.env["HVLAB_HOME"]) / LAB
    if s.paused_run and lab_dir.exists():
        r = s.run(["hvlab", "backup", "-n", LAB, "--abort", s.paused_run], expect=None)
        if r.rc:
            problems.append(f"abort of {s.paused_run}: {r.out}")
    for path in reversed(s.mounted):
        r = s.run(s.inside(["umount", str(path)]), expect=None)
        if r.rc:
            problems.append(f"umount {path}: {r.out}")
    s.mounted.clear()
    for dev in s.readonly:  # a device `hvlab down` removes anyway: best effort
        s.run(s.inside(["blockdev", "--setrw", dev]), expect=None)
    s.readonly.clear()
    if lab_dir.exists():
        r = s.run(["hvlab", "down", "-n", LAB, "--force"], expect=None)
        if r.rc:
            problems.append(f"hvlab down -n {LAB}: {r.out}")
    if vm_is_up(s.env):  # none ran when we started: this one is ours
        r = s.run(["hvlab", "vm", "down"], expect=None)
        if r.rc:
            problems.append(f"hvlab vm down: {r.out}")
    for sub in ("mnt", "backups"):
        shutil.rmtree(s.work / sub, ignore_errors=True)
    return problems


def vm_is_up(env: dict[str, str]) -> bool:
    out = subprocess.run([str(REPO / ".venv" / "bin" / "hvlab"), "vm", "status"], env=env,
                         capture_output=True, text=True, check=False).stdout
    return "lab VM: up" in out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--work-dir", type=Path, default=None,
                    help="mount points and the backup (default: $HVLAB_WALK_DIR or "
                         "/var/tmp/hvlab-walkthrough)")
    ap.add_argument("--out", type=Path, default=OUT, help=f"default: {OUT}")
    ns = ap.parse_args(argv)

    def terminate(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")  # runs the cleanup in main's finally

    signal.signal(signal.SIGTERM, terminate)
    work = (ns.work_dir or Path(os.environ.get("HVLAB_WALK_DIR",
                                               "/var/tmp/hvlab-walkthrough"))).absolute()
    env = dict(os.environ)
    env.setdefault("HVLAB_HOME", str(work / "home"))
    env.setdefault("HVLAB_VM_DIR", str(work / "vm"))
    env.update({"COLUMNS": COLUMNS, "NO_COLOR": "1", "TERM": "dumb"})
    env.pop("HVLAB_LAB", None)
    if os.geteuid() != 0:
        print("walkthrough: must run as root (loop devices, LVM, the lab VM)", file=sys.stderr)
        return 1
    if not (REPO / ".venv" / "bin" / "hvlab").exists():
        print("walkthrough: no .venv/bin/hvlab: run `make venv`", file=sys.stderr)
        return 1
    if (Path(env["HVLAB_HOME"]) / LAB).exists():
        print(f"walkthrough: a lab {LAB!r} exists in {env['HVLAB_HOME']}; not touching it "
              f"(`hvlab down -n {LAB}` with that HVLAB_HOME removes it)", file=sys.stderr)
        return 1
    if vm_is_up(env):
        print(f"walkthrough: a lab VM already runs in {env['HVLAB_VM_DIR']}; the walkthrough "
              f"starts and stops its own (set another HVLAB_VM_DIR)", file=sys.stderr)
        return 1
    work.mkdir(parents=True, exist_ok=True)
    for sub in ("mnt", "backups"):  # ours; nothing is mounted there (no lab VM runs)
        shutil.rmtree(work / sub, ignore_errors=True)
    s = Session(env=env, work=work)
    start = time.monotonic()
    failed: str | None = None
    try:
        walkthrough(s)
    except WalkFailed as exc:
        failed = str(exc)
    except Exception as exc:  # a bug here, or the environment: still clean up, still fail
        failed = f"{type(exc).__name__}: {exc}"
    finally:  # also on Ctrl-C / SIGTERM-as-KeyboardInterrupt
        problems = cleanup(s)
    for p in problems:
        print(f"walkthrough: cleanup: {p}", file=sys.stderr)
    if failed is not None:
        print(f"walkthrough: FAILED: {failed}\n{ns.out} not written", file=sys.stderr)
        return 1
    if problems:
        print(f"walkthrough: cleanup failed; {ns.out} not written", file=sys.stderr)
        return 1
    tmp = ns.out.with_name(ns.out.name + ".tmp")
    tmp.write_text("\n".join(s.md))
    tmp.replace(ns.out)
    print(f"walkthrough: wrote {ns.out} in {time.monotonic() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
