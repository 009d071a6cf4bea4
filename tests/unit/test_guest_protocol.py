"""The guest's channel and state machine, in-process on plain directories, fsfreeze faked."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fake_guest import FakeFreezer, Running, g, make_guest

from hvlab.guest import ledger
from hvlab.guest.client import GuestClient, GuestError, GuestUnavailable
from hvlab.guest.emulator import Guest
from hvlab.guest.protocol import ProtocolError
from hvlab_fixtures.waits import wait_for

__all__ = ["g"]  # the fixture, imported for pytest


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
    assert g.guest.ledger_writer is not None
    # Ten transactions' time at the writer's rate: a writer that were not held would commit.
    time.sleep(10 / (g.guest.ledger_writer.ops_per_s or 10.0))
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


def test_idle_client_does_not_block_others(g: Running) -> None:
    idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    idle.settimeout(5)
    idle.connect(str(g.client.socket_path))  # connected, sends nothing
    half = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    half.connect(str(g.client.socket_path))
    half.sendall(b'{"op":"sta')  # half a request
    c = g.client  # a new connection per request, as the backup flow does
    assert c.identify()["vm"] == "vm1"
    assert c.status()["ok"]
    c.prepare()
    fr = c.freeze(timeout_s=10)
    st = GuestClient(c.socket_path).status()
    assert st["frozen"] is True and st["frozen_by"].startswith("c")
    th = GuestClient(c.socket_path).thaw()  # another connection than the freeze's
    assert th["timed_out"] is False and th["thawed_at"] >= fr["frozen_at"]
    assert c.workload(pause=False)["ok"]
    idle.sendall(b'{"op":"status","id":"late"}\n')  # the idle one is served as well
    line = idle.makefile("rb").readline()
    assert b'"ok":true' in line and b'"id":"late"' in line
    idle.close()
    half.close()


def test_concurrent_freezes_one_wins(g: Running) -> None:
    g.freezer.delay = 0.5
    n = 6
    gate = threading.Barrier(n)
    results: list[dict[str, Any]] = []

    def one() -> None:
        gate.wait()
        results.append(g.client.raw(b'{"op":"freeze","args":{"timeout_s":10}}'))

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == n
    won = [r for r in results if r["ok"]]
    lost = [r for r in results if not r["ok"]]
    assert len(won) == 1, results
    assert {r["code"] for r in lost} <= {"busy", "bad_state"}
    assert all("freeze" in r["error"] for r in lost)
    assert [c for c in g.freezer.calls if c[0] == "freeze"] == [("freeze", g.freezer.frozen)]
    g.client.thaw()
    with pytest.raises(GuestError) as ei:
        g.client.thaw()
    assert ei.value.code == "bad_state"


def test_status_answers_while_a_freeze_is_under_way(g: Running) -> None:
    g.freezer.delay = 2.0
    done: list[dict[str, Any]] = []
    t = threading.Thread(target=lambda: done.append(g.client.freeze(timeout_s=10)))
    t.start()
    wait_for(lambda: g.guest.busy == "freeze")
    t0 = time.monotonic()
    st = g.client.status()
    ident = g.client.identify()
    assert time.monotonic() - t0 < 1.0  # not behind the freeze
    assert st["busy"] == "freeze" and st["frozen"] is False and ident["ok"]
    # a thaw sent meanwhile waits for the freeze, then thaws it
    th = GuestClient(g.client.socket_path).thaw()
    t.join(10)
    assert done and done[0]["ok"] and th["timed_out"] is False
    assert g.client.status()["state"] == "thawed" and g.freezer.frozen == []


def test_out_of_order_and_wrong_types(g: Running) -> None:
    c = g.client

    def code(op: str, **args: Any) -> str:
        with pytest.raises(GuestError) as ei:
            c.request(op, **args)
        assert "\n" not in str(ei.value)
        return ei.value.code

    assert code("post_snapshot", devices={"d0": "/dev/null"}) == "bad_state"  # before freeze
    c.prepare()
    assert code("post_snapshot", devices={"d0": "/dev/null"}) == "bad_state"
    assert code("thaw") == "bad_state"
    bad: object
    for bad in ("10", True, [], {}, -1, 0, 61, 10**400):
        assert code("freeze", timeout_s=bad) == "bad_args", bad
    assert c.raw(b'{"op":"freeze","args":{"timeout":5}}')["code"] == "bad_args"
    assert code("identify", extra=1) == "bad_args"
    assert code("workload", pause="yes") == "bad_args"
    assert code("workload", writer=["ledger"]) == "bad_args"
    for rate in (0, -5, "fast", True, 1e6, 10**400):
        assert code("workload", ops_per_s=rate) == "bad_args", rate
    c.freeze(timeout_s=10)
    assert code("freeze", timeout_s=10) == "bad_state"
    assert code("prepare") == "bad_state"
    assert code("post_snapshot", devices={"d0": "/dev/null"}) == "bad_state"  # while frozen
    c.thaw()
    devices: object
    for devices in (None, {}, [], "d0", {"d0": 5}, {"d0": "rel/path"}, {"d0": "/dev/\u0000x"},
                    {"nodisk": "/dev/null"}, {"d0": "/dev/null"}, {"d0": "/nope/x"}):
        assert code("post_snapshot", devices=devices) == "bad_args", devices
    for line in (b'{"op":"freeze","args":{"timeout_s":NaN}}', b"\x00\xff" * 100):
        assert c.raw(line)["code"] == "bad_json"
    st = c.status()
    assert st["state"] == "thawed" and all(w["state"] == "running" for w in st["writers"])
    n = st["committed_txid"]
    wait_for(lambda: c.status()["committed_txid"] > n)
    assert st["ops_per_s"] < 10000


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
    start = g.client.status()["committed_txid"]
    wait_for(lambda: g.client.status()["committed_txid"] > start)  # it was committing
    g.client.workload(pause=True)  # returns once no transaction is under way
    assert all(w["state"] == "paused" for w in g.client.status()["writers"])
    n = g.client.status()["committed_txid"]
    # Ten transactions' time at the writers' own rate: a writer that still ran would commit.
    time.sleep(10 / (max(w["target_ops_per_s"] for w in g.client.status()["writers"]) or 10.0))
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


def test_a_thawed_session_survives_a_guest_restart(g: Running) -> None:
    """The host may resume a backup at step 10 after the guest restarted: post_snapshot is
    in order after a thaw, also one the previous guest process made; not after abort."""
    g.client.freeze(timeout_s=10)
    g.client.thaw()

    def post_snapshot_code() -> str:
        again = Guest(g.guest.cfg, FakeFreezer())
        again._restore_session()
        with pytest.raises(ProtocolError) as ei:
            again.handle("post_snapshot", {"devices": {"d0": "/dev/null"}})
        return ei.value.code

    assert post_snapshot_code() == "bad_args"  # in order: only the device is wrong
    g.client.prepare()
    assert post_snapshot_code() == "bad_state"
    g.client.freeze(timeout_s=10)
    assert post_snapshot_code() == "bad_state"  # died while frozen: that session is gone
    g.client.abort()
    assert post_snapshot_code() == "bad_state"
    g.client.freeze(timeout_s=0.2)  # thawed by the watchdog: still a thawed session
    wait_for(lambda: g.client.status()["timed_out"])
    assert post_snapshot_code() == "bad_args"


def test_the_ack_log_holds_the_last_acknowledged_transaction(g: Running) -> None:
    """Each durable commit is acknowledged in the guest's run folder (outside its disks):
    paused, its last line is the ledger's last transaction and hash."""
    from hvlab.guest.writers import last_ack

    wait_for(lambda: g.client.status()["committed_txid"] >= 3)
    g.client.workload(pause=True)
    st = g.client.status()
    assert last_ack(g.guest.cfg.run_dir) == (st["committed_txid"], st["committed_hash"])


@pytest.mark.parametrize("where", ["page", "commit"])
def test_a_writer_survives_io_errors_with_no_half_commit(g: Running, where: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """EIO (a full pool in error-when-full mode) in a page write or the COMMIT's fsync: the
    transaction fails as a whole and is never acknowledged, the writer goes on (state
    `failing`, the error and the count in its status), the store restarts from what is on
    disk, and once the disk works again it commits where it stood."""
    import errno

    from hvlab.guest import store
    from hvlab.guest.writers import last_ack

    wait_for(lambda: g.client.status()["committed_txid"] >= 3)
    failures = [4]
    real = store.Ledger.step if where == "page" else store.Ledger._append

    def failing(self: store.Ledger, *a: Any, **kw: Any) -> Any:
        if failures[0] > 0 and (where == "page" or a[0].get("k") == "commit"):
            failures[0] -= 1
            if where == "page":  # half the transaction's pages written, then the error
                t = self.open_txn
                assert t is not None
                pg = t.steps[t.done]
                import os

                os.pwrite(self._pages, ledger.encode_page(pg), pg.no * ledger.PAGE_SIZE)
            raise OSError(errno.EIO, "Input/output error")
        return real(self, *a, **kw)

    monkeypatch.setattr(store.Ledger, "step" if where == "page" else "_append", failing)
    w = g.guest.ledger_writer
    assert w is not None
    wait_for(lambda: w.failed_ops >= 4, 30, "four failed transactions")
    monkeypatch.undo()
    wait_for(lambda: w.io_error is None and w.ledger.last_txid > 0, 30, "commits again")
    assert w.is_alive() and w.error is None
    st = g.client.status()
    (row,) = [x for x in st["writers"] if x["name"] == "ledger"]
    assert row["failed_ops"] == 4 and row["state"] == "running"
    g.client.workload(pause=True)
    st = g.client.status()
    res = ledger.check(g.guest.roots)  # what is on disk: whole, up to the last ack
    assert not res.problems and res.unfinished is None
    assert (res.last_txid, res.last_hash) == (st["committed_txid"], st["committed_hash"])
    assert last_ack(g.guest.cfg.run_dir) == (res.last_txid, res.last_hash)
