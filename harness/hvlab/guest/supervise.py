"""Host side: start, inspect and stop a guest emulator process (pid file + psutil)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from hvlab.errors import HvlabError
from hvlab.guest.client import GuestClient, GuestError
from hvlab.guest.quiesce import MARKER, recover_after_crash

MODULE = "hvlab.guest.emulator"


def _proc(run_dir: Path) -> psutil.Process | None:
    """The live emulator recorded in run_dir, or None. After a power cut the lab VM counts
    pids from the start again, so the pid in the file can be another process's, or a
    thread's of a guest started since (/proc answers for a thread id too): the start time
    and the thread group tell them apart."""
    try:
        fields = (run_dir / "guest.pid").read_text().split()
        p = psutil.Process(int(fields[0]))
        if p.status() == psutil.STATUS_ZOMBIE or MODULE not in " ".join(p.cmdline()):
            return None
        if len(fields) > 1 and abs(p.create_time() - float(fields[1])) > 0.5:
            return None
        return p if _leads_its_threads(p.pid) else None
    except (OSError, ValueError, IndexError, psutil.Error):
        return None


def _leads_its_threads(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        return any(line.split() == ["Tgid:", str(pid)] for line in f)


def running(run_dir: Path | str) -> int | None:
    """The pid of the guest emulator of run_dir, if it runs."""
    p = _proc(Path(run_dir))
    return p.pid if p else None


def start_guest(config: dict[str, Any], timeout: float = 30.0) -> int:
    """Spawn the guest detached and wait until it answers (or, for profile none, reports)."""
    run_dir = Path(config["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    running = _proc(run_dir)
    if running is not None:
        return running.pid
    recover_after_crash(run_dir)  # a guest killed while frozen: thaw before a new one starts
    cfg_path = run_dir / "guest.json"
    cfg_path.write_text(json.dumps(config, indent=1, default=str))
    (run_dir / "status.json").unlink(missing_ok=True)
    with open(run_dir / "guest.out", "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", MODULE, "--config", str(cfg_path)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd="/",
        )
    deadline = time.monotonic() + timeout
    sock = config.get("socket")
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = (run_dir / "guest.out").read_text(errors="replace").strip().splitlines()[-3:]
            raise HvlabError(f"guest {config.get('vm')} exited ({proc.returncode}): {tail}")
        if config.get("profile") == "none" or not sock:
            if (run_dir / "status.json").exists():
                return proc.pid
        else:
            try:
                GuestClient(sock, timeout=2.0).identify()
                return proc.pid
            except GuestError:
                pass
        time.sleep(0.05)
    _kill(proc.pid, 5.0)
    raise HvlabError(f"guest {config.get('vm')} did not come up within {timeout:g}s")


def thaw_if_dead(run_dir: Path | str) -> list[str]:
    """Thaw what the guest of run_dir left frozen, if it died frozen (its marker is there, the
    process is not); the mountpoints thawed. A live guest keeps its freeze: its watchdog ends
    it."""
    run_dir = Path(run_dir)
    if not (run_dir / MARKER).exists() or _proc(run_dir) is not None:
        return []
    thawed: list[str] = recover_after_crash(run_dir).get("thawed", [])
    return thawed


def guest_status(run_dir: Path | str) -> dict[str, Any]:
    run_dir = Path(run_dir)
    p = _proc(run_dir)
    try:
        st = json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        st = None
    return {
        "alive": p is not None,
        "pid": p.pid if p else None,
        "frozen_marker": (run_dir / "frozen").exists(),
        "status": st,
    }


def _kill(pid: int, timeout: float) -> bool:
    """SIGTERM, wait, SIGKILL, wait. True if the process is gone (reaped if it is our child)."""
    try:
        p = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return True
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            p.send_signal(sig)
            p.wait(timeout)
            return True
        except psutil.NoSuchProcess:
            return True
        except psutil.TimeoutExpired:
            if p.status() == psutil.STATUS_ZOMBIE:
                return True
    return False


def stop_guest(run_dir: Path | str, timeout: float = 15.0) -> dict[str, Any]:
    """Stop the guest (if running) and thaw anything a dead guest left frozen. Idempotent."""
    run_dir = Path(run_dir)
    p = _proc(run_dir)
    result: dict[str, Any] = {"pid": p.pid if p else None, "was_running": p is not None}
    if p is not None and not _kill(p.pid, timeout):
        raise HvlabError(f"guest pid {p.pid} survived SIGKILL")
    result["recovered"] = recover_after_crash(run_dir)
    try:  # a killed guest leaves its socket behind
        sock = json.loads((run_dir / "guest.json").read_text()).get("socket")
        if sock:
            Path(sock).unlink(missing_ok=True)
    except (OSError, ValueError):
        pass
    (run_dir / "guest.pid").unlink(missing_ok=True)
    return result
