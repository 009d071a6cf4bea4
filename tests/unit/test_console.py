"""Tables in a pipe or a file never cut a name; on a terminal they fit its width."""

from __future__ import annotations

import io

from rich.table import Table

from hvlab.console import console

NAME = "vm01/disk0_with_a_rather_long_name_that_a_log_must_keep_whole"


def _table() -> Table:
    t = Table("disk", "mode", "kind", "mapped MiB", "changed MiB", "read MiB", "seconds")
    t.add_row(NAME, "on-host", "incremental (the reference point is valid)", "64.0", "1.0",
              "1.0", "0.12")
    return t


def test_a_file_gets_every_name_whole() -> None:
    out = io.StringIO()
    console(file=out).print(_table())
    assert NAME in out.getvalue() and "…" not in out.getvalue()


def test_a_terminal_keeps_its_width() -> None:
    out = io.StringIO()
    con = console(file=out, force_terminal=True, width=60, color_system=None)
    con.print(_table())
    assert con.width == 60 and max(map(len, out.getvalue().splitlines())) <= 60
