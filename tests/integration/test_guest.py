"""The guest emulator on real loop devices with real fsfreeze (root, loop, ext4, xfs)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from guest_fixtures import Disk, LoopLab, looplab, write_in_thread

from hvlab.guest import ledger
from hvlab.guest.client import GuestClient, GuestError, GuestUnavailable
from hvlab.guest.quiesce import recover_after_crash
from hvlab.guest.supervise import guest_status, start_guest, stop_guest
from hvlab_fixtures.plugin import requires, wait_for

pytestmark = pytest.mark.integration
__all__ = ["looplab"]  # the fixture, imported for pytest



@pytest.fixture(autouse=True)
def _needs_root() -> None:
    requires("root", "loop")  # in CI a missing capability fails instead of skipping


@dataclass
class VM:
    lab: LoopLab
    disks: list[Disk]
    run_dir: Path
    config: dict[str, Any]
    client: GuestClient
    pid: int

    @property
    def roots(self) -> dict[str, Path]:
        return {d.name: d.mountpoint for d in self.disks}


def boot(
    lab: LoopLab,
    profile: str = "windows",
    channel: dict[str, Any] | None = None,
    **workload: Any,
) -> VM:
    disks = [lab.disk("d0", "ext4", 64), lab.disk("d1", "xfs", 320)]
    run_dir = lab.base / "run"
    cfg = {
        "vm": "vm1",
        "profile": profile,
        "socket": str(run_dir / "is.sock"),
        "run_dir": str(run_dir),
        "disks": [{"name": d.name, "mountpoint": str(d.mountpoint)} for d in disks],
        "workload": {"ops_per_s": 50, "append_ops_per_s": 50, "scratch_ops_per_s": 20, **workload},
        "seed": 7,
        **({"channel": channel} if channel else {}),
    }
    pid = start_guest(cfg)
    return VM(lab, disks, run_dir, cfg, GuestClient(run_dir / "is.sock", timeout=30), pid)


def shutdown(vm: VM) -> None:
    stop_guest(vm.run_dir)
    assert not psutil.pid_exists(vm.pid) or psutil.Process(vm.pid).status() == "zombie"
    assert not guest_status(vm.run_dir)["alive"]


@pytest.fixture
def vm_factory(looplab: LoopLab) -> Iterator[Callable[..., VM]]:
    made: list[VM] = []

    def make(
        profile: str = "windows", channel: dict[str, Any] | None = None, **workload: Any
    ) -> VM:
        v = boot(looplab, profile, channel, **workload)
        made.append(v)
        return v

    yield make
    for v in made:
        shutdown(v)


@pytest.fixture
def vm(vm_factory: Callable[..., VM]) -> VM:
    v = vm_factory()
    wait_for(lambda: v.client.status()["committed_txid"] >= 5)
    return v



def snapshot_images(vm: VM, tag: str) -> dict[str, Path]:
    """Copy every disk block-for-block (call while frozen: this is B at T0)."""
    return {d.name: vm.lab.copy(d.loop, vm.lab.base / f"{tag}-{d.name}.img") for d in vm.disks}


def mount_ro(vm: VM, images: dict[str, Path], tag: str) -> dict[str, Path]:
    return {
        d.name: vm.lab.mount_image_ro(images[d.name], d.fstype, vm.lab.base / tag / d.name)
        for d in vm.disks
    }


def scratch_files(roots: dict[str, Path]) -> list[Path]:
    return [f for r in roots.values() for f in (r / "scratch").glob("*.tmp")]


def umount_all(vm: VM, roots: dict[str, Path]) -> None:
    for mnt in roots.values():
        vm.lab.umount(mnt)
    for dev in list(vm.lab.loops):
        if dev not in {d.loop for d in vm.disks}:
            vm.lab.detach(dev)


def test_identify_and_status(vm: VM) -> None:
    ident = vm.client.identify()
    assert ident["auto_recovery"] is True and ident["pid"] == vm.pid
    st = guest_status(vm.run_dir)
    assert st["alive"] and st["pid"] == vm.pid
    wait_for(lambda: (guest_status(vm.run_dir)["status"] or {}).get("committed_txid", 0) > 0)
    assert (vm.client.socket_path.stat().st_mode & 0o777) == 0o600
    assert start_guest(vm.config) == vm.pid  # idempotent


def test_write_while_frozen_blocks_until_thaw(vm: VM) -> None:
    fr = vm.client.freeze(timeout_s=30)
    marker = (vm.run_dir / "frozen").read_text()
    assert all(str(d.mountpoint) in marker for d in vm.disks)
    seq = vm.client.status()["writers"][-1]["seq"]
    t = write_in_thread(vm.disks[0].mountpoint / "probe.txt", b"written while frozen\n")
    t.join(1.0)
    assert t.is_alive(), "a write to a frozen filesystem must block"
    assert vm.client.status()["writers"][-1]["seq"] <= seq + 1  # the appender is stuck too
    th = vm.client.thaw()
    assert th["timed_out"] is False and th["thawed_at"] >= fr["frozen_at"]
    t.join(20)
    assert not t.is_alive()
    assert (vm.disks[0].mountpoint / "probe.txt").read_bytes() == b"written while frozen\n"
    assert not (vm.run_dir / "frozen").exists()
    wait_for(lambda: vm.client.status()["writers"][-1]["seq"] > seq + 1)


def test_watchdog_thaws_after_timeout(vm: VM) -> None:
    vm.client.freeze(timeout_s=1)
    t = write_in_thread(vm.disks[1].mountpoint / "probe.txt", b"written while frozen\n")
    t.join(20)  # never sent thaw: the guest's own watchdog must release the write
    assert not t.is_alive()
    wait_for(lambda: vm.client.status()["timed_out"])
    st = vm.client.status()
    assert st["frozen"] is False and st["timed_out"] is True
    assert st["timeout"]["error_code"] == "VSS_E_FLUSH_WRITES_TIMEOUT"
    th = vm.client.thaw()
    assert th["timed_out"] is True and th["frozen_for_s"] < 15
    assert not (vm.run_dir / "frozen").exists()


def test_checker_accepts_quiesced_image_and_rejects_torn_one(
    vm_factory: Callable[..., VM],
) -> None:
    vm = vm_factory(hold_open_txn=False)
    wait_for(lambda: vm.client.status()["committed_txid"] >= 5)
    fr = vm.client.freeze(timeout_s=30)
    images = snapshot_images(vm, "t0")
    vm.client.thaw()
    t0 = fr["t0"]["ledger"]
    assert fr["open_txid"] is None
    roots = mount_ro(vm, images, "ro")
    res = ledger.check(roots)
    assert res.consistent, res.problems
    assert (res.last_txid, res.last_hash) == (t0["last_txid"], t0["last_hash"])
    umount_all(vm, roots)
    # tear page 1 of the copy: half new bytes, half old
    dev = vm.lab.attach(images["d1"])
    mnt = vm.lab.mount(dev, vm.lab.base / "rw" / "d1", "nouuid")
    with open(mnt / "ledger" / "pages.db", "r+b") as f:
        f.seek(ledger.PAGE_SIZE + ledger.PAGE_SIZE // 2)
        f.write(os.urandom(ledger.PAGE_SIZE // 2))
    vm.lab.umount(mnt)
    vm.lab.detach(dev)
    roots = mount_ro(vm, images, "torn")
    res = ledger.check(roots)
    assert not res.consistent
    assert any("page 1" in p and "torn" in p for p in res.problems), res.problems
    umount_all(vm, roots)


def test_auto_recovery_repairs_unfinished_txn(vm: VM) -> None:
    fr = vm.client.freeze(timeout_s=30)
    images = snapshot_images(vm, "b")
    vm.client.thaw()
    t0, open_txid = fr["t0"]["ledger"], fr["open_txid"]
    assert open_txid == t0["last_txid"] + 1
    # B at T0: committed up to t0, one transaction open -> not consistent until recovered
    roots = mount_ro(vm, images, "raw")
    raw = ledger.check(roots)
    assert raw.unfinished == open_txid and not raw.consistent
    assert (raw.last_txid, raw.last_hash) == (t0["last_txid"], t0["last_hash"])
    assert scratch_files(roots)
    umount_all(vm, roots)
    # A: a writable fork of B handed to the guest
    devs = {d.name: vm.lab.attach(images[d.name]) for d in vm.disks}
    rep = vm.client.post_snapshot(devs)
    assert rep["auto_recovery"] is True
    assert rep["repaired"]["rolled_back"] == open_txid and rep["repaired"]["removed"]
    assert rep["check"]["consistent"] is True
    for dev in devs.values():
        vm.lab.detach(dev)
    roots = mount_ro(vm, images, "fixed")
    fixed = ledger.check(roots)
    assert fixed.consistent, fixed.problems
    assert (fixed.last_txid, fixed.last_hash) == (t0["last_txid"], t0["last_hash"])
    assert not scratch_files(roots)
    umount_all(vm, roots)
    # the fix-ups never reach the live disks: scratch files stay, the held txn was committed
    assert scratch_files(vm.roots)
    wait_for(lambda: vm.client.status()["committed_txid"] > open_txid)


def test_kill9_while_frozen_is_recovered(vm: VM) -> None:
    vm.client.freeze(timeout_s=60)
    os.kill(vm.pid, signal.SIGKILL)
    wait_for(lambda: not guest_status(vm.run_dir)["alive"])
    assert guest_status(vm.run_dir)["frozen_marker"]
    t = write_in_thread(vm.disks[0].mountpoint / "after-crash.txt", b"written while frozen\n")
    t.join(0.5)
    assert t.is_alive(), "still frozen: nobody thawed"
    done = recover_after_crash(vm.run_dir)
    assert sorted(done["thawed"]) == sorted(str(d.mountpoint) for d in vm.disks)
    t.join(20)
    assert not t.is_alive()
    assert recover_after_crash(vm.run_dir) == {"marker": False, "thawed": []}
    res = stop_guest(vm.run_dir)
    assert res["was_running"] is False
    with pytest.raises(GuestUnavailable):
        vm.client.status()


def test_guest_start_after_kill9_while_frozen_thaws_first(vm: VM) -> None:
    """`hvlab guest start` (and `up`) is a next command too: it thaws before the new guest."""
    vm.client.freeze(timeout_s=60)
    os.kill(vm.pid, signal.SIGKILL)
    wait_for(lambda: not guest_status(vm.run_dir)["alive"])
    t = write_in_thread(vm.disks[0].mountpoint / "after-restart.txt", b"written while frozen\n")
    t.join(0.5)
    assert t.is_alive(), "still frozen: nobody thawed"
    pid = start_guest(vm.config)
    t.join(20)
    assert not t.is_alive()
    assert not guest_status(vm.run_dir)["frozen_marker"]
    assert vm.client.status()["frozen"] is False
    assert pid != vm.pid
    stop_guest(vm.run_dir)


def test_bad_channel_input(vm: VM) -> None:
    c = vm.client
    assert c.raw(b"{{{ not json")["code"] == "bad_json"
    assert c.raw(b'{"op": "format_c"}')["code"] == "unknown_op"
    with pytest.raises(GuestError, match="thaw without freeze"):
        c.thaw()
    c.freeze(timeout_s=30)
    with pytest.raises(GuestError, match="already frozen"):
        c.freeze(timeout_s=30)
    # a second client while the first holds its connection open: both are served
    first = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    first.settimeout(10)
    first.connect(str(c.socket_path))
    first.sendall(b'{"op":"status"}\n')
    assert b'"frozen":true' in first.makefile("rb").readline()
    with pytest.raises(GuestError, match="post_snapshot while frozen"):
        c.post_snapshot({"d0": "/dev/hvlab-no-such-device"})
    c.thaw()  # from another connection than the freeze's
    first.sendall(b'{"op":"status"}\n')
    assert b'"frozen":false' in first.makefile("rb").readline()
    first.close()
    with pytest.raises(GuestError, match="no such device"):
        c.post_snapshot({"d0": "/dev/hvlab-no-such-device"})
    n = c.status()["committed_txid"]
    wait_for(lambda: c.status()["committed_txid"] > n + 3)
    st = c.status()
    assert all(w["state"] == "running" and not w["error"] for w in st["writers"])
    stop_guest(vm.run_dir)
    res = ledger.check(vm.roots)  # clean stop: the live store is consistent
    assert res.consistent, res.problems
    assert res.last_txid >= n + 3


def test_profile_none_has_no_channel(vm_factory: Callable[..., VM]) -> None:
    vm = vm_factory("none")
    assert not vm.client.socket_path.exists()
    with pytest.raises(GuestUnavailable):
        vm.client.identify()
    st = guest_status(vm.run_dir)
    assert st["alive"] and st["status"]["profile"] == "none"


def test_profile_linux_freezes_without_auto_recovery(vm_factory: Callable[..., VM]) -> None:
    vm = vm_factory("linux")
    ident = vm.client.identify()
    assert ident["auto_recovery"] is False
    fr = vm.client.freeze(timeout_s=30)
    assert fr["open_txid"] is None
    vm.client.thaw()
    rep = vm.client.post_snapshot({"d0": vm.disks[0].loop})
    assert rep["auto_recovery"] is False and rep["repaired"] is None


def _guest_log(vm: VM) -> str:
    return (vm.run_dir / "guest.log").read_text(errors="replace")


def _raw_socket(vm: VM, timeout: float = 10.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(vm.client.socket_path))
    return s


def _replies(s: socket.socket, limit: int = 1000) -> list[dict[str, Any]]:
    """Every reply line until the guest closes the connection (or `limit` lines)."""
    out: list[dict[str, Any]] = []
    f = s.makefile("rb")
    try:
        while len(out) < limit and (line := f.readline()):
            assert line.endswith(b"\n"), line[:200]
            msg = json.loads(line)
            assert isinstance(msg, dict) and isinstance(msg.get("ok"), bool), msg
            if not msg["ok"]:
                assert isinstance(msg["error"], str) and "\n" not in msg["error"], msg
            out.append(msg)
    except ConnectionResetError:
        pass  # we sent more than the guest read before it closed: its replies came first
    return out


def test_idle_client_does_not_block_backup_ops(vm_factory: Callable[..., VM]) -> None:
    """Issue 9 item 4: a connection held open used to make every other client 'busy'."""
    vm = vm_factory(channel={"idle_timeout_s": 4})
    wait_for(lambda: vm.client.status()["committed_txid"] >= 5)
    idle = _raw_socket(vm)  # connected, sends nothing
    half = _raw_socket(vm)
    half.sendall(b'{"op":"freeze","args":{"timeo')  # half a request, never finished
    t_idle = time.monotonic()
    c = vm.client  # as the backup flow: one connection per request
    assert c.identify()["pid"] == vm.pid
    assert c.status()["state"] == "idle"
    c.prepare()
    fr = c.freeze(timeout_s=30)
    assert c.status()["frozen"] is True
    t = write_in_thread(vm.disks[0].mountpoint / "probe.txt", b"written while frozen\n")
    t.join(0.5)
    assert t.is_alive(), "the freeze is real"
    with pytest.raises(GuestError, match="already frozen"):
        GuestClient(c.socket_path).freeze(timeout_s=30)
    th = GuestClient(c.socket_path).thaw()
    assert th["timed_out"] is False and th["thawed_at"] >= fr["frozen_at"]
    t.join(20)
    assert not t.is_alive()
    # auto-recovery is refused a device that is mounted (the live disk), whoever asks
    with pytest.raises(GuestError, match="is mounted") as ei:
        c.post_snapshot({"d0": vm.disks[0].loop})
    assert ei.value.code == "bad_args"
    rep = c.workload(pause=False, ops_per_s=60)
    assert {w["name"] for w in rep["writers"]} == {"ledger", "scratch", "appender"}
    # the idle connections are closed by the guest, each with a one-line reason
    for s in (idle, half):
        got = _replies(s)
        assert [r["code"] for r in got] == ["idle"], got
        s.close()
    assert 3.5 < time.monotonic() - t_idle < 15
    n = c.status()["committed_txid"]
    wait_for(lambda: c.status()["committed_txid"] > n + 3)
    assert "Traceback" not in _guest_log(vm)


def test_concurrent_freezes_on_real_filesystems(vm: VM) -> None:
    n = 8
    gate = threading.Barrier(n)
    results: list[dict[str, Any]] = []

    def one() -> None:
        gate.wait()
        results.append(
            GuestClient(vm.client.socket_path).raw(b'{"op":"freeze","args":{"timeout_s":30}}')
        )

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    won = [r for r in results if r["ok"]]
    assert len(results) == n and len(won) == 1, results
    assert all(r["code"] in ("busy", "bad_state") for r in results if not r["ok"])
    st = vm.client.status()
    assert st["frozen"] is True and st["frozen_at"] == won[0]["frozen_at"]
    vm.client.thaw()  # a connection other than the winner's
    with pytest.raises(GuestError, match="thaw without freeze"):
        vm.client.thaw()
    assert not (vm.run_dir / "frozen").exists()
    n0 = vm.client.status()["committed_txid"]
    wait_for(lambda: vm.client.status()["committed_txid"] > n0)


def test_hostile_lines_do_not_kill_or_derail_the_guest(vm: VM) -> None:
    """Measured before the fix: a 60 KB nested JSON line killed the guest (RecursionError out
    of its server loop), and ops_per_s NaN was accepted (writers' target rate NaN)."""
    c = vm.client
    assert c.raw(b"[" * 30_000 + b"]" * 30_000)["code"] == "bad_json"
    assert c.raw(b'{"op":"workload","args":{"ops_per_s":NaN}}')["code"] == "bad_json"
    assert c.raw(b'{"op":"workload","args":{"ops_per_s":1e999}}')["code"] == "bad_args"
    assert c.raw(b'{"op":"status","id":' + b"[" * 500 + b"]" * 500 + b"}")["code"] == (
        "bad_request"
    )
    st = c.status()
    assert st["pid"] == vm.pid and guest_status(vm.run_dir)["alive"]
    assert [w["target_ops_per_s"] for w in st["writers"]] == [50, 20, 50]
    n = st["committed_txid"]
    wait_for(lambda: c.status()["committed_txid"] > n + 3)
    assert "Traceback" not in _guest_log(vm)


JUNK: dict[str, bytes] = {
    "malformed": b"{{{ not json\n",
    "binary": bytes(range(256)).replace(b"\n", b"") + b"\n",
    "not_utf8": b'{"op":"status","x":"\xc3\x28"}\n',
    "nan": b'{"op":"freeze","args":{"timeout_s":NaN}}\n',
    "deep": b"[" * 30_000 + b"]" * 30_000 + b"\n",  # under the line limit
    "huge": b'{"op":"status","args":{"x":"' + b"A" * 200_000,  # over the line limit
    "array": b"[1,2,3]\n",
    "unknown": b'{"op":"format_c","args":{}}\n',
    "bad_args": b'{"op":"freeze","args":{"timeout_s":"soon"}}\n',
    "extra_arg": b'{"op":"status","args":{"bogus":1}}\n',
    "bad_rate": b'{"op":"workload","args":{"ops_per_s":-1}}\n',
    "bad_pause": b'{"op":"workload","args":{"pause":"yes"}}\n',
    "thaw_args": b'{"op":"thaw","args":{"now":true}}\n',
    "bad_devices": b'{"op":"post_snapshot","args":{"devices":["/dev/sda"]}}\n',
    "pipelined": b'{"op":"status"}\n' * 40,
    "partial": b'{"op":"sta',  # then hang up
    "hangup": b"",
}
JUNK_CODES = {"bad_json", "bad_request", "unknown_op", "bad_args", "bad_state", "too_long"}


def test_many_clients_sending_junk_while_the_ledger_commits(
    vm_factory: Callable[..., VM],
) -> None:
    """Issue 9: malformed, huge, binary, out-of-order and concurrent channel messages. Each
    gets one line (or a logged close); the guest keeps running and keeps committing."""
    vm = vm_factory(channel={"max_clients": 24, "idle_timeout_s": 2})
    wait_for(lambda: vm.client.status()["committed_txid"] >= 5)
    live = {"d0": vm.disks[0].loop, "d1": vm.disks[1].loop}
    junk = {
        **JUNK,
        # out of order whatever the state: the live disks are never auto-recovery images
        "post_snapshot_live": json.dumps(
            {"op": "post_snapshot", "args": {"devices": live}}
        ).encode() + b"\n",
    }
    stop = threading.Event()
    seen: dict[str, set[str]] = {k: set() for k in junk}
    failures: list[str] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        kinds = sorted(junk)
        k = i
        while not stop.is_set():
            kind = kinds[k % len(kinds)]
            k += 1
            try:
                s = _raw_socket(vm)
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    s.sendall(junk[kind])
                if kind in ("partial", "hangup"):
                    s.close()
                    continue
                got = _replies(s, limit=40 if kind == "pipelined" else 1)
                s.close()
                codes = {r["code"] if not r["ok"] else "ok" for r in got}
                with lock:
                    seen[kind] |= codes
            except Exception as exc:
                with lock:
                    failures.append(f"{kind}: {type(exc).__name__}: {exc}")

    def idler() -> None:  # holds connections without a word; the guest closes them
        while not stop.is_set():
            s = _raw_socket(vm)
            got = _replies(s)
            s.close()
            with lock:
                seen.setdefault("idle", set()).update(r["code"] for r in got)

    workers = [threading.Thread(target=client, args=(i,)) for i in range(14)]
    workers += [threading.Thread(target=idler) for _ in range(4)]
    start = vm.client.status()["committed_txid"]
    for t in workers:
        t.start()
    try:
        samples = []
        for _ in range(5):  # a backup's calls go through meanwhile, each on a new connection
            time.sleep(0.5)
            t0 = time.monotonic()
            assert vm.client.identify()["pid"] == vm.pid
            samples.append(vm.client.status()["committed_txid"])
            assert time.monotonic() - t0 < 5
        vm.client.prepare()
        vm.client.freeze(timeout_s=30)
        assert vm.client.status()["frozen"] is True
        vm.client.thaw()
        for _ in range(4):
            time.sleep(0.5)
            samples.append(vm.client.status()["committed_txid"])
    finally:
        stop.set()
        for t in workers:
            t.join(30)
    assert not failures, failures[:5]
    assert samples == sorted(samples) and samples[-1] > start + 10, (start, samples)
    assert seen["pipelined"] == {"ok"}
    assert seen["huge"] == {"too_long"}
    assert seen["idle"] == {"idle"}
    for kind in set(junk) - {"pipelined", "huge", "partial", "hangup"}:
        assert seen[kind] and seen[kind] <= JUNK_CODES, (kind, seen[kind])
    # the connection cap: one more than allowed is refused in one line, then freed
    wait_for(lambda: vm.client.status()["clients"] == 1)  # only the asking one is left
    held = [_raw_socket(vm) for _ in range(24)]
    for s in held:
        s.sendall(b'{"op":"status"}\n')
        assert _replies(s, limit=1)[0]["ok"] is True
    refused = GuestClient(vm.client.socket_path).raw(b'{"op":"status"}')
    assert refused["ok"] is False and refused["code"] == "full"
    for s in held:
        s.close()
    wait_for(lambda: GuestClient(vm.client.socket_path).raw(b'{"op":"status"}')["ok"])
    # still the same guest, all writers healthy, nothing but one-liners in its log
    st = vm.client.status()
    assert st["pid"] == vm.pid and st["state"] == "thawed"
    assert all(w["state"] == "running" and not w["error"] for w in st["writers"])
    log_text = _guest_log(vm)
    assert "Traceback" not in log_text and " ERROR " not in log_text
    assert "longer than" in log_text and "no complete request" in log_text
    n = st["committed_txid"]
    wait_for(lambda: vm.client.status()["committed_txid"] > n + 3)
    stop_guest(vm.run_dir)
    res = ledger.check(vm.roots)
    assert res.consistent, res.problems
    assert res.last_txid > n + 3
