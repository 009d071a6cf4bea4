"""The guest's channel and state machine, in-process on plain directories, fsfreeze faked."""

from __future__ import annotations

import socket
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from hvlab.guest import ledger
from hvlab.guest.client import GuestClient, GuestError, GuestUnavailable
from hvlab.guest.emulator import Guest, GuestConfig
from hvlab.guest.protocol import Server
from hvlab.guest.quiesce import FreezeError


class FakeFreezer:
    def __init__(self) -> None:
        self.frozen: list[str] = []
        self.calls: list[tuple[str, list[str]]] = []
        self.fail = False

    def freeze(self, mountpoints: Sequence[Path]) -> list[str]:
        self.calls.append(("freeze", [str(m) for m in mountpoints]))
        if self.fail:
            raise FreezeError("freeze of x failed: injected")
        self.frozen = [str(m) for m in mountpoints]
        return self.frozen

    def thaw(self, mountpoints: Sequence[Path]) -> list[str]:
        self.calls.append(("thaw", [str(m) for m in mountpoints]))
        done, self.frozen = self.frozen, []
        return done


class Running:
    def __init__(self, guest: Guest, client: GuestClient, freezer: FakeFreezer) -> None:
        self.guest, self.client, self.freezer = guest, client, freezer


def make_guest(profile: str = "windows", **extra: Any) -> Iterator[Running]:
    base = Path(tempfile.mkdtemp(prefix="hvg-", dir="/tmp"))
    disks = []
    for n in ("d0", "d1"):
        (base / n).mkdir()
        disks.append({"name": n, "mountpoint": str(base / n)})
    cfg = GuestConfig.from_dict(
        {
            "vm": "vm1",
            "profile": profile,
            "run_dir": str(base / "run"),
            "socket": str(base / "run" / "g.sock"),
            "disks": disks,
            "workload": {"ops_per_s": 200, "append_ops_per_s": 100, "scratch_ops_per_s": 50},
            **extra,
        }
    )
    cfg.run_dir.mkdir()
    freezer = FakeFreezer()
    guest = Guest(cfg, freezer)
    guest.start()
    assert cfg.socket is not None
    server = Server(cfg.socket, guest.handle)
    t = threading.Thread(
        target=server.serve, args=(guest.stop_event.is_set, guest.write_status, 0.2)
    )
    t.start()
    try:
        yield Running(guest, GuestClient(cfg.socket, timeout=10), freezer)
    finally:
        guest.stop_event.set()
        t.join(5)
        server.close()
        guest.shutdown()
        import shutil

        shutil.rmtree(base)


@pytest.fixture
def g() -> Iterator[Running]:
    yield from make_guest()


def wait_for(pred: Any, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.02)


def test_socket_is_private(g: Running) -> None:
    assert (g.client.socket_path.stat().st_mode & 0o777) == 0o600


def test_identify(g: Running) -> None:
    r = g.client.identify()
    assert r["ok"] and r["op"] == "identify" and isinstance(r["clock"], float)
    assert r["vm"] == "vm1" and r["profile"] == "windows" and r["auto_recovery"] is True
    assert [d["name"] for d in r["disks"]] == ["d0", "d1"]
    kinds = {w["name"]: w["vss_aware"] for w in r["writers"]}
    assert kinds == {"ledger": True, "scratch": True, "appender": False}


def test_freeze_holds_open_txn_and_thaw_commits_it(g: Running) -> None:
    wait_for(
        lambda: g.guest.ledger_writer is not None and g.guest.ledger_writer.ledger.last_txid > 3
    )
    g.client.prepare()
    fr = g.client.freeze(timeout_s=10)
    t0 = fr["t0"]["ledger"]
    assert fr["open_txid"] == t0["last_txid"] + 1
    assert g.freezer.frozen == [str(m) for m in g.guest.mounts]
    assert (g.guest.cfg.run_dir / "frozen").exists()
    # what is on disk at T0: committed up to last_txid, one txn open
    res = ledger.check(g.guest.roots)
    assert res.unfinished == fr["open_txid"]
    assert (res.last_txid, res.last_hash) == (t0["last_txid"], t0["last_hash"])
    time.sleep(0.2)
    assert g.guest.ledger_writer is not None
    assert g.guest.ledger_writer.ledger.last_txid == t0["last_txid"]  # held
    st = g.client.status()
    assert st["frozen"] is True and st["state"] == "frozen"
    th = g.client.thaw()
    assert th["timed_out"] is False and th["frozen_for_s"] >= 0
    assert not (g.guest.cfg.run_dir / "frozen").exists()
    wait_for(lambda: ledger.check(g.guest.roots).last_txid > fr["open_txid"])


def test_bad_inputs_keep_guest_running(g: Running) -> None:
    c = g.client
    assert c.raw(b"{not json")["code"] == "bad_json"
    assert c.raw(b"[1,2]")["code"] == "bad_request"
    assert c.raw(b'{"op": 5}')["code"] == "bad_request"
    r = c.raw(b'{"op": "explode"}')
    assert r["ok"] is False and r["code"] == "unknown_op" and "\n" not in r["error"]
    with pytest.raises(GuestError) as ei:
        c.thaw()
    assert ei.value.code == "bad_state"
    with pytest.raises(GuestError) as ei:
        c.request("freeze", timeout_s="soon")
    assert ei.value.code == "bad_args"
    with pytest.raises(GuestError) as ei:
        c.request("status", bogus=1)
    assert ei.value.code == "bad_args"
    c.freeze(timeout_s=10)
    with pytest.raises(GuestError) as ei:
        c.freeze(timeout_s=10)
    assert ei.value.code == "bad_state" and "already frozen" in str(ei.value)
    with pytest.raises(GuestError) as ei:
        c.post_snapshot({"d0": "/dev/loop0"})
    assert ei.value.code == "bad_state"
    c.thaw()
    with pytest.raises(GuestError) as ei:
        c.post_snapshot({"d0": "/dev/does-not-exist"})
    assert ei.value.code == "bad_args"
    with pytest.raises(GuestError) as ei:
        c.post_snapshot({"nodisk": "/dev/null"})
    assert ei.value.code == "bad_args"
    with pytest.raises(GuestError) as ei:
        c.post_snapshot({"d0": "/dev/null"})  # a char device
    assert "not a block device" in str(ei.value)
    # still alive and still committing, data intact
    n = c.status()["committed_txid"]
    wait_for(lambda: c.status()["committed_txid"] > n)
    assert all(w["state"] == "running" for w in c.status()["writers"])


def test_second_client_is_refused_first_keeps_working(g: Running) -> None:
    first = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    first.settimeout(5)
    first.connect(str(g.client.socket_path))
    first.sendall(b'{"op":"identify","id":1}\n')
    assert b'"ok":true' in first.makefile("rb").readline()
    second = GuestClient(g.client.socket_path, timeout=5).raw(b'{"op":"status"}')
    assert second["ok"] is False and second["code"] == "busy"
    first.sendall(b'{"op":"status","id":2}\n')
    line = first.makefile("rb").readline()
    assert b'"ok":true' in line and b'"id":2' in line
    first.close()
    wait_for(lambda: g.guest.stop_event.is_set() or _ok(g.client))


def _ok(c: GuestClient) -> bool:
    try:
        return bool(c.status()["ok"])
    except GuestError:
        return False


def test_watchdog_thaws_and_reports_timeout(g: Running) -> None:
    g.client.freeze(timeout_s=0.3)
    wait_for(lambda: g.guest.state != "frozen" and g.client.status()["timed_out"], timeout=5)
    assert g.freezer.frozen == []
    st = g.client.status()
    assert st["timed_out"] is True and st["timeout"]["error_code"] == "VSS_E_FLUSH_WRITES_TIMEOUT"
    th = g.client.thaw()
    assert th["timed_out"] is True and th["error_code"] == "VSS_E_FLUSH_WRITES_TIMEOUT"
    with pytest.raises(GuestError):
        g.client.thaw()


def test_freeze_failure_thaws_writers(g: Running) -> None:
    g.freezer.fail = True
    with pytest.raises(GuestError) as ei:
        g.client.freeze()
    assert "freeze failed" in str(ei.value)
    assert not (g.guest.cfg.run_dir / "frozen").exists()
    assert all(w["state"] == "running" for w in g.client.status()["writers"])
    g.freezer.fail = False
    g.client.freeze()
    r = g.client.abort()
    assert r["thawed"] is True


def test_workload_pause_resume(g: Running) -> None:
    g.client.workload(pause=True)
    wait_for(lambda: all(w["state"] == "paused" for w in g.client.status()["writers"]))
    time.sleep(0.2)  # an op already under way when pause arrived still completes
    n = g.client.status()["committed_txid"]
    time.sleep(0.2)
    assert g.client.status()["committed_txid"] == n
    g.client.workload(pause=False, ops_per_s=50)
    wait_for(lambda: g.client.status()["committed_txid"] > n)
    with pytest.raises(GuestError):
        g.client.workload(writer="nope")


def test_linux_profile_has_no_auto_recovery() -> None:
    for r in make_guest("linux"):
        ident = r.client.identify()
        assert ident["auto_recovery"] is False
        assert not any(w["vss_aware"] for w in ident["writers"])
        fr = r.client.freeze()
        assert fr["t0"] == {} and fr["open_txid"] is None
        r.client.thaw()
        ps = r.client.post_snapshot({"d0": "/dev/loop0"}) if Path("/dev/loop0").exists() else None
        if ps is not None:
            assert ps["auto_recovery"] is False


def test_unavailable_when_no_socket(tmp_path: Path) -> None:
    with pytest.raises(GuestUnavailable):
        GuestClient(tmp_path / "nope.sock", timeout=1).identify()
