"""Issue 9, bad input everywhere, on one lab brought up once (with guests, in a private
HVLAB_HOME that is itself a symlink - allowed - so every path below is tried through it):

- symlinks where the lab writes or removes (the lab folder, the backups folders, the runs
  folder, anything in the lab folder, a --dest or its parents inside HVLAB_HOME) are refused
  in one line, exit 2, nothing made or removed, and `down` of a symlinked lab folder refuses
  instead of reporting a lab gone whose files stay (then `up` and `down` looped);
- a backup directory that is a file, read-only, a symlink, another run's or inside one, or in
  a lab's folder: one line, exit 2, no snapshot left, the guest keeps running and committing;
- every command and option with values wrong in type, range, charset and length.

The command line runs in a fork of this process (hvlab_fixtures.clirun: `hvlab.cli.main`
with the real argv and environment; a new interpreter costs ~2.5 s in the lab VM).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hvlab.guest.client import GuestClient
from hvlab.lab import definition, guests, inventory, runs, substrate, teardown
from hvlab.sys import dm, fs, loop
from hvlab.sys.run import run
from hvlab_fixtures.clirun import hvlab
from hvlab_fixtures.plugin import LabHandle, assert_nothing_left, lab_extras, requires

pytestmark = pytest.mark.integration

LAB = "badin"
# Small: vm01 has integration services and a ledger to watch, vm02 none (crash-consistent,
# the quickest backup).
BAD_LAB: dict[str, Any] = {
    "lab": {"name": LAB, "backing_size": "1G"},
    "vm": [
        {"name": "vm01", "profile": "windows",
         "disk": [{"name": "disk0", "size": "64M", "fs": "ext4"}]},
        {"name": "vm02", "profile": "none",
         "disk": [{"name": "disk0", "size": "64M", "fs": "ext4"}]},
    ],
}


@pytest.fixture(scope="module")
def bad_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LabHandle, Path]]:
    """The lab, in a private HVLAB_HOME reached through a symlink (base/home -> real-home)."""
    requires("root", "loop", "dm-thin")
    base = tmp_path_factory.mktemp("bad-input")
    (base / "real-home").mkdir()
    (base / "home").symlink_to(base / "real-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HVLAB_HOME", str(base / "home"))
        mp.delenv("HVLAB_LAB", raising=False)
        mp.setenv("NO_COLOR", "1")
        defn = definition.parse(BAD_LAB)
        handle = LabHandle(substrate.up(defn, start_guests=True))
        try:
            yield handle, base
        finally:
            teardown.down(LAB, purge=True, missing_ok=True)
            assert_nothing_left(LAB)
            assert not loop.loops_under(base), loop.loops_under(base)
            assert not os.path.lexists(base / "real-home" / LAB)


def committed(h: LabHandle, vm: str = "vm01") -> int:
    return int(GuestClient(guests.socket_path(h.names, vm)).status().get("committed_txid") or 0)


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def test_symlinks_and_bad_backup_directories(bad_lab: tuple[LabHandle, Path]) -> None:
    h, base = bad_lab
    n = h.defn.name
    real = base / "real-home"
    home = base / "home"
    tmp = base / "scratch"
    tmp.mkdir()
    away = base / "elsewhere"  # where a planted link points: nothing may ever land there
    away.mkdir()
    assert h.names.dir == real / n  # HVLAB_HOME resolved once: the lab lives in real-home
    lvs0 = h.lv_names()
    tx0 = committed(h)
    other_run = "r20260101000000abcd"
    (tmp / "other").mkdir()
    (tmp / "other" / ".hvlab-run").write_text(other_run + "\n")
    (tmp / "afile").write_text("")
    (tmp / "exists").mkdir()
    (tmp / "ro").mkdir()
    (away / "dtarget").mkdir()
    (tmp / "dlink").symlink_to(away / "dtarget")
    (tmp / "dangling").symlink_to(away / "nothing")
    small = tmp / "small.toml"
    small.write_text('[lab]\nname = "sl"\nbacking_size = "1G"\n[[vm]]\nname = "vm01"\n'
                     'profile = "none"\n[[vm.disk]]\nname = "disk0"\nsize = "64M"\n')
    run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "hvlab-test-ro", str(tmp / "ro")])
    wrong: list[str] = []

    def case(args: list[str], message: str, plant: tuple[Path, Path] | None = None) -> None:
        """Plant `link -> target` (target a new empty folder in `away`), run, check that
        nothing landed there, remove the link."""
        if plant:
            link, target = plant
            target.mkdir(parents=True)
            link.symlink_to(target)
        try:
            w = hvlab(*args).refusal(message)
            if w:
                wrong.append(f"{args}: {w}")
            if plant and listing(plant[1]):
                wrong.append(f"{args}: wrote through the link: {listing(plant[1])}")
        finally:
            if plant:
                plant[0].unlink()

    try:
        # the lab folder itself (a new lab): nothing made there, no device
        case(["up", "--lab", str(small), "--no-guests"], "lab folder",
             (real / "sl", away / "sl"))
        # the backups root, the lab's backups folder, the runs folder, anything in the lab
        case(["backup", "-n", n, "vm02"], f"{real}/backups is a symlink",
             (real / "backups", away / "bk"))
        (real / "backups").mkdir()
        case(["backup", "-n", n, "vm02"], f"{real}/backups/{n} is a symlink",
             (real / "backups" / n, away / "bk2"))
        assert not (h.names.runs_dir).exists()
        case(["backup", "-n", n, "vm02"], f"{h.names.runs_dir} is a symlink",
             (h.names.runs_dir, away / "runs"))
        case(["backup", "-n", n, "vm02"], f"{h.names.dir}/live is a symlink",
             (h.names.dir / "live", away / "live"))
        case(["recover", "-n", n], f"{h.names.dir}/live is a symlink",
             (h.names.dir / "live", away / "live2"))
        # --dest: through a link planted below HVLAB_HOME (by either spelling of it)
        (real / "backups" / n).mkdir()
        for i, spelled in enumerate((real, home)):
            case(["backup", "-n", n, "vm02", "--dest", str(spelled / "backups" / n / "in" / "x")],
                 f"{real}/backups/{n}/in is a symlink",
                 (real / "backups" / n / "in", away / f"in{i}"))
        # --dest: a symlink, a file, read-only, another run's, inside one, in a lab folder
        for args, message in [
            (["--dest", str(tmp / "dlink")], "is a symlink"),
            (["--dest", str(tmp / "dangling")], "is a symlink"),
            (["--dest", str(tmp / "afile")], "already exists as a file"),
            (["--dest", str(tmp / "afile" / "x")], f"{tmp / 'afile'} is not a folder"),
            (["--dest", str(tmp / "ro" / "b")], "is not writable"),
            (["--dest", str(tmp / "other")], f"the backup of run {other_run}"),
            (["--dest", str(tmp / "other" / "in" / "b")], f"the backup of run {other_run}"),
            (["--dest", str(tmp / "exists")], "already exists"),
            (["--dest", str(home / n / "mine")], "not below"),
            (["--dest", str(home / "mine")], "not below"),
        ]:
            case(["backup", "-n", n, "vm01", *args], message)
    finally:
        run(["umount", str(tmp / "ro")])
    assert not wrong, "\n".join(wrong)
    assert not os.path.lexists(real / "sl") and not loop.loops_under(away)
    assert listing(tmp / "dlink") == [] and not (tmp / "other" / "in").exists()
    assert not runs.all_runs(h.names), "a refused backup registered a run"
    assert h.lv_names() == lvs0, "a refused backup left a snapshot"
    assert h.controller_maps_base("vm01", "disk0")
    assert committed(h) > tx0, "the guest stopped committing"

    # A backup through the symlinked HVLAB_HOME works and lands in the real folder.
    done = hvlab("backup", "-n", n, "vm02", "--no-fingerprints")
    assert done.code == 0, done.err
    (r,) = runs.all_runs(h.names)
    assert r.state == "done" and Path(r.dest).parent == real / "backups" / n, r.dest

    # down --purge with the backups root swapped for a link: refused before anything goes
    (real / "backups").rename(away / "bkreal")
    (real / "backups").symlink_to(away / "bkreal")
    try:
        w = hvlab("down", "-n", n, "--purge").refusal(f"{real}/backups is a symlink")
        assert w is None, w
        assert (away / "bkreal" / n / r.id / "manifest.json").exists()
        assert inventory.of(n).loops, "the lab went down"
    finally:
        (real / "backups").unlink()
        (away / "bkreal").rename(real / "backups")

    # The lab folder swapped for a link while the lab is up (what made `down` say "nothing
    # left" while the backing file stayed, then `up` and `down` loop): every command that
    # would write or remove through it refuses, the same way each time.
    h.names.dir.rename(away / "labreal")
    h.names.dir.symlink_to(away / "labreal")
    try:
        for args in (["down", "-n", n], ["down", "-n", n, "--force"], ["up", "-n", n],
                     ["stop", "-n", n], ["backup", "-n", n, "vm02"], ["down", "-n", n]):
            w = hvlab(*args).refusal(f"lab folder {h.names.dir} is a symlink")
            assert w is None, f"{args}: {w}"
        assert (away / "labreal" / "backing" / "pv0.img").exists()
        assert len(inventory.of(n).loops) == 1 and dm.devices_with_prefix(
            h.names.ctl("vm01", "disk0"))
    finally:
        h.names.dir.unlink()
        (away / "labreal").rename(h.names.dir)
    assert committed(h) > tx0
    assert not lab_extras(h), lab_extras(h)
    assert not [m for m in fs.mounts() if m.target.startswith(str(away))]


def _state(h: LabHandle) -> dict[str, Any]:
    """What a refused command must leave as it was: LVs, dm devices, loops, mounts, runs, and
    the files of HVLAB_HOME (but the guests' own folders and the mounted disks)."""
    real = h.names.dir.parent
    files = [f for f in listing(real) if not f.startswith((f"{LAB}/guests/", f"{LAB}/mnt/"))]
    return {"lvs": h.lv_names(), "dm": sorted(d.name for d in dm.list_devices()),
            "loops": sorted(lo.name for lo in loop.list_loops()),
            "mounts": sorted(m.target for m in fs.mounts()),
            "runs": sorted(r.id for r in runs.all_runs(h.names)), "files": files}


def test_every_command_and_option_with_bad_values(bad_lab: tuple[LabHandle, Path]) -> None:
    """The cases that need a lab (the pure ones: tests/unit/test_cli_bad_args.py)."""
    from hvlab.flow import engine

    h, base = bad_lab
    n = h.defn.name
    tmp = base / "cli"
    tmp.mkdir()
    done = next((r.id for r in runs.all_runs(h.names) if r.state == "done"), None) or (
        engine.start(n, ["vm02"], fingerprints=False).id)
    (tmp / "afile").write_text("")
    (tmp / "empty").mkdir()
    (tmp / "empty.toml").write_text("")
    os.mkfifo(tmp / "fifo")
    same = tmp / "same.toml"
    same.write_text(f'[lab]\nname = "{n}"\nbacking_size = "1G"\n' + "".join(
        f'[[vm]]\nname = "{v["name"]}"\nprofile = "{v["profile"]}"\n'
        f'[[vm.disk]]\nname = "disk0"\nsize = "64M"\nfs = "ext4"\n' for v in BAD_LAB["vm"]))
    long = "x" * 5000
    cases: list[tuple[list[str], str]] = [
        (["backup", "-n", n, "vm09"], "unknown VM 'vm09': this lab has vm01, vm02"),
        (["backup", "-n", n, "vm01", "vm01"], "named twice"),
        (["backup", "-n", "nosuch", "vm01"], "lab 'nosuch' is not up"),
        (["backup", "-n", n, "--resume", "r0nosuchrun"], "no run 'r0nosuchrun'"),
        (["backup", "-n", n, "--abort", "r0nosuchrun"], "no run 'r0nosuchrun'"),
        (["backup", "-n", n, "--resume", done], f"run {done} is done: nothing to resume"),
        (["backup", "-n", n, "--abort", done], f"run {done} is done: nothing to abort"),
        (["backup", "-n", n, "--resume", done, "--dest", str(tmp / "d")], "--dest is fixed"),
        (["backup", "-n", n, "--abort", done, "--pause-after", "9"], "takes no other option"),
        (["guest", "start", "-n", n, "vm09"], "unknown VM 'vm09'"),
        (["guest", "stop", "-n", n, "vm09"], "unknown VM 'vm09'"),
        (["guest", "status", "-n", "nosuch"], "lab 'nosuch' is not up"),
        (["guest", "workload", "-n", n, "vm09", "--pause"], "unknown VM 'vm09'"),
        (["guest", "workload", "-n", n, "vm02", "--pause"], "profile none"),
        (["guest", "workload", "-n", n, "vm01"], "give --ops-per-s"),
        (["guest", "workload", "-n", n, "vm01", "--pause", "--writer", "nosuch"],
         "no writer named 'nosuch' (its writers: ledger"),
        (["guest", "workload", "-n", n, "vm01", "--ops-per-s", "5", "--writer", ""],
         "no writer named ''"),
        (["guest", "workload", "-n", n, "vm01", "--pause", "--writer", long],
         "no writer named 'xxxx"),
        (["guest", "check", str(tmp / "nonexistent")], "is not a directory"),
        (["guest", "check", str(tmp / "afile")], "is not a directory"),
        (["restore", "-n", n, done, "--as", "vm01"], "restore onto a new name"),
        (["restore", "-n", n, done, "--as", "r1", "--vm", "vm09"], "'vm09' is not in"),
        (["restore", "-n", n, str(tmp / "nobackup"), "--as", "r1"], "no backup at"),
        (["restore", "-n", n, str(tmp / "afile"), "--as", "r1"], "no backup at"),
        (["restore", "-n", n, str(tmp / "empty"), "--as", "r1"], "no backup at"),
        (["verify", "-n", n, "r0nosuchrun"], "no backup at 'r0nosuchrun'"),
        (["verify", "-n", n, "/etc"], "no backup at '/etc'"),
        (["verify", "-n", n, long], "no backup at 'xxxx"),
        (["verify", "-n", n, str(tmp / long[:300] / "b")], "no backup at"),
        (["explain", "-n", n, "r0nosuchrun"], "no run 'r0nosuchrun'"),
        (["explain", "-n", n, done, "--png", str(tmp)], "is a directory"),
        (["explain", "-n", n, done, "--svg", str(tmp / "no" / "x.svg")], "no directory"),
        (["explain", "-n", n, done, "--json", "--png", str(tmp / "x.png")], "use it alone"),
        (["recover", "-n", "nosuch"], "lab 'nosuch' is not up"),
        (["stop", "-n", "nosuch"], "lab 'nosuch' does not exist"),
        (["down", "-n", "nosuch"], "lab 'nosuch' is not up"),
        (["devices", "-n", n, "extra"], "unexpected extra argument"),
        (["up", "-n", n], f"lab {n!r} already exists with a different definition"),
        (["up", "--lab", str(same)], f"lab {n!r} is already up"),
        (["up", "--lab", str(tmp / "empty")], "not a regular file"),
        (["up", "--lab", str(tmp / "fifo")], "not a regular file"),
        (["up", "--lab", "/dev/zero"], "not a regular file"),
        (["up", "--lab", str(tmp / "missing.toml")], "cannot read lab file"),
        (["up", "--lab", str(tmp / "empty.toml")], "at least one [[vm]]"),
    ]
    before = _state(h)
    tx0 = committed(h)
    wrong = [f"{[a[:40] for a in args]}: {w}" for args, message in cases
             if (w := hvlab(*args).refusal(message))]
    assert not wrong, f"{len(wrong)} of {len(cases)}:\n" + "\n".join(wrong)
    assert _state(h) == before
    status = GuestClient(guests.socket_path(h.names, "vm01")).status()
    assert not any(w.get("state") == "paused" for w in status["writers"]), status["writers"]
    assert committed(h) > tx0, "the guest stopped committing"
    assert not lab_extras(h), lab_extras(h)
