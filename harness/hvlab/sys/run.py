"""The one subprocess layer: argv lists only (never a shell), C locale, typed failures."""

from __future__ import annotations

import contextvars
import logging
import os
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass

from hvlab.errors import CommandError

log = logging.getLogger("hvlab.run")


@dataclass(frozen=True)
class Command:
    """One external command as a program log keeps it (blivet's habit)."""

    argv: list[str]
    returncode: int
    seconds: float


_LOG: contextvars.ContextVar[list[Command] | None] = contextvars.ContextVar("hvlab_program_log",
                                                                          default=None)


@contextmanager
def program_log() -> Iterator[list[Command]]:
    """Collect every command run inside the block (this thread/context), in order."""
    commands: list[Command] = []
    token = _LOG.set(commands)
    try:
        yield commands
    finally:
        _LOG.reset(token)


# HVLAB_CMDLOG=FILE: every command of every hvlab process appended to FILE, a line each
# (start, seconds, pid, argv): where a test suite's time goes, across processes.
_PROFILE = os.path.abspath(os.environ["HVLAB_CMDLOG"]) if os.environ.get("HVLAB_CMDLOG") else ""


def _profile(argv: Sequence[str], seconds: float) -> None:
    words = " ".join(str(a) for a in argv)[:300]
    with suppress(OSError), open(_PROFILE, "a") as f:  # a log never fails a command
        f.write(f"{time.time() - seconds:.3f}\t{seconds:.4f}\t{os.getpid()}\t{words}\n")


@dataclass(frozen=True)
class Result:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str


def note(argv: Sequence[str], returncode: int, seconds: float) -> None:
    """Put a command run some other way (a line fed to a shell) in the program log."""
    if _PROFILE:
        _profile(argv, seconds)
    commands = _LOG.get()
    if commands is not None:
        commands.append(Command([str(a) for a in argv], returncode, round(seconds, 4)))


def run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    input: str | None = None,
    timeout: float | None = 120.0,
    noted: bool = True,
) -> Result:
    """Run argv and capture its output. Raises CommandError on a non-zero exit when check.
    noted=False: the caller logs it (a batch, a line per command it fed)."""
    full_env = dict(os.environ)
    full_env["LC_ALL"] = "C"
    if env:
        full_env.update(env)
    args = [str(a) for a in argv]
    log.debug("run %s", args)
    start = time.monotonic()
    try:
        proc = subprocess.run(
            args,
            env=full_env,
            input=input,
            # Never our stdin: a tool that turns interactive on a tty (uml_mconsole) would hang.
            stdin=subprocess.DEVNULL if input is None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        raise CommandError(args, 127, f"{args[0]}: command not found") from exc
    except subprocess.TimeoutExpired as exc:
        raise CommandError(args, -1, f"timed out after {timeout}s") from exc
    res = Result(args, proc.returncode, proc.stdout, proc.stderr)
    if noted:
        note(args, proc.returncode, time.monotonic() - start)
    if check and proc.returncode != 0:
        raise CommandError(args, proc.returncode, proc.stderr, proc.stdout)
    return res
