"""The `hvlab` command. User mistakes end in one line on stderr and a non-zero exit."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from hvlab.errors import BadInput, CommandError, HvlabError

# Commands that touch lab devices: on a kernel without dm-thin they run in the lab VM.
LAB_COMMANDS = {"up", "down", "stop", "status", "devices", "guest", "backup", "restore",
                "verify", "runs", "explain", "recover"}
# Commands that must live on in the persistent VM (an ephemeral VM would take the lab down).
NEEDS_PERSISTENT = {"up", "guest", "backup"}


def _echo(msg: str) -> None:
    click.echo(msg)


@contextlib.contextmanager
def _kernel_report() -> Iterator[None]:
    """Print what the kernel says was created and removed (block uevents) during the block."""
    from hvlab.sys.uevents import watch

    with watch() as rec:
        yield
    made, gone = rec.created(), rec.removed()
    changed = sorted({e.devname for e in rec.events if e.action == "change"})
    if made or gone or changed:
        _echo(f"kernel: added {', '.join(made) or '-'}; removed {', '.join(gone) or '-'}; "
              f"changed {', '.join(changed) or '-'}")


def _lab_name(name: str | None) -> str:
    from hvlab.lab.inventory import resolve_name

    return resolve_name(name)


lab_name_opt = click.option("--lab-name", "-n", default=None,
                            help="Lab name (default: the only lab, else 'hvlab').")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hvlab", prog_name="hvlab")
def cli() -> None:
    """hvlab: Hyper-V 2012 R2 host-level VSS backup on real Linux block devices."""


@cli.command()
@click.option("--lab", "lab_file", type=click.Path(path_type=Path), default=None,
              help="Lab definition (TOML). Default: the built-in 2-VM lab.")
@lab_name_opt
@click.option("--backing-size", default=None, help="Override the backing size, e.g. 8G.")
@click.option("--no-guests", is_flag=True, help="Do not start the guest emulators.")
def up(lab_file: Path | None, lab_name: str | None, backing_size: str | None,
       no_guests: bool) -> None:
    """Bring a lab up (or back up after a restart, data intact)."""
    from hvlab.lab import definition, substrate

    defn = definition.load(lab_file, name=lab_name, backing_size=backing_size)
    with _kernel_report():
        substrate.up(defn, start_guests=not no_guests, progress=_echo)


@cli.command()
@lab_name_opt
@click.option("--purge", is_flag=True, help="Also remove the lab's backups (kept by default).")
@click.option("--force", is_flag=True,
              help="Also when a backup run is paused or interrupted (its artifacts go too).")
def down(lab_name: str | None, purge: bool, force: bool) -> None:
    """Remove everything of a lab (devices, mounts, files) and verify nothing is left.
    Backups in the default folder are kept and listed; --purge removes them too."""
    from hvlab.lab import teardown

    lab = _lab_name(lab_name)
    teardown.refuse_under_runs(lab, force=force)
    with _kernel_report():
        teardown.down(lab, progress=_echo, purge=purge)
    _echo("lab removed; nothing left")


@cli.command()
@lab_name_opt
def stop(lab_name: str | None) -> None:
    """Take a lab offline but keep its backing files; `hvlab up` brings it back."""
    from hvlab.lab import teardown

    with _kernel_report():
        teardown.stop(_lab_name(lab_name), progress=_echo)
    _echo("lab stopped; data kept")


@cli.command()
@lab_name_opt
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def devices(lab_name: str | None, as_json: bool) -> None:
    """The device tree: file -> loop -> PV -> VG -> pool -> LV -> controller -> mount."""
    from hvlab.lab import tree

    t = tree.build(_lab_name(lab_name))
    if as_json:
        click.echo(json.dumps(t, indent=2))
    else:
        tree.render(t)


@cli.command()
@lab_name_opt
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(lab_name: str | None, as_json: bool) -> None:
    """Lab state, device tree and guests."""
    from hvlab.lab import tree

    t = tree.build(_lab_name(lab_name))
    if as_json:
        click.echo(json.dumps(t, indent=2))
    else:
        tree.render(t, with_guests=True)


@cli.command()
def doctor() -> None:
    """What this machine can do, what is missing, and how to get it. Tries a real fsfreeze and
    whether a user freeze nests with a dm suspend (in the lab VM where labs run there)."""
    from hvlab.lab import doctor as doc

    ok = doc.render(doc.checks())
    ok = doc.report_probes() and ok
    if not ok:
        sys.exit(1)


@cli.command("doctor-probe", hidden=True)
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Where to write the results (JSON).")
def doctor_probe(out: Path) -> None:
    """doctor's probes on this kernel; doctor runs this inside the lab VM."""
    from hvlab.lab import probe

    out.write_text(probe.to_json(probe.run_here()))


# ------------------------------------------------------------------------------ lab VM
@cli.group()
def vm() -> None:
    """The lab VM (user-mode-linux) for kernels without device-mapper."""


MEM_RE = re.compile(r"([1-9][0-9]{0,5})([MG])")


def _mem(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """UML's mem=: whole MiB or GiB, 256M to 64G (it boots on no less)."""
    if value is None:
        return None
    m = MEM_RE.fullmatch(value)
    if m is None or not 256 <= int(m[1]) << (10 if m[2] == "G" else 0) <= 64 << 10:
        from hvlab.lab.definition import shown

        raise click.BadParameter(f"{shown(value)}: allowed 256M to 64G, a whole number of "
                                 f"M or G")
    return value


@vm.command("up")
@click.option("--mem", default=None, callback=_mem, help="VM memory, 256M to 64G (e.g. 2G).")
def vm_up(mem: str | None) -> None:
    from hvlab.vm import boot, control

    p = control.up(mem=mem or boot.DEFAULT_MEM)
    _echo(f"lab VM is up (pid {control.pid()}, state in {p.root})")


@vm.command("down")
def vm_down() -> None:
    from hvlab.vm import control

    _echo("lab VM stopped" if control.down() else "lab VM was not running")


@vm.command("status")
def vm_status() -> None:
    from hvlab.vm import control, runner

    _echo(f"runner: {runner.choose()}")
    _echo(f"lab VM: {'up, pid ' + str(control.pid()) if control.is_up() else 'down'}")


@vm.command("run", context_settings={"ignore_unknown_options": True})
@click.option("--ephemeral", is_flag=True, help="Boot a fresh VM for this command only.")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
def vm_run(ephemeral: bool, argv: tuple[str, ...]) -> None:
    """Run a command as root in the lab VM; its exit status is ours."""
    from hvlab.vm import control, oneshot

    if ephemeral or not control.is_up():
        sys.exit(oneshot.run_ephemeral(list(argv)))
    sys.exit(control.run_in(list(argv)))


@vm.command("shell")
def vm_shell() -> None:
    """A root shell inside the lab VM (Ctrl-] detaches)."""
    from hvlab.vm import control

    control.shell()


def _register_flow_commands() -> None:
    """backup, restore, verify, runs, explain are in cli/flow.py; the `guest` group in
    cli/guest.py."""
    from hvlab.cli import flow, guest

    for cmd in flow.COMMANDS:
        cli.add_command(cmd)
    cli.add_command(guest.guest)


_register_flow_commands()


def _prevalidate(args: list[str], *, forwarded: bool) -> None:
    """Bad input first, wherever the command runs (and on the host before a lab VM is booted
    for nothing): the options (click), and every value whose check needs no lab (names, run
    ids, steps, fault points, --dest); a forwarded command's paths must be the VM's too."""
    cmd = cli.commands.get(args[0]) if args else None
    if cmd is None:
        return
    parent = click.Context(cli)
    if isinstance(cmd, click.Group):  # guest SUB ...: the group has no options of its own
        rest = list(args[1:])
        if not rest or rest[0].startswith("-"):
            return  # --help, or nothing: the command itself says so
        gctx = click.Context(cmd, info_name=args[0], parent=parent)
        _, sub, _ = cmd.resolve_command(gctx, rest)  # a UsageError names an unknown one
        if sub is None:
            return
        cmd, args, parent = sub, rest, gctx
    ctx = cmd.make_context(args[0], args[1:], parent=parent, resilient_parsing=False)
    params = ctx.params
    if forwarded:
        _check_paths(cmd, params)
    if args[0] == "up":
        from hvlab.lab import definition

        definition.load(params["lab_file"], name=params["lab_name"],
                        backing_size=params["backing_size"])
        return
    _check_values(args[0], params)


def _check_values(command: str, params: dict[str, object]) -> None:
    """The checks of a lab command that need no lab, as the command itself makes them."""
    from hvlab.lab import runs
    from hvlab.lab.definition import check_name

    if params.get("lab_name") is not None:
        check_name("lab", params["lab_name"])
    elif "lab_name" in params and os.environ.get("HVLAB_LAB"):
        check_name("lab", os.environ["HVLAB_LAB"])
    for key in ("vm_name", "as_name", "vm"):  # guest VM, restore --as and --vm
        if isinstance(params.get(key), str):
            check_name("VM", params[key])
    for key in ("resume_id", "abort_id", "run_id"):
        if isinstance(params.get(key), str):
            runs.check_id(str(params[key]))
    ids = params.get("run_ids")
    run_ids = ids if isinstance(ids, tuple) else ()  # explain RUN [RUN ...]
    for run_id in run_ids:
        runs.check_id(str(run_id))
    if command == "explain":
        from hvlab.cli.flow import explain_runs

        explain_runs(len(run_ids), bool(params.get("compare")))
    if params.get("backup_ref") == "":
        raise BadInput("BACKUP must name a backup directory or a finished run id, not ''")
    if command == "backup":
        _check_backup(params)


def _check_backup(params: dict[str, Any]) -> None:
    from hvlab.cli.flow import request_of

    request_of(**params).check()


def _check_paths(cmd: click.Command, params: dict[str, object]) -> None:
    """Every path the user gives must name the same file inside the lab VM."""
    from hvlab.vm.boot import check_visible

    check_visible(Path(os.getcwd()))  # relative paths resolve against it, inside too
    for p in cmd.params:
        value = params.get(p.name or "")
        if value and (isinstance(p.type, click.Path) or (
                p.name == "backup_ref" and "/" in str(value))):
            check_visible(Path(str(value)))


def _forward(args: list[str]) -> int:
    """Run this same hvlab command inside the lab VM."""
    from hvlab.vm import control, oneshot

    argv = [sys.executable, "-m", "hvlab.cli", *args]
    if control.is_up():
        return control.run_in(argv)
    if args and args[0] in NEEDS_PERSISTENT:
        click.echo("hvlab: this kernel has no device-mapper; starting the lab VM", err=True)
        control.up()
        return control.run_in(argv)
    return oneshot.run_ephemeral(argv)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args and args[0] in LAB_COMMANDS and "-h" not in args and "--help" not in args:
            from hvlab.vm import runner

            where = runner.choose()
            _prevalidate(args, forwarded=where == "uml")
            if where == "uml":
                sys.exit(_forward(args))
            if where == "none":
                raise HvlabError("no way to run a lab here: need root and dm-thin, or Debian's "
                                 "user-mode-linux for the lab VM (`hvlab doctor` says more)")
            if os.geteuid() != 0:
                raise HvlabError("lab commands need root (loop devices, LVM, mounts)")
        cli.main(args=args, prog_name="hvlab", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("hvlab: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        click.echo(f"hvlab: {exc.format_message()}", err=True)
        sys.exit(2)
    except BadInput as exc:
        click.echo(f"hvlab: {exc}", err=True)
        sys.exit(exc.exit_code)
    except CommandError as exc:
        click.echo(f"hvlab: {exc}", err=True)
        if os.environ.get("HVLAB_VERBOSE"):
            click.echo(f"  argv: {exc.argv}\n  stderr: {exc.stderr.strip()}", err=True)
        sys.exit(1)
    except HvlabError as exc:
        click.echo(f"hvlab: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("hvlab: interrupted", err=True)
        sys.exit(130)
    except (TimeoutError, OSError) as exc:
        # The environment, not our logic: a device node that never came, a directory we
        # may not write. One line; HVLAB_VERBOSE=1 shows where.
        click.echo(f"hvlab: {exc}", err=True)
        if os.environ.get("HVLAB_VERBOSE"):
            import traceback

            traceback.print_exc()
        sys.exit(1)
