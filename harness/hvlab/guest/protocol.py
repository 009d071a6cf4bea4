"""The integration-services channel: JSON lines over a Unix socket, many clients at once.

Request:  {"op": "freeze", "args": {"timeout_s": 10}, "id": <optional, echoed>}
Reply:    {"ok": true, "op": "freeze", "clock": <guest time.time()>, ...}
Error:    {"ok": false, "op": ..., "clock": ..., "error": "<one line>", "code": "<kind>"}
Codes: bad_json, bad_request, unknown_op, bad_state, bad_args, busy, failed, internal,
too_long, idle, full.

Each connection is served by its own thread, so one idle or slow client never holds up
another; a connection may send any number of requests, answered in order. Limits per
connection (`Limits`): a request line of at most `max_line` bytes (a longer one gets a
`too_long` reply and the connection is closed: the stream cannot be resynchronised), a
complete request at least every `idle_timeout_s` (else an `idle` reply and close), and at most
`max_clients` connections at once (one more gets a `full` reply and is closed). Every mistake
a client can make is answered in one line and logged in one line, never with a traceback.
Keeping the guest's state consistent across connections is the handler's business.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import select
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

log = logging.getLogger("hvlab.guest.protocol")


def is_number(v: object) -> TypeGuard[int | float]:
    """A JSON number (not a boolean); NaN and infinities never get past the parser."""
    return isinstance(v, int | float) and not isinstance(v, bool) and not (
        isinstance(v, float) and not math.isfinite(v))


OPS = ("identify", "prepare", "freeze", "thaw", "post_snapshot", "abort", "status", "workload",
       "fault")
MAX_LINE = 64 << 10
LOGGED_ERRORS = 5  # error replies logged per connection; the rest are counted
ACCEPT_POLL_S = 0.2  # the serve loop checks for a stop at least this often


@dataclass(frozen=True)
class Limits:
    max_line: int = MAX_LINE  # bytes in one request line, newline excluded
    max_clients: int = 32  # connections served at once
    idle_timeout_s: float = 30.0  # a connection must complete a request this often
    send_timeout_s: float = 10.0  # a client that does not read its replies is dropped


class ProtocolError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


Handler = Callable[[str, dict[str, Any]], dict[str, Any]]

_local = threading.local()


def peer() -> str | None:
    """The connection whose request the calling thread is handling ("c3 pid 123"), if any."""
    name: str | None = getattr(_local, "peer", None)
    return name


def one_line(msg: object) -> str:
    return " ".join(str(msg).split()) or "error"


def error_reply(op: object, code: str, message: str) -> dict[str, Any]:
    return {
        "ok": False,
        "op": op if isinstance(op, str) and op in OPS else None,
        "clock": time.time(),
        "error": one_line(message),
        "code": code,
    }


def encode(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse(line: bytes) -> tuple[str, dict[str, Any], Any]:
    """One request line -> (op, args, id); raises ProtocolError for anything malformed."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError("bad_json", f"request is not UTF-8 (byte {exc.start})") from None
    try:
        req = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise ProtocolError("bad_json", "malformed JSON: nested too deeply") from None
    except ValueError as exc:
        raise ProtocolError("bad_json", f"malformed JSON: {exc}") from None
    if not isinstance(req, dict):
        raise ProtocolError("bad_request", "request must be a JSON object")
    rid = req.get("id")
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, str | int | float)):
        raise ProtocolError("bad_request", '"id" must be a string or a number')
    if isinstance(rid, str) and len(rid) > 256:
        raise ProtocolError("bad_request", '"id" is longer than 256 characters')
    op = req.get("op")
    args = req.get("args", {})
    if not isinstance(op, str) or not isinstance(args, dict):
        raise ProtocolError("bad_request", 'request needs "op" (string) and "args" (object)')
    if op not in OPS:
        shown = op if len(op) <= 40 else op[:40] + "..."
        raise ProtocolError("unknown_op", f"unknown op {shown!r}; known: {', '.join(OPS)}")
    return op, args, rid


def dispatch(handler: Handler, line: bytes) -> dict[str, Any]:
    """Turn one request line into one reply; never raises."""
    try:
        op, args, rid = parse(line)
    except ProtocolError as exc:
        return error_reply(None, exc.code, str(exc))
    try:
        body = handler(op, args)
        reply: dict[str, Any] = {"ok": True, "op": op, "clock": time.time(), **body}
    except ProtocolError as exc:
        reply = error_reply(op, exc.code, str(exc))
    except Exception as exc:  # a bug of ours, not a client mistake: keep the traceback
        log.exception("op %s failed", op)
        reply = error_reply(op, "internal", f"{type(exc).__name__}: {exc}")
    if rid is not None:
        reply["id"] = rid
    return reply


def _peer_pid(conn: socket.socket) -> int | None:
    try:
        cred = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid: int = struct.unpack("3i", cred)[0]
        return pid
    except OSError:
        return None


def _close(sock: socket.socket) -> None:
    """Close, first dropping what the client sent and we did not read: a Unix socket closed
    with unread data ends its peer's stream with ECONNRESET after our last reply, not with a
    clean end of file."""
    with contextlib.suppress(OSError):
        sock.setblocking(False)  # with a timeout set, recv would first wait for data
        for _ in range(64):
            if not sock.recv(65536):
                break
    with contextlib.suppress(OSError):
        sock.close()


class _Conn:
    """One client: a thread reading request lines and answering each in order."""

    def __init__(self, server: Server, sock: socket.socket, name: str) -> None:
        self.server, self.sock, self.name = server, sock, name
        self.errors = 0
        self.thread = threading.Thread(target=self.run, name=f"chan-{name}", daemon=True)

    def run(self) -> None:
        _local.peer = self.name
        reason = "client closed"
        try:
            reason = self._loop()
        except Exception:  # a bug of ours; the guest carries on without this connection
            log.exception("channel %s failed", self.name)
            reason = "internal error"
        finally:
            self.server._forget(self)
            _close(self.sock)
            if self.errors > LOGGED_ERRORS:
                log.info(
                    "channel %s: %d more error replies not logged",
                    self.name, self.errors - LOGGED_ERRORS,
                )
            log.debug("channel %s closed: %s", self.name, reason)

    def _loop(self) -> str:
        lim = self.server.limits
        buf = b""
        deadline = time.monotonic() + lim.idle_timeout_s
        while True:
            start = 0
            while (nl := buf.find(b"\n", start)) >= 0:
                line, start = buf[start:nl], nl + 1
                if len(line) > lim.max_line:
                    return self._refuse_long()
                if line.strip():
                    reply = dispatch(self.server.handler, line)
                    if not reply["ok"]:
                        self.errors += 1
                        if self.errors <= LOGGED_ERRORS:  # a flood of junk, logged in brief
                            log.info("channel %s: %s: %s", self.name, reply["code"], reply["error"])
                    if not self._send(reply):
                        return "client does not read its replies"
                deadline = time.monotonic() + lim.idle_timeout_s
            buf = buf[start:]
            if len(buf) > lim.max_line:
                return self._refuse_long()
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning(
                    "channel %s: no complete request in %gs: closed", self.name, lim.idle_timeout_s
                )
                self._send(
                    error_reply(None, "idle", f"no request in {lim.idle_timeout_s:g}s: closing")
                )
                return "idle"
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as exc:
                return f"receive failed: {exc.strerror or exc}"
            if not data:
                if buf.strip():
                    log.info("channel %s: closed in the middle of a request line", self.name)
                return "client closed"
            buf += data

    def _refuse_long(self) -> str:
        n = self.server.limits.max_line
        log.warning("channel %s: request line longer than %d bytes: closed", self.name, n)
        self._send(error_reply(None, "too_long", f"request line longer than {n} bytes: closing"))
        return "line too long"

    def _send(self, msg: dict[str, Any]) -> bool:
        try:
            data = encode(msg)
        except (TypeError, ValueError, RecursionError) as exc:
            log.error("channel %s: reply not encodable: %s", self.name, one_line(exc))
            data = encode(error_reply(msg.get("op"), "internal", "reply not encodable"))
        try:
            self.sock.settimeout(self.server.limits.send_timeout_s)
            self.sock.sendall(data)
        except OSError as exc:
            log.info(
                "channel %s: reply not delivered (%s): closed", self.name, exc.strerror or exc
            )
            return False
        return True


class Server:
    """Accepts in the calling thread (`serve`); every connection has a thread of its own."""

    def __init__(self, path: Path, handler: Handler, limits: Limits | None = None) -> None:
        self.path = path
        self.handler = handler
        self.limits = limits or Limits()
        self._conns: set[_Conn] = set()
        self._mu = threading.Lock()
        self._seq = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        self.lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket is born 0600: no window where others can connect
        try:
            self.lsock.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self.lsock.listen(64)
        self.lsock.settimeout(ACCEPT_POLL_S)

    @property
    def connections(self) -> int:
        with self._mu:
            return len(self._conns)

    def serve(
        self, should_stop: Callable[[], bool], tick: Callable[[], None], every: float
    ) -> None:
        # A signal (SIGTERM: stop) writes to the wake pipe, so the loop sees it at once, not
        # at the next accept timeout (every `hvlab down` and test teardown waits for it).
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            old = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        except ValueError:  # not the main thread: no signal reaches this loop
            old = None
        try:
            last = 0.0
            while not should_stop():
                ready, _, _ = select.select([self.lsock.fileno(), wake_r], [], [],
                                            ACCEPT_POLL_S)
                if wake_r in ready:
                    with contextlib.suppress(BlockingIOError):
                        os.read(wake_r, 512)
                if self.lsock.fileno() in ready:
                    self.accept_one()
                if time.monotonic() - last >= every:
                    last = time.monotonic()
                    tick()
        finally:
            if old is not None:
                signal.set_wakeup_fd(old)
            os.close(wake_r)
            os.close(wake_w)

    def accept_one(self) -> None:
        try:
            sock, _ = self.lsock.accept()
        except TimeoutError:
            return
        except OSError as exc:  # e.g. EMFILE: the client is left in the backlog, try later
            log.warning("accept failed: %s", exc.strerror or exc)
            time.sleep(0.1)
            return
        self._seq += 1
        pid = _peer_pid(sock)
        name = f"c{self._seq}" + (f" pid {pid}" if pid else "")
        with self._mu:
            full = len(self._conns) >= self.limits.max_clients
            conn = None if full else _Conn(self, sock, name)
            if conn is not None:
                self._conns.add(conn)
        if conn is None:
            log.warning(
                "channel %s refused: %d connections open", name, self.limits.max_clients
            )
            msg = f"too many clients ({self.limits.max_clients} connected); try again"
            with contextlib.suppress(OSError):
                sock.settimeout(1.0)
                sock.sendall(encode(error_reply(None, "full", msg)))
            _close(sock)
            return
        conn.thread.start()

    def _forget(self, conn: _Conn) -> None:
        with self._mu:
            self._conns.discard(conn)

    def close(self, timeout: float = 2.0) -> None:
        with contextlib.suppress(OSError):
            self.lsock.close()
        self.path.unlink(missing_ok=True)
        with self._mu:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.sock.shutdown(socket.SHUT_RDWR)  # wakes its thread's recv
        end = time.monotonic() + timeout
        for c in conns:
            c.thread.join(max(0.0, end - time.monotonic()))
