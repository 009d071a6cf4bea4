"""CLI commands of the backup flow (registered by harness.cli)."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
