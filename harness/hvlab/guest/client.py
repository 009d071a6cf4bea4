"""Host side of the integration-services channel: one connection per request.

The guest serves many connections at once up to a cap; a connection beyond it is refused
(`full`) before the guest reads anything, so `request` tries again for up to FULL_RETRY_S.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from pathlib import Path
from typing import Any

from hvlab.errors import HvlabError

FULL_RETRY_S = 5.0  # how long a request is retried while the guest has no free connection


class GuestError(HvlabError):
    """The guest answered `ok: false` (or not at all)."""

    def __init__(self, message: str, code: str = "failed", reply: dict[str, Any] | None = None):
        super().__init__(message)
        self.code = code
        self.reply = reply or {}


class GuestTimeout(GuestError):
    """The guest did not answer in time."""


class GuestUnavailable(GuestError):
    """No integration services: no socket, or nobody listening on it."""


class GuestClient:
    def __init__(self, socket_path: Path | str, timeout: float = 30.0) -> None:
        self.socket_path = Path(socket_path)
        self.timeout = timeout

    def request(self, op: str, timeout: float | None = None, **args: Any) -> dict[str, Any]:
        """Send one request, return the reply; raises GuestError on `ok: false`."""
        line = json.dumps({"op": op, "args": args}).encode()
        end = time.monotonic() + min(FULL_RETRY_S, self.timeout if timeout is None else timeout)
        pause = 0.05
        while True:
            reply = self.raw(line, timeout)
            # refused unread: nothing of this request was done, it is safe to send it again
            if reply.get("code") != "full" or time.monotonic() + pause > end:
                return self._check(op, reply)
            time.sleep(pause)
            pause = min(pause * 2, 0.5)

    def raw(self, line: bytes, timeout: float | None = None) -> dict[str, Any]:
        """Send one raw line (tests use it for malformed input) and return the parsed reply."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout if timeout is None else timeout)
        try:
            try:
                sock.connect(str(self.socket_path))
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                raise GuestUnavailable(
                    f"no integration services at {self.socket_path}: {exc.strerror}",
                    "unavailable",
                ) from exc
            # A busy guest replies and closes before reading: its reply is still queued.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(line.rstrip(b"\n") + b"\n")
            buf = b""
            while b"\n" not in buf:
                chunk = sock.recv(65536)
                if not chunk:
                    raise GuestError("guest closed the channel without a reply", "closed")
                buf += chunk
        except TimeoutError as exc:
            raise GuestTimeout(
                f"guest did not answer within {sock.gettimeout()}s", "timeout"
            ) from exc
        except OSError as exc:
            if isinstance(exc, GuestError):
                raise
            if isinstance(exc, ConnectionResetError):
                # Reset before any reply: the listener died under us.
                raise GuestUnavailable(
                    f"guest at {self.socket_path} went away", "unavailable"
                ) from exc
            raise GuestError(f"guest channel error: {exc}", "channel") from exc
        finally:
            sock.close()
        try:
            reply = json.loads(buf.split(b"\n", 1)[0])
        except ValueError as exc:
            raise GuestError(f"guest sent malformed reply: {exc}", "bad_reply") from exc
        if not isinstance(reply, dict):
            raise GuestError("guest sent a non-object reply", "bad_reply")
        return reply

    @staticmethod
    def _check(op: str, reply: dict[str, Any]) -> dict[str, Any]:
        if not reply.get("ok"):
            code = str(reply.get("code", "failed"))
            raise GuestError(f"guest {op}: {reply.get('error', 'failed')}", code, reply)
        return reply

    def identify(self) -> dict[str, Any]:
        return self.request("identify")

    def prepare(self) -> dict[str, Any]:
        return self.request("prepare")

    def freeze(self, timeout_s: float = 10.0, wait_s: float | None = None) -> dict[str, Any]:
        # Writers may take up to their own bound (60 s by default) to quiesce.
        wait = max(self.timeout, 70.0) if wait_s is None else wait_s
        return self.request("freeze", timeout=wait, timeout_s=timeout_s)

    def thaw(self) -> dict[str, Any]:
        return self.request("thaw")

    def post_snapshot(self, devices: dict[str, str]) -> dict[str, Any]:
        return self.request("post_snapshot", timeout=max(self.timeout, 120.0), devices=devices)

    def abort(self) -> dict[str, Any]:
        return self.request("abort")

    def status(self) -> dict[str, Any]:
        return self.request("status")

    def workload(self, **knobs: Any) -> dict[str, Any]:
        return self.request("workload", **knobs)

    def fault(self, veto: str | None = None, mute: str | None = None) -> dict[str, Any]:
        """Arm a writer's veto of the next freeze, or no answer to an op's next request."""
        args: dict[str, Any] = {k: v for k, v in (("veto", veto), ("mute", mute)) if v}
        return self.request("fault", **args)
