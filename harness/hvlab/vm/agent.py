"""Runs inside the lab VM: serves command requests from the spool directory on hostfs.

A request is <id>.req (JSON: argv, cwd, env). Output is pumped into <id>.out/<id>.err with an
fsync per chunk (hostfs would otherwise sit on dirty pages), then <id>.rc is written.
<id>.kill asks for SIGTERM of the command's process group. `shutdown.req` ends the agent.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

POLL = 0.05


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _serve(spool: Path, rid: str, req: dict[str, object]) -> None:
    argv = [str(a) for a in req["argv"]]  # type: ignore[attr-defined]
    env = dict(os.environ)
    env.update({str(k): str(v) for k, v in dict(req.get("env") or {}).items()})  # type: ignore[call-overload]
    outs = {"out": open(spool / f"{rid}.out", "wb"), "err": open(spool / f"{rid}.err", "wb")}
    try:
        proc = subprocess.Popen(argv, cwd=str(req.get("cwd") or "/"), env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
    except OSError as exc:
        outs["err"].write(f"hvlab-vm: cannot run {argv[0]}: {exc}\n".encode())
        for f in outs.values():
            f.close()
        _write_atomic(spool / f"{rid}.rc", "127\n")
        return
    sel = selectors.DefaultSelector()
    assert proc.stdout and proc.stderr
    sel.register(proc.stdout, selectors.EVENT_READ, "out")
    sel.register(proc.stderr, selectors.EVENT_READ, "err")
    open_streams = 2
    kill_file = spool / f"{rid}.kill"
    orphaned = False
    while open_streams:
        for key, _ in sel.select(timeout=0.2):
            data = os.read(key.fd, 65536)
            if not data:
                sel.unregister(key.fileobj)
                open_streams -= 1
                continue
            f = outs[key.data]
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if kill_file.exists():
            kill_file.unlink(missing_ok=True)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        if not orphaned and _client_gone(spool, rid):
            # Its client died (kill -9, a closed terminal): a command has no owner here.
            # SIGTERM lets it clean up (a backup unwinds); the next command sees the result.
            orphaned = True
            outs["err"].write(b"hvlab-vm: the client is gone; stopping the command\n")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    rc = proc.wait()
    for f in outs.values():
        f.close()
    _write_atomic(spool / f"{rid}.rc", f"{rc}\n")


CLIENT_TIMEOUT_S = 10.0


def _client_gone(spool: Path, rid: str) -> bool:
    """The client makes `<rid>.alive-<unix time>` every second; a request without one (an
    older client) is never judged gone."""
    beats = [p.name.rsplit("-", 1)[1] for p in spool.glob(f"{rid}.alive-*")]
    stamps = [int(b) for b in beats if b.isdigit()]
    return bool(stamps) and time.time() - max(stamps) > CLIENT_TIMEOUT_S


def _shell_loop(stop: threading.Event) -> None:
    """A root shell on the VM's second console (a host pty): what `hvlab vm shell` attaches to."""
    tty = "/dev/tty1"
    while not stop.is_set():
        if not os.path.exists(tty):
            return
        proc = subprocess.Popen(["setsid", "-c", "bash", "-l"], stdin=open(tty, "rb"),
                                stdout=open(tty, "wb"), stderr=subprocess.STDOUT,
                                env={**os.environ, "PS1": r"hvlab-vm \w# "})
        while proc.poll() is None and not stop.is_set():
            time.sleep(0.2)
        if proc.poll() is None:
            proc.terminate()


def main() -> int:
    spool = Path(sys.argv[1])
    spool.mkdir(parents=True, exist_ok=True)
    for stale in spool.glob("*"):
        stale.unlink(missing_ok=True)
    stop = threading.Event()
    if "--shell" in sys.argv:
        threading.Thread(target=_shell_loop, args=(stop,), daemon=True).start()
    _write_atomic(spool.parent / "ready", f"{os.getpid()}\n")
    seen: set[str] = set()
    while True:
        if (spool / "shutdown.req").exists():
            (spool / "shutdown.req").unlink(missing_ok=True)
            stop.set()
            return 0
        for req_file in sorted(spool.glob("*.req")):
            rid = req_file.stem
            if rid in seen:
                continue
            try:
                req = json.loads(req_file.read_text())
            except (OSError, ValueError):
                continue  # half-written: try again next round
            seen.add(rid)
            req_file.unlink(missing_ok=True)
            threading.Thread(target=_serve, args=(spool, rid, req), daemon=True).start()
        time.sleep(POLL)


if __name__ == "__main__":
    sys.exit(main())
