"""Typed errors. HvlabError is a user-facing failure: the CLI prints its message on one line."""

from __future__ import annotations

from collections.abc import Sequence


class HvlabError(Exception):
    """A failure the user can act on; printed as one line, exit code 2 (bad input) or 1."""

    exit_code = 1


class BadInput(HvlabError):
    """The user asked for something invalid; nothing was changed."""

    exit_code = 2


class CommandError(HvlabError):
    """An external command failed. Carries argv, exit code and stderr (as avocado/blivet do)."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str, stdout: str = "") -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        self.stdout = stdout
        last = stderr.strip().splitlines()[-1] if stderr.strip() else "(no stderr)"
        super().__init__(f"{argv[0]} failed (exit {returncode}): {last}")


class LeakError(HvlabError):
    """Something the lab owns is still present after a removal that should have taken it."""
