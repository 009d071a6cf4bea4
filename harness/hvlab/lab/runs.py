"""Run records on disk: `<runs_dir>/<id>/run.json` (atomic writes), `events.jsonl`, VM locks.

Lab persistence: the flow writes them, the lab (stop, down), the manifest and explain read them.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any

import psutil

from hvlab.errors import BadInput, HvlabError
from hvlab.lab.definition import shown
from hvlab.lab.paths import Names, refuse_links
from hvlab.lab.record import ACTIVE, FINAL, Event, Run
from hvlab.lab.state import write_json_atomic
from hvlab.sys import dirfd, private

__all__ = ["ACTIVE", "FINAL", "Run"]


# Ids are r<date><time><4 hex>; a given one is checked as the manifest checks its run field.
RUN_ID_RE = re.compile(r"[a-z0-9]{1,64}")


def new_id() -> str:
    return "r" + time.strftime("%Y%m%d%H%M%S") + secrets.token_hex(2)


def check_id(run_id: str) -> str:
    """A run id given on the command line: it names a folder, so no '/', '..' or the like."""
    if not RUN_ID_RE.fullmatch(run_id):
        raise BadInput(f"invalid run id {shown(run_id)}: run ids are r<date><time><4 hex "
                       f"digits>, lowercase letters and digits (`hvlab runs` lists them)")
    return run_id


def run_dir(names: Names, run_id: str) -> Path:
    return names.runs_dir / run_id


def save(names: Names, run: Run, *, durable: bool = True) -> None:
    d = run_dir(names, run.id)
    refuse_links(d, "run folder")  # the runs folder is the lab's: a planted link is refused
    private.make_dirs(d)
    run.updated = time.time()
    # One line: the flow saves a run several times per step (`hvlab runs --json` or
    # `explain --json` print it indented).
    write_json_atomic(d / "run.json", run.to_dict(), durable=durable, indent=None)


def _read(path: Path) -> Run:
    return Run.from_dict(json.loads(path.read_text()))


def load(names: Names, run_id: str) -> Run:
    check_id(run_id)
    path = run_dir(names, run_id) / "run.json"
    try:
        return _read(path)
    except FileNotFoundError:
        raise BadInput(f"no run {run_id!r} in lab {names.lab!r} (`hvlab runs` lists them)")\
            from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise HvlabError(f"run record {path} is unreadable: {exc!r}") from None


def all_runs(names: Names) -> list[Run]:
    out: list[Run] = []
    if not names.runs_dir.exists():
        return out
    for p in sorted(names.runs_dir.glob("*/run.json")):
        try:
            out.append(_read(p))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    return out


def alive(run: Run) -> bool:
    if not isinstance(run.pid, int):
        return False
    try:
        p = psutil.Process(run.pid)
        return p.status() != psutil.STATUS_ZOMBIE and abs(
            p.create_time() - float(run.pid_started or 0)) < 2
    except psutil.Error:
        return False


def effective_state(run: Run) -> str:
    """`running` with a dead process reads as `interrupted`."""
    if run.state in ("running", "aborting") and not alive(run):
        return "interrupted"
    return run.state


def active_runs(names: Names) -> list[Run]:
    return [r for r in all_runs(names) if r.state in ACTIVE]


def append_event(names: Names, run_id: str, event: Event | dict[str, Any], *,
                 durable: bool = True) -> None:
    """One line of the run's events.jsonl: a step's Event, or a supplement (a dict) that
    `events` folds into an earlier event (fingerprints hashed after their step)."""
    data = event.to_dict() if isinstance(event, Event) else event
    path = run_dir(names, run_id) / "events.jsonl"
    fd = dirfd.open_file(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    with os.fdopen(fd, "a") as f:
        f.write(json.dumps(data, sort_keys=True) + "\n")
        f.flush()
        if durable:
            os.fsync(f.fileno())


def events(names: Names, run_id: str) -> list[Event]:
    path = run_dir(names, run_id) / "events.jsonl"
    if not path.exists():
        return []
    out: list[Event] = []
    for line in path.read_text().splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue  # the half-written last line of a killed run
        if ev.get("supplement") == "fingerprints":  # hashed after its step: fold it in
            for earlier in reversed(out):
                if (earlier.step, earlier.vm) == (ev.get("step"), ev.get("vm")):
                    earlier.fingerprints = ev.get("fingerprints")
                    earlier.fingerprints_note = ev.get("fingerprints_note")
                    break
            continue
        out.append(Event.from_dict(ev))
    return out


def mark_self(run: Run) -> None:
    run.pid = os.getpid()
    run.pid_started = psutil.Process().create_time()


class VmLocks:
    """flock per VM while a process works on a run: one running backup per VM."""

    def __init__(self, names: Names, vms: list[str]) -> None:
        self.names, self.vms = names, vms
        self.fds: list[int] = []

    def __enter__(self) -> VmLocks:
        d = self.names.runs_dir / "locks"
        refuse_links(d, "runs folder")
        private.make_dirs(d)
        try:
            for vm in self.vms:
                fd = dirfd.open_file(d / f"{vm}.lock", os.O_RDWR | os.O_CREAT)
                self.fds.append(fd)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise BadInput(f"VM {vm} is already in a running backup "
                                   f"(another hvlab process holds it)") from None
        except BaseException:
            self.release()
            raise
        return self

    def release(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def __exit__(self, *exc: object) -> None:
        self.release()
