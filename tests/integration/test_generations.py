"""The three Hyper-V generations (`hvlab backup --model 2012|2012r2|2016`) on the same lab,
each held to 2012 R2's invariants: an application-consistent image whose last transaction is
the guest's at T0, nothing written after T0 in it, the LV set back as before, a restore that
is bit for bit the image, and the artifacts of its own generation only. (Killed at every
fault point of each: test_flow_kill.py; eight disks: test_eight_disks.py.)"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from rich.console import Console

from hvlab.backup import restore as rst
from hvlab.flow import engine
from hvlab.flow import steps as S
from hvlab.lab import runs
from hvlab.lab.record import Run
from hvlab.report import draw, explain
from hvlab.sys import fs
from hvlab.sys.run import run
from hvlab_fixtures.pictures import check_png, check_svg
from hvlab_fixtures.plugin import LabHandle, one_vm_lab

pytestmark = pytest.mark.integration

TWO_DISKS = one_vm_lab([("64M", "ext4"), ("320M", "xfs")], backing="1G")
# The last step before which the guest is thawed and the backup not yet read (2012: step 7
# ready; 2012 R2 and 2016: step 9 ready).
READY = {"2012": 7, "2012r2": 9, "2016": 9}


def _sha(path: str | Path, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = size
        while left:
            chunk = f.read(min(left, 1 << 20))
            assert chunk, f"{path} is shorter than {size}"
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def _image_has(img: Path, rel: str, tmp: Path) -> bool:
    lo = run(["losetup", "-f", "--show", "-r", str(img)]).stdout.strip()
    try:
        fs.mount(lo, tmp, "ext4", read_only=True)
        try:
            return (tmp / rel).exists()
        finally:
            fs.umount(tmp)
    finally:
        run(["losetup", "-d", lo])


@pytest.mark.parametrize("model", list(S.MODELS))
def test_each_generation_backs_up_verifies_and_restores(
        lab_factory: Callable[..., LabHandle], tmp_path: Path, model: str) -> None:
    h = lab_factory(TWO_DISKS, start_guests=True)
    lab = h.defn.name
    paused = engine.start(lab, ["vm01"], pause_after=READY[model], model=model)
    assert paused.state == "paused" and paused.model == model
    after = h.mountpoint("vm01", "disk0") / "after_t0.txt"
    after.write_text("written after T0\n")  # the live VM goes on: never in the backup
    run(["sync"])
    done = engine.resume(lab, paused.id)
    assert done.state == "done", done.error
    m = S.model(model)
    evs = runs.events(h.names, done.id)
    assert [(e.step, e.vm) for e in evs] == m.plan(["vm01"])
    made = {a["artifact"] for e in evs for a in e.detail.get("made", [])}
    assert made and made <= set(m.artifacts), made
    v = done.vm["vm01"]
    assert v.cls == "application-consistent" and v.window and v.window.thawed_at
    assert done.post and done.pre and done.post["lvs"] == done.pre["lvs"]
    # The image is the guest at T0 with its writers' fix-ups: its last transaction is the
    # one the guest had committed when it froze, and what came after T0 is not in it.
    rep = rst.verify(lab, done.id)
    assert rep["ok"], rep
    ledger = rep["vms"][0]["ledger"]
    assert ledger["consistent"] and v.freeze_reply
    assert ledger["last_txid"] == v.freeze_reply["ledger_last_txid"], (ledger, v.freeze_reply)
    dest = Path(done.dest)
    assert not _image_has(dest / "vm01_disk0.img", "after_t0.txt", tmp_path / "img")
    assert after.exists()
    for d, disk in v.disks.items():
        img = done.images[f"vm01/{d}"]
        if model == "2012":  # the host rolled S_B back: the guest wrote after T0
            assert disk.reverted and disk.reverted["chunks"] > 0, disk.reverted
        assert img["source"] == disk.lv(m.source)
    # `hvlab explain` of the run, as tables and as a picture.
    con = Console(width=200, file=io.StringIO(), record=True)
    explain.render_explain(done, evs, con)
    text = con.export_text()
    assert all(f"vm01/disk0 {a}" in text for a in m.artifacts), text[-2000:]
    draw.save(done, evs, tmp_path / "run.png")
    check_png(tmp_path / "run.png", (1200, 500))
    # A restore is the image, bit for bit.
    rec = rst.restore(lab, done.id, "rest", vm="vm01")
    h.expect_extra(lvs=rec["lvs"], dm=rec["controllers"])
    for d, disk in v.disks.items():
        dev = f"/dev/mapper/{h.names.ctl('rest', d)}"
        assert _sha(dev, disk.size) == _sha(dest / f"vm01_{d}.img", disk.size)


def test_2016_incrementals_from_reference_points(lab_factory: Callable[..., LabHandle]
                                                 ) -> None:
    """2016's change tracking: the first backup leaves a reference point per disk (the
    checkpoint's A, kept), the next reads only what changed since it, and its restore (the
    chain) verifies."""
    h = lab_factory(TWO_DISKS, start_guests=True)
    lab = h.defn.name
    first = engine.start(lab, ["vm01"], model="2016", incremental=True, fingerprints=False)
    refs = {n for n in h.lv_names() if n.startswith("vm01_") and "_ref_" in n}
    assert len(refs) == 2, h.lv_names()
    (h.mountpoint("vm01", "disk0") / "more.bin").write_bytes(b"x" * (1 << 20))
    run(["sync"])
    second = engine.start(lab, ["vm01"], model="2016", incremental=True, fingerprints=False)
    c = second.images["vm01/disk0"]["chain"]
    assert c["kind"] == "incremental", c
    assert 0 < c["changed_bytes"] < second.images["vm01/disk0"]["mapped_bytes"]
    assert first.images["vm01/disk0"]["chain"]["kind"] == "full"
    assert rst.verify(lab, second.id)["ok"]
    _check_run(second)


def _check_run(r: Run) -> None:
    assert r.state == "done" and r.model == "2016"
    assert not any(d.S_B or d.S_A for _, _, d in r.disks()), "2016 takes no host snapshot"


def test_explain_compare_puts_real_runs_side_by_side(lab_factory: Callable[..., LabHandle],
                                                     tmp_path: Path) -> None:
    """`hvlab explain --compare` of a run of each generation, through the real command line:
    one lane per run on the shared phases, what each holds, as a table and a picture."""
    h = lab_factory(TWO_DISKS, start_guests=True)
    ids = [engine.start(h.defn.name, ["vm01"], model=m, fingerprints=False).id
           for m in ("2012", "2012r2", "2016")]
    res = subprocess.run([sys.executable, "-m", "hvlab.cli", "explain", "--compare", *ids,
                          "-n", h.defn.name, "--png", "c.png", "--svg", "c.svg"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "COLUMNS": "200"})
    assert res.returncode == 0, res.stderr
    out = res.stdout
    for text in (*ids, "2012r2", "host snapshot", "fix-ups -> G (its store D)",
                 "fix-ups -> S_B (rolled back to G)", "backup <- S_A (host)",
                 "backup <- A (auto-recovery)", "C merged into B"):
        assert text in out, (text, out[-3000:])
    t0_row = next(ln for ln in out.splitlines() if ln.startswith("│ T0 "))
    assert t0_row.count("internal snapshot") == 3, t0_row  # T0 in every lane
    check_png(tmp_path / "c.png", (1200, 500))
    check_svg(tmp_path / "c.svg", [*ids, "backup: S_A: A (B at T0 + fix-ups) in the host's "
                                   "snapshot"])


def test_a_paused_2012_run_shows_its_devices(lab_factory: Callable[..., LabHandle]) -> None:
    """`hvlab backup --model 2012 --pause-after 9`, through the command line: the run stops
    with the host's snapshot taken and not yet rolled back, and names every device to poke
    at (G, D, S_B, S_D); `--resume` finishes it."""
    h = lab_factory(TWO_DISKS, start_guests=True)

    def hvlab(*args: str) -> str:
        res = subprocess.run([sys.executable, "-m", "hvlab.cli", *args, "-n", h.defn.name],
                             capture_output=True, text=True, timeout=300,
                             env={**os.environ, "COLUMNS": "200"})
        assert res.returncode == 0, res.stdout + res.stderr
        return res.stdout

    out = hvlab("backup", "vm01", "--model", "2012", "--pause-after", "9",
                "--no-fingerprints")
    for text in ("paused after step 9", "G the guest's shadow copy (2012)",
                 "D the guest's diff area (2012)", "S external snapshot of B",
                 "S external snapshot of D"):
        assert text in out, (text, out)
    (paused,) = runs.all_runs(h.names)
    assert hvlab("backup", "--resume", paused.id).count("done") >= 1
    assert runs.load(h.names, paused.id).state == "done"
