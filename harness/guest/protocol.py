"""The integration-services channel: JSON lines over a Unix socket, one client at a time.

Request:  {"op": "freeze", "args": {"timeout_s": 10}, "id": <optional, echoed>}
Reply:    {"ok": true, "op": "freeze", "clock": <guest time.time()>, ...}
Error:    {"ok": false, "op": ..., "clock": ..., "error": "<one line>", "code": "<kind>"}
Codes: bad_json, bad_request, unknown_op, bad_state, bad_args, busy, failed, internal.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("hvlab.guest.protocol")

OPS = ("identify", "prepare", "freeze", "thaw", "post_snapshot", "abort", "status", "workload")
MAX_LINE = 1 << 20


class ProtocolError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


Handler = Callable[[str, dict[str, Any]], dict[str, Any]]


def one_line(msg: object) -> str:
    return " ".join(str(msg).split()) or "error"


def error_reply(op: object, code: str, message: str) -> dict[str, Any]:
    return {
        "ok": False,
        "op": op if isinstance(op, str) else None,
        "clock": time.time(),
        "error": one_line(message),
        "code": code,
    }


def encode(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


def dispatch(handler: Handler, line: bytes) -> dict[str, Any]:
    """Turn one request line into one reply; never raises."""
    try:
        req = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        return error_reply(None, "bad_json", f"malformed JSON: {exc}")
    if not isinstance(req, dict):
        return error_reply(None, "bad_request", "request must be a JSON object")
    op = req.get("op")
    args = req.get("args", {})
    if not isinstance(op, str) or not isinstance(args, dict):
        return error_reply(op, "bad_request", 'request needs "op" (string) and "args" (object)')
    if op not in OPS:
        return error_reply(op, "unknown_op", f"unknown op {op!r}; known: {', '.join(OPS)}")
    try:
        body = handler(op, args)
        reply: dict[str, Any] = {"ok": True, "op": op, "clock": time.time(), **body}
    except ProtocolError as exc:
        reply = error_reply(op, exc.code, str(exc))
    except Exception as exc:
        log.exception("op %s failed", op)
        reply = error_reply(op, "internal", f"{type(exc).__name__}: {exc}")
    if "id" in req:
        reply["id"] = req["id"]
    return reply


class Server:
    """Selector loop in the calling thread. A second client gets a `busy` reply and is closed."""

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self.sel = selectors.DefaultSelector()
        self.client: socket.socket | None = None
        self.buf = b""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        self.lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket is born 0600: no window where others can connect
        try:
            self.lsock.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self.lsock.listen(8)
        self.lsock.setblocking(False)
        self.sel.register(self.lsock, selectors.EVENT_READ, "listen")

    def serve(
        self, should_stop: Callable[[], bool], tick: Callable[[], None], every: float
    ) -> None:
        last = 0.0
        while not should_stop():
            for key, _ in self.sel.select(timeout=0.2):
                if key.data == "listen":
                    self._accept()
                else:
                    self._read()
            if time.monotonic() - last >= every:
                last = time.monotonic()
                tick()

    def _accept(self) -> None:
        try:
            conn, _ = self.lsock.accept()
        except BlockingIOError:
            return
        conn.settimeout(5.0)  # a stuck peer must not wedge the guest
        if self.client is not None:
            with contextlib.suppress(OSError):
                conn.sendall(encode(error_reply(None, "busy", "another client is connected")))
            conn.close()
            return
        self.client, self.buf = conn, b""
        self.sel.register(conn, selectors.EVENT_READ, "client")

    def _drop(self) -> None:
        if self.client is not None:
            self.sel.unregister(self.client)
            self.client.close()
            self.client, self.buf = None, b""

    def _read(self) -> None:
        assert self.client is not None
        try:
            data = self.client.recv(65536)
        except OSError:
            data = b""
        if not data:
            self._drop()
            return
        self.buf += data
        while self.client is not None and b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            if line.strip():
                self._send(dispatch(self.handler, line))
        if self.client is not None and len(self.buf) > MAX_LINE:
            self._send(error_reply(None, "bad_request", "request line too long"))
            self._drop()

    def _send(self, msg: dict[str, Any]) -> None:
        assert self.client is not None
        try:
            self.client.sendall(encode(msg))
        except OSError:
            self._drop()

    def close(self) -> None:
        self._drop()
        self.sel.close()
        self.lsock.close()
        self.path.unlink(missing_ok=True)
