"""`hvlab guest ...`: the guest emulators of a lab that is up (registered by hvlab.cli)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from hvlab.console import console as make_console
from hvlab.errors import BadInput, HvlabError

if TYPE_CHECKING:
    from hvlab.lab.handle import Lab

lab_name_opt = click.option("--lab-name", "-n", default=None,
                            help="Lab name (default: the only lab, else 'hvlab').")
_echo = click.echo


@click.group()
def guest() -> None:
    """The guest emulators (one per VM): integration services, writers, workloads."""


def _lab(lab_name: str | None) -> Lab:
    from hvlab.lab.handle import Lab
    from hvlab.lab.inventory import resolve_name

    return Lab.open(resolve_name(lab_name))


@guest.command("status")
@lab_name_opt
@click.option("--json", "as_json", is_flag=True)
def guest_status(lab_name: str | None, as_json: bool) -> None:
    """State, writers, ops/s, frozen or not, per VM."""
    from rich.table import Table

    from hvlab.guest.supervise import guest_status as status_of

    lab = _lab(lab_name)
    defn, names = lab.state.definition, lab.names
    rows = {vm.name: status_of(names.guest_dir(vm.name)) for vm in defn.vms}
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    table = Table(title=f"guests of lab {names.lab}")
    for col in ("VM", "profile", "alive", "pid", "state", "frozen", "txid", "ops/s", "writers"):
        table.add_column(col)
    for vm in defn.vms:
        r = rows[vm.name]
        st = r.get("status") or {}
        writers = ", ".join(_writer_cell(w) for w in st.get("writers", []))
        table.add_row(vm.name, vm.profile, str(r.get("alive")), str(r.get("pid") or "-"),
                      str(st.get("state", "-")), str(st.get("frozen", "-")),
                      str(st.get("committed_txid", "-")), str(st.get("ops_per_s", "-")), writers)
    make_console().print(table)


def _writer_cell(w: dict[str, Any]) -> str:
    """name:ops, and what fails while a writer's ops fail on I/O errors (a full pool)."""
    cell = f"{w.get('name')}:{w.get('ops', '')}"
    if w.get("io_error"):
        cell += f" FAILING ({w['io_error']}, {w.get('failed_ops')} failed)"
    elif w.get("failed_ops"):
        cell += f" ({w['failed_ops']} failed)"
    return cell


@guest.command("start")
@click.argument("vm_name")
@lab_name_opt
def guest_start(vm_name: str, lab_name: str | None) -> None:
    """Start the guest emulator of VM (no-op if it runs)."""
    from hvlab.guest.supervise import start_guest
    from hvlab.lab import guests

    lab = _lab(lab_name)
    defn, names = lab.state.definition, lab.names
    defn.vm(vm_name)  # BadInput for a VM the lab does not have
    names.guest_dir(vm_name).mkdir(parents=True, exist_ok=True)
    pid = start_guest(guests.config_for(defn, names, vm_name))
    _echo(f"guest {vm_name} running (pid {pid})")


@guest.command("reboot")
@click.argument("vm_name")
@lab_name_opt
def guest_reboot(vm_name: str, lab_name: str | None) -> None:
    """Reboot VM after a filesystem error (ext4 read-only after an I/O error, xfs shut
    down): its guest stopped, each disk unmounted, repaired (e2fsck -fy, xfs_repair) and
    mounted again, its guest started. Refused while the VM is in a backup."""
    from hvlab.lab import guests, runs
    from hvlab.lab.state import locked

    lab = _lab(lab_name)
    defn, names = lab.state.definition, lab.names
    defn.vm(vm_name)  # BadInput for a VM the lab does not have
    with runs.VmLocks(names, [vm_name]), locked(lab.name):
        busy = [r.id for r in runs.active_runs(names) if vm_name in r.vms]
        if busy:
            raise BadInput(f"VM {vm_name} is in backup {busy[0]} "
                           f"({runs.effective_state(runs.load(names, busy[0]))}): finish or "
                           f"abort it first (`hvlab backup --abort {busy[0]}`)")
        for line in guests.reboot(defn, names, vm_name):
            _echo(line)
    _echo(f"guest {vm_name} rebooted")


def _finite(_ctx: click.Context, _param: click.Parameter, value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):  # nan passes FloatRange
        raise click.BadParameter(f"{value} is not a number in (0, 10000]")
    return value


@guest.command("workload")
@click.argument("vm_name")
@lab_name_opt
@click.option("--ops-per-s", type=click.FloatRange(min=0, max=10000, min_open=True),
              default=None, callback=_finite,
              help="New rate for the chosen writers, in (0, 10000].")
@click.option("--pause/--resume", "pause", default=None, help="Hold or release the writers.")
@click.option("--writer", default=None, help="One writer by name (default: all).")
def guest_workload(vm_name: str, lab_name: str | None, ops_per_s: float | None,
                   pause: bool | None, writer: str | None) -> None:
    """Change a running guest's workload: pause/resume writers, set their rate."""
    from hvlab.guest.client import GuestClient, GuestError
    from hvlab.lab import guests

    lab = _lab(lab_name)
    names = lab.names
    if lab.state.definition.vm(vm_name).profile == "none":
        raise BadInput(f"VM {vm_name} has profile none: no integration-services channel")
    if ops_per_s is None and pause is None:
        raise BadInput("give --ops-per-s RATE and/or --pause/--resume")
    try:
        rep = GuestClient(guests.socket_path(names, vm_name)).workload(
            pause=pause, ops_per_s=ops_per_s, writer=writer)
    except GuestError as exc:
        if exc.code == "bad_args":  # a writer it does not have: say which it has
            try:
                have = [w.get("name") for w in GuestClient(
                    guests.socket_path(names, vm_name)).status().get("writers", [])]
            except GuestError:
                have = []
            raise BadInput(f"guest {vm_name}: {exc}" + (
                f" (its writers: {', '.join(map(str, have))})" if have else "")) from None
        raise HvlabError(f"guest {vm_name}: {exc}") from None
    for w in rep["writers"]:
        _echo(f"{w.get('name')}: {w.get('state')}, target {w.get('target_ops_per_s')} ops/s, "
              f"now {w.get('ops_per_s')} ops/s")


@guest.command("stop")
@click.argument("vm_name")
@lab_name_opt
def guest_stop(vm_name: str, lab_name: str | None) -> None:
    """Stop the guest emulator of VM (thaws first if it is frozen)."""
    from hvlab.guest.supervise import stop_guest

    lab = _lab(lab_name)
    lab.state.definition.vm(vm_name)  # BadInput for a VM the lab does not have
    stop_guest(lab.names.guest_dir(vm_name), 10.0)
    _echo(f"guest {vm_name} stopped")


@guest.command("check")
@click.argument("roots", nargs=-1, required=True, type=click.Path(path_type=Path))
def guest_check(roots: tuple[Path, ...]) -> None:
    """The writers' consistency check on a VM's disks mounted at ROOTS (in disk order: the
    ledger's WAL is on the first, its pages on the last). Reads only; exit 1 if inconsistent."""
    from hvlab.guest import ledger

    for r in roots:
        if not r.is_dir():
            raise BadInput(f"{r} is not a directory (mount the disk there first)")
    named = {f"disk{i}": r for i, r in enumerate(roots)}
    wal, pages = ledger.ledger_paths(named)
    res = ledger.check(named)
    _echo(f"ledger: WAL {wal}, pages {pages}: "
          f"{'consistent' if res.consistent else 'INCONSISTENT'}")
    _echo(f"  last committed txid {res.last_txid} ({res.committed} commits in the WAL)")
    _echo(f"  unfinished transaction: {res.unfinished if res.unfinished is not None else '-'}")
    for p in res.problems:
        _echo(f"  problem: {p}")
    excluded = sorted(str(f) for r in roots
                      for f in (r / ledger.SCRATCH_DIR).glob(ledger.SCRATCH_GLOB))
    _echo(f"excluded files ({ledger.SCRATCH_DIR}/{ledger.SCRATCH_GLOB}): {len(excluded)}")
    if not res.consistent:
        raise SystemExit(1)
