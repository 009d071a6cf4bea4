"""The substrate on real devices: up/down, restart, crash recovery, bad input, two labs."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hvlab.errors import BadInput
from hvlab.lab import definition, inventory, substrate, teardown
from hvlab.lab.paths import Names
from hvlab.sys import dm, fs, loop
from hvlab.sys.run import run
from hvlab_fixtures.plugin import TEST_LAB, LabHandle, assert_nothing_left, requires

pytestmark = pytest.mark.integration


def hvlab(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([sys.executable, "-m", "hvlab.cli", *args], capture_output=True,
                         text=True, env=os.environ, timeout=300)
    if check:
        assert res.returncode == 0, res.stderr
    return res


def test_up_builds_the_whole_stack(lab: LabHandle) -> None:
    names = lab.names
    lvs = names.lvm().lvs(names.vg)
    assert {"pool", "vm01_disk0", "vm01_disk1", "vm02_disk0"} <= set(lvs)
    for vm, disk in lab.defn.disks():
        assert names.tag in lvs[f"{vm.name}_{disk.name}"].tags
        ctl = names.ctl(vm.name, disk.name)
        # The guest mounts the controller, never the LV, and it maps exactly the LV.
        lv = lvs[names.lv(vm.name, disk.name)]
        assert dm.target_of(ctl) == lv.majmin
        mounted = {m.target: m for m in fs.mounts()}
        m = mounted[str(names.mountpoint(vm.name, disk.name))]
        assert m.source == f"/dev/mapper/{ctl}" and m.fstype == disk.fs
    # The private LVM config sees only the lab's PVs: a dm-linear (uuid HVLAB-<lab>-pv-<i>)
    # over each of the lab's loops, and LVM's PV is that device, never the loop.
    conf = (names.lvm_dir / "lvm.conf").read_text()
    (lo,) = loop.loops_under(names.dir)
    pv = next(d for d in dm.list_devices() if d.name == names.pv(0))
    assert pv.uuid == names.pv_uuid(0) and dm.leaves(pv) == {Path(lo.name).name}
    assert f"a|^{pv.path}$|" in conf and lo.name not in conf
    pvs = names.lvm().pvs()
    assert [r["pv_name"] for r in pvs] == [pv.path] and pvs[0]["vg_name"] == names.vg


def test_devices_shows_the_tree(lab: LabHandle) -> None:
    res = hvlab("devices", "--lab-name", lab.defn.name, check=True)
    for word in ("loop", "thin pool", "vm01_disk0", "controller", "mount", "live disk (B)"):
        assert word in res.stdout
    data = json.loads(hvlab("devices", "-n", lab.defn.name, "--json", check=True).stdout)
    assert data["pool"]["data_percent"] is not None
    assert len(data["controllers"]) == 3 and len(data["mounts"]) == 3


def test_down_leaves_nothing(lab_factory: Callable[..., LabHandle]) -> None:
    lab = lab_factory()
    res = hvlab("down", "-n", lab.defn.name, check=True)
    assert "nothing left" in res.stdout
    # The kernel's own account of the removal (block uevents), not just ours.
    kernel = next(line for line in res.stdout.splitlines() if line.startswith("kernel:"))
    removed = kernel.split("removed ", 1)[1].split(";")[0].split(", ")
    assert lab.names.ctl("vm01", "disk0") in removed, removed  # dm devices, by name
    assert f"{lab.names.vg}-vm01_disk0" in removed, removed  # the LV
    assert_nothing_left(lab.defn.name)
    assert not lab.names.dir.exists()
    again = hvlab("down", "-n", lab.defn.name)
    assert again.returncode == 2 and "is not up" in again.stderr


def test_restart_keeps_data(lab: LabHandle) -> None:
    f = lab.mountpoint("vm01", "disk1") / "payload.bin"
    data = os.urandom(1 << 20)
    f.write_bytes(data)
    (lab.mountpoint("vm02", "disk0") / "note.txt").write_text("still here")
    teardown.stop(lab.defn.name)
    assert not loop.loops_under(lab.names.dir), "stop must detach (as a power-off would)"
    assert not dm.devices_with_prefix(lab.names.dm_prefixes[0])
    substrate.up(lab.defn, start_guests=False)
    assert f.read_bytes() == data
    assert (lab.mountpoint("vm02", "disk0") / "note.txt").read_text() == "still here"


def test_up_when_up_is_refused(lab: LabHandle) -> None:
    before = inventory.of(lab.defn.name).describe()
    with pytest.raises(BadInput, match="already up"):
        substrate.up(lab.defn, start_guests=False)
    assert inventory.of(lab.defn.name).describe() == before


def test_failed_up_rolls_back(hvlab_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    requires("dm-thin")
    defn = definition.parse(TEST_LAB, name="rollback")

    def boom(*_: Any, **__: Any) -> None:
        raise RuntimeError("injected mount failure")

    calls = {"n": 0}
    real_mount = fs.mount

    def mount_then_fail(*a: Any, **k: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            boom()
        real_mount(*a, **k)

    monkeypatch.setattr(fs, "mount", mount_then_fail)
    with pytest.raises(RuntimeError, match="injected"):
        substrate.up(defn, start_guests=False)
    assert_nothing_left("rollback")
    assert not Names("rollback").dir.exists()


def test_kill_during_up_then_down_leaves_nothing(hvlab_home: Path) -> None:
    requires("dm-thin")
    name = "killed"
    proc = subprocess.Popen([sys.executable, "-m", "hvlab.cli", "up", "-n", name,
                             "--no-guests"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=os.environ)
    names = Names(name)
    deadline = time.monotonic() + 60
    # Kill it in the middle: once LVM has made devices but before it is done.
    while time.monotonic() < deadline and proc.poll() is None:
        if dm.devices_with_prefix(names.dm_prefixes[0]):
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not inventory.of(name).empty(), "the kill came too late to test anything"
    res = hvlab("up", "-n", name, "--no-guests")
    assert res.returncode == 2 and "hvlab down" in res.stderr
    hvlab("down", "-n", name, check=True)
    assert_nothing_left(name)


@pytest.mark.parametrize(("args", "message"), [
    (["up", "-n", "Bad_Name"], "invalid lab name"),
    (["up", "-n", "ok1", "--backing-size", "1M"], "out of range"),
    (["up", "-n", "ok1", "--backing-size", "huge"], "invalid size"),
    (["down", "-n", "nosuchlab"], "is not up"),
])
def test_bad_cli_input(hvlab_home: Path, args: list[str], message: str) -> None:
    res = hvlab(*args)
    assert res.returncode == 2
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert "Traceback" not in res.stderr
    assert not (hvlab_home / "ok1").exists()


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: d["vm"].append(copy.deepcopy(d["vm"][0])), "duplicate VM name"),
    (lambda d: d["vm"][0]["disk"][0].update(size="2G"), "beyond the backing size"),
    (lambda d: d["vm"][1]["disk"][0].update(size="1K"), "below the ext4 minimum"),
])
def test_bad_lab_file(hvlab_home: Path, tmp_path: Path, mutate: Any, message: str) -> None:
    d = copy.deepcopy(TEST_LAB)
    d["lab"]["name"] = "badfile"
    mutate(d)
    lab_file = tmp_path / "lab.toml"
    lab_file.write_text(_toml(d))
    res = hvlab("up", "--lab", str(lab_file))
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert not (hvlab_home / "badfile").exists()
    assert not loop.loops_under(hvlab_home)


def _toml(d: dict[str, Any]) -> str:
    lines = ["[lab]"] + [f"{k} = {json.dumps(v)}" for k, v in d["lab"].items()]
    for v in d["vm"]:
        lines += ["[[vm]]", f'name = "{v["name"]}"', f'profile = "{v["profile"]}"']
        for disk in v["disk"]:
            lines += ["[[vm.disk]]"] + [f"{k} = {json.dumps(x)}" for k, x in disk.items()]
    return "\n".join(lines) + "\n"


def test_two_labs_side_by_side(lab_factory: Callable[..., LabHandle]) -> None:
    a = lab_factory(name="laba")
    b = lab_factory(name="labb")
    (a.mountpoint("vm01", "disk0") / "a.txt").write_text("A")
    (b.mountpoint("vm01", "disk0") / "b.txt").write_text("B")
    # Each lab's LVM sees only its own VG.
    assert [v["vg_name"] for v in a.names.lvm().vgs()] == [a.names.vg]
    assert [v["vg_name"] for v in b.names.lvm().vgs()] == [b.names.vg]
    teardown.down("labb")
    assert_nothing_left("labb")
    assert (a.mountpoint("vm01", "disk0") / "a.txt").read_text() == "A"
    assert len(inventory.of("laba").dm_devices) >= 3


def test_down_never_touches_what_is_not_ours(lab: LabHandle, tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.img"
    foreign.write_bytes(b"\0" * (4 << 20))
    dev = loop.attach(foreign)
    try:
        teardown.down(lab.defn.name)
        assert any(lo.name == dev for lo in loop.list_loops())
    finally:
        loop.detach(dev)


def test_down_leaves_devices_that_only_look_like_ours(lab_factory: Callable[..., LabHandle]
                                                      ) -> None:
    """Issue 9, measured failure 6: `down` of lab "hvlab" removed dm devices named
    hvlab_hvlab_foreign and hvlab_hvlab-foreign2 that hvlab never made. Ownership is by uuid
    (ours: HVLAB-<lab>-; LVM's: LVM- and only the lab's own loops below), not by name."""
    h = lab_factory(name="hvlab")
    foreign = {"hvlab_hvlab_foreign": "", "hvlab_hvlab-foreign2": "LVM-notreallyours",
               "hvlab_hvlab_foreign3": "HVLAB-other-ctl-x"}
    for name, uuid in foreign.items():
        run(["dmsetup", "create", name, "--noudevsync", *(["-u", uuid] if uuid else []),
             "--table", "0 8 error"])
    try:
        assert not {d.name for d in inventory.of("hvlab").dm_devices} & set(foreign)
        assert h.names.pv(0) in {d.name for d in inventory.of("hvlab").dm_devices}
        # --purge whose backups folder is a file: refused before anything is removed
        h.names.backups_dir.parent.mkdir(parents=True, exist_ok=True)
        h.names.backups_dir.write_text("not a folder\n")
        with pytest.raises(BadInput, match="is not a folder"):
            teardown.down("hvlab", purge=True)
        assert inventory.is_up("hvlab")
        h.names.backups_dir.unlink()
        teardown.down("hvlab", purge=True)  # no backups at all: nothing to purge, fine
        assert set(foreign) <= {d.name for d in dm.list_devices()}
    finally:
        for name in foreign:
            dm.remove(name)
    assert_nothing_left("hvlab")


def test_crash_recovery_by_discovery_without_state_file(lab_factory: Callable[..., LabHandle]
                                                       ) -> None:
    lab = lab_factory(name="nostate")
    lab.names.state_file.unlink()  # as if the state file was lost
    res = hvlab("up", "-n", "nostate", "--no-guests")
    assert res.returncode == 2 and "hvlab down" in res.stderr
    teardown.down("nostate")
    assert_nothing_left("nostate")


def test_down_resumes_a_controller_left_suspended(lab_with_guests: LabHandle) -> None:
    """As a backup killed inside step 5 leaves it: the guest's writes hang on the suspended
    controller until `down` resumes it; down then removes everything."""
    h = lab_with_guests
    ctl = h.names.ctl("vm01", "disk0")
    run(["dmsetup", "suspend", "--nolockfs", "--noudevsync", ctl])
    assert next(d for d in dm.list_devices() if d.name == ctl).suspended
    teardown.down(h.defn.name)
    assert_nothing_left(h.defn.name)


@pytest.mark.parametrize("garbage", ['{"truncated', '{"phase": "up"}', "[]"])
def test_corrupt_state_file_then_down(lab_factory: Callable[..., LabHandle],
                                      garbage: str) -> None:
    """An unreadable state file is a one-line error that names `hvlab down`, and that down
    works: it finds everything by prefix and path."""
    lab = lab_factory(name="corrupt")
    lab.names.state_file.write_text(garbage)
    res = hvlab("up", "-n", "corrupt", "--no-guests")
    assert res.returncode != 0 and "hvlab down" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    res = hvlab("down", "-n", "corrupt")
    assert res.returncode == 0, res.stderr
    assert_nothing_left("corrupt")


def test_down_after_the_lab_directory_was_deleted(lab_factory: Callable[..., LabHandle]
                                                  ) -> None:
    """Loops on deleted backing files are still the lab's (by path): down finds and detaches
    them, and does not claim 'nothing left' while they exist."""
    lab = lab_factory(name="nodir")
    for m in sorted(fs.mounts_under(lab.names.dir), key=lambda m: -len(m.target)):
        fs.umount(Path(m.target))
    for d in dm.devices_with_prefix(f"{lab.names.vg}_ctl_"):  # controllers sit on the LVs
        dm.remove(d.name)
    teardown.deactivate(lab.names)  # what a host shutdown leaves: loops, no LVs
    teardown.remove_dm(lab.names)
    shutil.rmtree(lab.names.dir)
    assert inventory.of("nodir").loops, "loops on deleted files not seen as the lab's"
    res = hvlab("down", "-n", "nodir")
    assert res.returncode == 0, res.stderr
    assert_nothing_left("nodir")
