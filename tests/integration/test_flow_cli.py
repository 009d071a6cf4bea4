"""`hvlab backup/restore/verify/explain` on bad input, through the real command line: one
line on stderr naming the bad value, exit code 2, no traceback, and nothing changed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hvlab.flow import engine
from hvlab.lab import runs
from hvlab.sys.run import run
from hvlab_fixtures.plugin import LabHandle

pytestmark = pytest.mark.integration


def hvlab(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hvlab.cli", *args], capture_output=True,
                          text=True, env=os.environ, timeout=300)


def _one_line_error(res: subprocess.CompletedProcess[str], message: str) -> str | None:
    """None when `res` is a one-line usage error containing `message`; else what is wrong."""
    lines = res.stderr.strip().splitlines()
    if (res.returncode == 2 and len(lines) == 1 and message in lines[0]
            and "Traceback" not in res.stderr + res.stdout):
        return None
    return f"{res.args[3:]}: exit {res.returncode}, stderr {res.stderr!r}, want {message!r}"


def test_backup_restore_verify_bad_input(lab: LabHandle, tmp_path: Path) -> None:
    n = lab.defn.name
    done = engine.start(n, ["vm02"], fingerprints=False)
    assert done.state == "done"
    lvs_before = lab.lv_names()
    runs_before = {r.id for r in runs.all_runs(lab.names)}

    ro = tmp_path / "ro"
    ro.mkdir()
    run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "hvlab-test-ro", str(ro)])
    try:
        cases = [
            (["backup", "-n", n, "vm09"], "unknown VM 'vm09'"),
            (["backup", "-n", n], "give VMs to back up"),
            (["backup", "-n", n, "vm01", "vm01"], "named twice"),
            (["backup", "-n", n, "vm01", "--dest", done.dest], "already exists"),
            (["backup", "-n", n, "vm01", "--dest", str(ro / "b")], "not writable"),
            (["backup", "-n", n, "vm01", "--pause-after", "5"], "freeze window"),
            (["backup", "-n", n, "vm01", "--pause-after", "15"], "15"),
            (["backup", "-n", n, "--resume", done.id], "nothing to resume"),
            (["backup", "-n", n, "--abort", done.id], "nothing to abort"),
            (["backup", "-n", n, "--resume", "r0nosuchrun"], "r0nosuchrun"),
            (["restore", "-n", n, done.dest, "--as", "vm01"], "restore onto a new name"),
            (["restore", "-n", n, done.dest, "--as", "Bad_Name"], "Bad_Name"),
            (["restore", "-n", n, str(tmp_path / "nobackup"), "--as", "rest"], "nobackup"),
            (["verify", "-n", n, str(tmp_path / "nobackup")], "nobackup"),
            (["explain", "-n", n, "r0nosuchrun"], "r0nosuchrun"),
            (["explain", "-n", n, done.id, "--json", "--commands"], "use it alone"),
            (["backup", "-n", n, "vm01", "--inject", "step-99:kill"], "step-99"),
            (["backup", "-n", n, "vm01", "--inject", "step-05:explode"], "explode"),
        ]
        wrong = [w for args, message in cases if (w := _one_line_error(hvlab(*args), message))]
        assert not wrong, "\n".join(wrong)
    finally:
        run(["umount", str(ro)])
    assert lab.lv_names() == lvs_before, "bad input changed the LV set"
    assert {r.id for r in runs.all_runs(lab.names)} == runs_before, "a run was registered"
    assert lab.controller_maps_base("vm02", "disk0")
    # The program log: every command of every step, ready to copy.
    out = hvlab("explain", "-n", n, done.id, "--commands")
    assert out.returncode == 0, out.stderr
    assert "# [5] vm02 backup checkpoint" in out.stdout
    # C and A allocated by LVM in step 4; in step 5 the pool snapshots into C, by ioctl.
    assert "lvm lvcreate -q -s -kn -an" in out.stdout and "create_snap" in out.stdout
    assert "# ioctl: table load" in out.stdout
    assert "thin_dump --metadata-snap" in out.stdout and "lvm lvrename" in out.stdout


def test_stop_is_refused_while_a_backup_is_paused(lab: LabHandle) -> None:
    n = lab.defn.name
    paused = engine.start(n, ["vm02"], pause_after=9, fingerprints=False)
    assert paused.state == "paused" and not lab.controller_maps_base("vm02", "disk0")
    assert _one_line_error(hvlab("stop", "-n", n), "before `hvlab stop`") is None
    engine.abort(n, paused.id)
    assert lab.controller_maps_base("vm02", "disk0")


def _flip_one_byte(image: Path) -> int:
    """Flip every bit of one byte of the image's data (not a hole); returns its offset."""
    with open(image, "r+b") as f:
        off = os.lseek(f.fileno(), 0, os.SEEK_DATA) + 4096 + 17
        f.seek(off)
        byte = f.read(1)
        f.seek(off)
        f.write(bytes([byte[0] ^ 0xFF]))
    return off


def test_verify_a_flipped_byte_and_a_malformed_manifest(lab: LabHandle, tmp_path: Path) -> None:
    """Issue 9: verify of a backup with one flipped byte fails (exit 1) and names the image,
    no traceback; restore refuses it; a manifest missing fields or of the wrong type is one
    line, exit 2. Nothing is made or left on the lab's devices."""
    import json

    n = lab.defn.name
    done = engine.start(n, ["vm02"], fingerprints=False)
    assert done.state == "done"
    good = hvlab("verify", "-n", n, done.id)
    assert good.returncode == 0 and "=> OK" in good.stdout, good.stdout + good.stderr
    lvs_before = lab.lv_names()

    image = Path(done.dest) / "vm02_disk0.img"
    _flip_one_byte(image)
    res = hvlab("verify", "-n", n, done.id)
    out = res.stdout + res.stderr
    assert res.returncode == 1 and "Traceback" not in out, out
    assert "checksums MISMATCH" in res.stdout and f"image {image}: checksum mismatch" in res.stdout
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and str(image) in err[0], res.stderr
    rep = json.loads(hvlab("verify", "-n", n, done.id, "--json").stdout)
    assert rep["ok"] is False and rep["vms"][0]["ok"] is False
    assert rep["vms"][0]["checksums"][0]["problem"] == "checksum mismatch"
    res = hvlab("restore", "-n", n, done.dest, "--as", "rest")
    err = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(err) == 1 and str(image) in err[0], res.stderr
    assert "Traceback" not in res.stderr
    assert lab.lv_names() == lvs_before, "a damaged backup changed the LV set"

    path = Path(done.dest) / "manifest.json"
    original = json.loads(path.read_text())

    def without(*keys: str | int) -> Any:
        d = json.loads(json.dumps(original))
        node = d
        for k in keys[:-1]:
            node = node[k]
        del node[keys[-1]]
        return d

    def with_value(value: Any, *keys: str | int) -> Any:
        d = json.loads(json.dumps(original))
        node = d
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
        return d

    cases: list[tuple[Any, str]] = [
        (without("vms"), "vms is missing"),
        (without("run"), "run is missing"),
        (without("vms", 0, "disks", 0, "sha256"), "vms[0].disks[0].sha256 is missing"),
        (without("vms", 0, "consistency"), "vms[0].consistency is missing"),
        (with_value("vm02", "vms"), "vms is 'vm02'"),
        (with_value(5, "vms", 0, "disks", 0, "sha256"), "vms[0].disks[0].sha256 is 5"),
        (with_value("64M", "vms", 0, "disks", 0, "size"), "vms[0].disks[0].size is '64M'"),
        (with_value(None, "vms", 0, "disks", 0, "image"), "vms[0].disks[0].image is None"),
        (with_value("../../../etc/shadow", "vms", 0, "disks", 0, "image"), "image is"),
        (with_value({"x": 1}, "vms", 0, "disks"), "vms[0].disks is"),
        ([original], "the manifest is"),
        ("not json {", "unreadable manifest"),
    ]
    try:
        wrong = []
        for content, message in cases:
            path.write_text(content if isinstance(content, str) else json.dumps(content))
            for args in (["verify", "-n", n, done.dest],
                         ["restore", "-n", n, done.dest, "--as", "rest"]):
                if w := _one_line_error(hvlab(*args), message):
                    wrong.append(w)
        assert not wrong, "\n".join(wrong)
    finally:
        path.write_text(json.dumps(original))
    assert lab.lv_names() == lvs_before, "a malformed manifest changed the LV set"


def _mode(p: Path) -> int:
    import stat

    return stat.S_IMODE(p.lstat().st_mode)


def test_lab_and_backup_files_are_root_only(lab: LabHandle, tmp_path: Path) -> None:
    """Issue 9: backing files, backup images, manifests 0600; the lab directory, the backing
    folder and backup directories 0700, from creation (after `up` and a backup)."""
    from hvlab.backup import restore as rst
    from hvlab.lab.paths import backups_root

    names = lab.names
    assert _mode(names.dir) == 0o700
    assert _mode(names.backing_dir) == 0o700
    files = [names.backing_file(i) for i in range(lab.defn.backing_files)]
    assert files and all(_mode(f) == 0o600 for f in files), [oct(_mode(f)) for f in files]
    assert _mode(names.state_file) == 0o600

    n = lab.defn.name
    done = engine.start(n, ["vm02"], fingerprints=False)
    assert done.state == "done"
    assert rst.verify(n, done.id)["ok"]
    dest = Path(done.dest)
    assert dest.parent == names.backups_dir and backups_root() == names.backups_dir.parent
    for d in (names.backups_dir, dest):
        assert _mode(d) == 0o700, (d, oct(_mode(d)))
    made = sorted(p.name for p in dest.iterdir())
    assert {"manifest.json", "vm02_disk0.img", "verify.json", ".hvlab-run"} <= set(made), made
    loose = {p.name: oct(_mode(p)) for p in dest.iterdir() if _mode(p) != 0o600}
    assert not loose, loose

    # --dest somewhere new: the folders it makes are 0700 too
    there = tmp_path / "new" / "b"
    other = engine.start(n, ["vm02"], dest=there, fingerprints=False)
    assert other.state == "done"
    assert _mode(tmp_path / "new") == 0o700 and _mode(there) == 0o700
    loose = {p.name: oct(_mode(p)) for p in there.iterdir() if _mode(p) != 0o600}
    assert not loose, loose
