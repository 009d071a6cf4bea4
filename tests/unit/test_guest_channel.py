"""The channel on its own: request parsing, and the server's per-connection limits, with a
stand-in handler (no guest, no filesystem)."""

from __future__ import annotations

import json
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hvlab.guest.client import GuestClient, GuestError
from hvlab.guest.protocol import Limits, ProtocolError, Server, dispatch, parse, peer
from hvlab_fixtures.waits import wait_for


def ok_handler(op: str, args: dict[str, Any]) -> dict[str, Any]:
    return {"echo": args}


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"{not json", "bad_json"),
        (b"\xff\xfe\x00binary\x80", "bad_json"),
        (b'{"op": "status", "x": "\xc3"}', "bad_json"),  # truncated UTF-8
        (b'{"op": "freeze", "args": {"timeout_s": NaN}}', "bad_json"),
        (b'{"op": "freeze", "args": {"timeout_s": Infinity}}', "bad_json"),
        (b"[" * 100_000 + b"]" * 100_000, "bad_json"),  # RecursionError in the parser
        (b'{"op": ' + b"1" * 5000 + b"}", "bad_json"),  # int longer than Python converts
        (b"[1, 2]", "bad_request"),
        (b'"status"', "bad_request"),
        (b"null", "bad_request"),
        (b'{"op": 5}', "bad_request"),
        (b'{"op": "status", "args": []}', "bad_request"),
        (b'{"op": "status", "args": "x"}', "bad_request"),
        (b'{"op": "status", "id": [1]}', "bad_request"),
        (b'{"op": "status", "id": true}', "bad_request"),
        (b'{"op": "status", "id": "' + b"i" * 300 + b'"}', "bad_request"),
        (b'{"op": "explode"}', "unknown_op"),
        (b'{"op": "' + b"x" * 10_000 + b'"}', "unknown_op"),
        (b'{"op": "__init__"}', "unknown_op"),
    ],
)
def test_malformed_requests_get_one_line_errors(line: bytes, code: str) -> None:
    calls: list[str] = []

    def handler(op: str, args: dict[str, Any]) -> dict[str, Any]:
        calls.append(op)
        return {}

    with pytest.raises(ProtocolError) as ei:
        parse(line)
    assert ei.value.code == code
    reply = dispatch(handler, line)
    assert reply["ok"] is False and reply["code"] == code and not calls
    assert "\n" not in reply["error"] and len(reply["error"]) < 400
    assert reply["op"] is None  # never echoes what the client made up
    json.dumps(reply, allow_nan=False)


def test_id_is_echoed_and_handler_errors_are_one_line() -> None:
    assert parse(b'{"op":"status","id":7}') == ("status", {}, 7)

    def handler(op: str, args: dict[str, Any]) -> dict[str, Any]:
        raise ProtocolError("bad_state", "two\nlines")

    r = dispatch(handler, b'{"op":"thaw","id":"x"}')
    assert r == {**r, "ok": False, "op": "thaw", "code": "bad_state", "error": "two lines"}
    assert r["id"] == "x"


class Chan:
    def __init__(self, limits: Limits, handler: Any = ok_handler) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="hvc-", dir="/tmp"))
        self.path = self.dir / "c.sock"
        self.server = Server(self.path, handler, limits)
        self.stop = threading.Event()
        self.thread = threading.Thread(
            target=self.server.serve, args=(self.stop.is_set, lambda: None, 1.0)
        )
        self.thread.start()

    def connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(str(self.path))
        return s

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.server.close()
        import shutil

        shutil.rmtree(self.dir)


def lines(s: socket.socket) -> Iterator[dict[str, Any]]:
    f = s.makefile("rb")
    while line := f.readline():
        assert line.endswith(b"\n")
        yield json.loads(line)


def ask(s: socket.socket, line: bytes) -> dict[str, Any]:
    s.sendall(line + b"\n")
    return next(lines(s))


@pytest.fixture
def chan() -> Iterator[Chan]:
    c = Chan(Limits(max_line=1024, max_clients=4, idle_timeout_s=1.0, send_timeout_s=5.0))
    yield c
    c.close()


def test_requests_on_one_connection_are_answered_in_order(chan: Chan) -> None:
    s = chan.connect()
    s.sendall(b'{"op":"status","id":1}\n\n  \n{"op":"identify","id":2}\n{oops\n')
    it = lines(s)
    got = [next(it) for _ in range(3)]
    assert [(r.get("id"), r["ok"]) for r in got] == [(1, True), (2, True), (None, False)]
    s.close()


def test_line_too_long_is_refused_and_closed(chan: Chan) -> None:
    for payload in (b"x" * 5000, b'{"op":"status","args":{"a":"' + b"y" * 2000 + b'"}}\n'):
        s = chan.connect()
        s.sendall(payload)
        replies = list(lines(s))  # the server closes after its one reply
        assert len(replies) == 1 and replies[0]["code"] == "too_long"
        s.close()
    assert ask(chan.connect(), b'{"op":"status"}')["ok"] is True


def test_idle_client_is_closed_with_a_reason(chan: Chan) -> None:
    s = chan.connect()
    s.sendall(b'{"op":"stat')  # half a line, then nothing: a slowloris
    t = time.monotonic()
    replies = list(lines(s))  # the reason, then the end of the stream at once
    assert time.monotonic() - t > 0.8  # closed by the idle limit, not at once
    assert [r["code"] for r in replies] == ["idle"]
    s.close()


def test_connection_cap_refuses_in_one_line_then_frees_up(chan: Chan) -> None:
    held = [chan.connect() for _ in range(4)]
    for s in held:  # every one is being served
        assert ask(s, b'{"op":"status"}')["ok"] is True
    extra = chan.connect()
    refused = list(lines(extra))
    assert len(refused) == 1 and refused[0]["code"] == "full"
    assert "too many clients" in refused[0]["error"]
    held.pop().close()
    wait_for(lambda: chan.server.connections < 4, what="a freed connection slot")
    assert ask(chan.connect(), b'{"op":"status"}')["ok"] is True
    for s in held:
        s.close()


def test_a_slow_request_does_not_hold_up_another_connection() -> None:
    entered, release = threading.Event(), threading.Event()

    def handler(op: str, args: dict[str, Any]) -> dict[str, Any]:
        if op == "freeze":
            entered.set()
            release.wait(60)
        return {"peer": peer()}

    c = Chan(Limits(idle_timeout_s=30), handler)
    try:
        slow = c.connect()
        slow.sendall(b'{"op":"freeze"}\n')
        assert entered.wait(30)
        fast = ask(c.connect(), b'{"op":"status"}')  # answered while the freeze is held
        assert fast["ok"] is True and not release.is_set()
        assert fast["peer"].startswith("c") and "pid" in fast["peer"]
        release.set()
        r = next(lines(slow))
        assert r["ok"] is True and r["op"] == "freeze" and r["peer"] != fast["peer"]
    finally:
        release.set()
        c.close()


def test_client_that_vanishes_mid_request_leaves_the_server_serving(chan: Chan) -> None:
    for junk in (b'{"op":"status"', b"\x00" * 100, b'{"op":"status"}\n' * 50):
        s = chan.connect()
        s.sendall(junk)
        s.close()  # replies unread, connection gone
    assert ask(chan.connect(), b'{"op":"status"}')["ok"] is True


def test_close_ends_connections_and_removes_the_socket() -> None:
    c = Chan(Limits(idle_timeout_s=30))
    s = c.connect()
    assert ask(s, b'{"op":"status"}')["ok"]
    c.close()
    assert s.recv(10) == b""  # shut down by the server, not left to the idle timeout
    assert not c.path.exists()


def test_client_retries_while_the_guest_is_full(chan: Chan) -> None:
    held = [chan.connect() for _ in range(4)]
    for s in held:
        assert ask(s, b'{"op":"status"}')["ok"] is True
    c = GuestClient(chan.path, timeout=1.0)
    t = time.monotonic()
    with pytest.raises(GuestError) as ei:  # full for longer than the client waits
        c.request("status")
    assert ei.value.code == "full" and time.monotonic() - t > 0.5  # it retried first
    threading.Timer(0.5, held.pop().close).start()
    assert GuestClient(chan.path, timeout=10).request("status")["ok"] is True
    for s in held:
        s.close()


def test_client_that_does_not_read_its_replies_is_dropped() -> None:
    def big(op: str, args: dict[str, Any]) -> dict[str, Any]:
        return {"blob": "z" * 20_000}

    c = Chan(Limits(idle_timeout_s=30, send_timeout_s=1.0), big)
    try:
        s = c.connect()
        s.sendall(b'{"op":"status"}\n' * 200)  # 4 MB of replies, none read
        assert ask(c.connect(), b'{"op":"identify"}')["ok"] is True  # others still served
        wait_for(lambda: not c.server.connections, 10,
                 "the client that never reads being dropped")
        s.close()
    finally:
        c.close()


def test_a_flood_of_junk_lines_is_answered_and_logged_in_brief(
    chan: Chan, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="hvlab.guest.protocol")
    s = chan.connect()
    s.sendall(b"x\n" * 3000 + b'{"op":"status","id":"last"}\n')
    it = lines(s)
    got = [next(it) for _ in range(3001)]
    assert all(r["code"] == "bad_json" for r in got[:-1]) and got[-1]["id"] == "last"
    s.close()
    wait_for(lambda: not chan.server.connections, what="the connection closed")
    msgs = [r.getMessage() for r in caplog.records]
    assert len([m for m in msgs if "bad_json" in m]) == 5
    assert any("2995 more error replies" in m for m in msgs)
