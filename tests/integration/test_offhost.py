"""Off-host mode (issue 11): step 13 exports the snapshot set over NBD (nbdkit, read-only) on
a veth pair between two namespaces of the lab's; the proxy reads the mapped ranges with
libnbd. Only the lab's link-local address listens; nothing of the link outlives step 13, a
killed read included, once the next command has recovered the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from hvlab.backup import manifest
from hvlab.backup import restore as rst
from hvlab.flow import engine, faults, recover
from hvlab.lab import links, runs
from hvlab.sys import netns
from hvlab_fixtures.plugin import LabHandle, one_vm_lab, requires
from hvlab_fixtures.waits import at_fault_point, wait_for

pytestmark = pytest.mark.integration

TWO_DISKS = one_vm_lab(2)


def _listening(pid: int) -> list[tuple[str, int]]:
    """TCP sockets listening in the network namespace of process pid (its /proc/PID/net)."""
    out = []
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if state == "0A":
            addr, port = local.split(":")
            out.append((".".join(str(int(addr[i:i + 2], 16)) for i in (6, 4, 2, 0)),
                        int(port, 16)))
    six = Path(f"/proc/{pid}/net/tcp6")
    if six.exists():
        out += [("ipv6", int(x.split()[1].split(":")[1], 16))
                for x in six.read_text().splitlines()[1:] if x.split()[3] == "0A"]
    return out


def test_off_host_backup_over_nbd_restores_and_verifies(
        lab_factory: Callable[..., LabHandle], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    requires("off-host")
    h = lab_factory(TWO_DISKS, start_guests=True)
    pre = h.lv_names()
    for d in ("disk0", "disk1"):
        (h.mountpoint("vm01", d) / "data.bin").write_bytes(os.urandom(3 << 20))
    seen: dict[str, Any] = {}

    def look_while_reading(go: Path) -> None:
        (run_,) = runs.all_runs(h.names)
        ln = links.plan(h.names, run_.id)
        seen["owned"] = links.owned(h.names)
        seen["server"] = netns.pids_in(ln.lab.ns)
        seen["listening"] = [_listening(p) for p in seen["server"]]
        seen["root"] = _listening(os.getpid())
        seen["root_links"] = sorted(os.listdir("/sys/class/net"))
        seen["ln"] = ln

    with at_fault_point("s13-reading", look_while_reading, monkeypatch=monkeypatch,
                        tmp_path=tmp_path):
        done = engine.start(h.defn.name, ["vm01"], fingerprints=False, mode="off-host")
    assert done.state == "done"
    ln = seen["ln"]
    # While step 13 read: two namespaces of the lab's; nbdkit listened on the lab's
    # link-local address only, on NBD's port; nothing of it in this (the root) namespace.
    assert [x.split(" (")[0] for x in seen["owned"]] == [f"network namespace {ln.lab.ns}",
                                                        f"network namespace {ln.proxy.ns}"]
    assert seen["server"] and all(x == [(ln.lab.address, 10809)] for x in seen["listening"])
    assert ln.lab.address.startswith("169.254.") and ln.proxy.address.startswith("169.254.")
    assert not [p for _, p in seen["root"] if p == 10809]
    assert ln.lab.ifname not in seen["root_links"] and ln.proxy.ifname not in seen["root_links"]
    # Afterwards nothing of the link is left (the plugin's leak check says the same).
    assert links.owned(h.names) == [] and not links.plan(h.names, done.id).dir.exists()

    _, man = manifest.locate(h.names, done.id)
    link = man["link"]
    assert man["mode"] == "off-host" and link["proxy"]["address"] == ln.proxy.address
    assert link["server"]["address"] == ln.lab.address
    disks = man["vms"][0]["disks"]
    read = sum(d["bytes_read"] for d in disks)
    block = disks[0]["block_bytes"]
    # The proxy read only mapped extents: at most the mapped bytes plus a chunk per extent.
    assert link["nbd_bytes"] == read <= link["mapped_bytes"] + link["extents"] * block
    # ... and the server's own count (nbdkit's stats filter, MiB to 2 decimals) agrees.
    assert abs(link["server_read_bytes"] - read) <= 0.005 * 2**20
    assert h.lv_names() == pre  # the flow's invariant: the LV set it found
    assert link["mapped_bytes"] >= 6 << 20 and link["link_bytes"] >= link["nbd_bytes"]
    events = runs.events(h.names, done.id)
    step13 = next(e for e in events if e.step == 13)
    assert step13.detail["mode"] == "off-host" and step13.detail["link"]["nbd_bytes"] == read
    assert any(c.argv[:1] == ["nsenter"] and "nbdkit" in c.argv for c in step13.commands or [])
    assert rst.verify(h.defn.name, done.id)["ok"]


def _killed_off_host_read(h: LabHandle) -> str:
    argv = [sys.executable, "-m", "hvlab.cli", "backup", "vm01", "-n", h.defn.name,
            "--no-fingerprints", "--mode", "off-host", "--inject", "s13-reading:kill"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stdout + proc.stderr
    (run_,) = runs.all_runs(h.names)
    assert runs.effective_state(run_) == "interrupted"
    return run_.id


@pytest.mark.parametrize("then", ["recover", "resume"])
def test_killed_during_an_off_host_read(lab_factory: Callable[..., LabHandle],
                                        then: str) -> None:
    """SIGKILL half way through the read (the first chunk written): nbdkit and the proxy
    die with the backup; its namespaces stay until the next command. `recover` aborts the
    run and removes them; `--resume` removes them and reads again over a new link."""
    requires("off-host")
    h = lab_factory(TWO_DISKS, start_guests=True)
    pre = h.lv_names()
    run_id = _killed_off_host_read(h)
    ln = links.plan(h.names, run_id)
    left = links.owned(h.names)
    assert [x.split(" (")[0] for x in left] == [f"network namespace {ln.lab.ns}",
                                                f"network namespace {ln.proxy.ns}"]
    wait_for(lambda: not netns.pids_in(ln.lab.ns) and not netns.pids_in(ln.proxy.ns), 10,
             "nbdkit and the proxy ending with the killed backup")
    if then == "recover":
        rep = recover.recover(h.defn.name)
        assert any("off-host link" in x for x in runs.load(h.names, run_id).unwound or [])
        assert rep.done and runs.load(h.names, run_id).state == "aborted"
        assert h.lv_names() == pre
    else:
        done = engine.resume(h.defn.name, run_id, fingerprints=False)
        assert done.state == "done" and done.link and done.link["nbd_bytes"] > 0
        assert rst.verify(h.defn.name, run_id)["ok"]
    assert links.owned(h.names) == []
    assert not ln.dir.exists()


def test_a_read_that_fails_half_way_leaves_no_link(lab_factory: Callable[..., LabHandle],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The step fails while the proxy reads (the first chunk written): the proxy and nbdkit
    are stopped and the namespaces removed before the unwind, whose end is the LV set the
    run found."""
    requires("off-host")
    h = lab_factory(TWO_DISKS, start_guests=True)
    pre = h.lv_names()
    monkeypatch.setenv(faults.ENV, "s13-reading:raise")
    monkeypatch.setattr(faults, "_fired", set())
    with pytest.raises(engine.FlowFailed, match="s13-reading"):
        engine.start(h.defn.name, ["vm01"], fingerprints=False, mode="off-host")
    (failed,) = runs.all_runs(h.names)
    assert failed.state == "failed" and h.lv_names() == pre
    assert links.owned(h.names) == [] and not links.plan(h.names, failed.id).dir.exists()
    assert not [p for p in psutil.process_iter(["name"]) if p.info["name"] == "nbdkit"]


def test_mode_is_checked_before_anything_is_made(lab_factory: Callable[..., LabHandle]
                                                 ) -> None:
    h = lab_factory(TWO_DISKS)
    pre = h.lv_names()
    for args, msg in ((["--mode", "sideways"], "Invalid value for '--mode'"),
                      (["--resume", "r1", "--mode", "off-host"], "are fixed when a run starts"),
                      (["--abort", "r1", "--incremental"], "are fixed when a run starts")):
        argv = [sys.executable, "-m", "hvlab.cli", "backup", *(["vm01"] if args[0] == "--mode"
                                                            else []), "-n", h.defn.name, *args]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and msg in proc.stderr and "Traceback" not in proc.stderr
    assert h.lv_names() == pre and runs.all_runs(h.names) == []
    assert json.dumps(links.owned(h.names)) == "[]"
