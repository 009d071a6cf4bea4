"""Where hvlab's tables go: a terminal keeps its width (rich wraps and trims to fit the
screen); a pipe or a file gets plain text as wide as its lines need, so no name is cut to
"vm01/d…" in a log."""

from __future__ import annotations

from typing import Any

from rich.console import Console

WIDE = 1000  # wider than any line of ours: rich sizes tables to their content, not to this


def console(**kw: Any) -> Console:
    """A rich Console for stdout (or kw's file). A width given wins."""
    con = Console(**kw)
    if not con.is_terminal and "width" not in kw:
        con = Console(width=WIDE, **kw)
    return con
