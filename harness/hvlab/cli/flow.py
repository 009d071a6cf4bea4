"""CLI commands of the backup flow (registered by hvlab.cli)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import click

from hvlab.console import console as make_console
from hvlab.errors import BadInput
from hvlab.flow.request import BackupRequest
from hvlab.lab.paths import Names
from hvlab.lab.record import Run


def _lab(name: str | None) -> str:
    from hvlab.lab.inventory import resolve_name

    return resolve_name(name)


lab_opt = click.option("--lab-name", "-n", default=None,
                       help="Lab name (default: the only lab, else 'hvlab').")


def _paused(run: Run, lab: str) -> None:
    from hvlab.flow.engine import describe_devices
    from hvlab.lab.paths import Names

    click.echo(f"run {run.id} paused after step {run.last_step}; "
               f"every artifact is in place:")
    for path, role, note in describe_devices(run, Names(lab)):
        click.echo(f"  {path:<60} {role}{'  (' + note + ')' if note else ''}")
    click.echo(f"continue: hvlab backup --resume {run.id}    "
               f"unwind: hvlab backup --abort {run.id}")


def request_of(vms: tuple[str, ...], dest: Path | None, pause_after: int | None,
               resume_id: str | None, abort_id: str | None, no_fingerprints: bool,
               app_aware: str, metadata_limit: int | None, mode: str | None,
               incremental: bool, inject: str | None, model: str | None = None,
               **_: object) -> BackupRequest:
    """`hvlab backup`'s options as the engine's request (checked by the caller: the command
    itself, and the pre-check on the host before a lab VM is booted)."""
    return BackupRequest(vms=tuple(vms), resume=resume_id, abort=abort_id, dest=dest,
                         pause_after=pause_after, fingerprints=not no_fingerprints,
                         app_aware=app_aware, mode=mode, incremental=incremental,
                         model=model, metadata_limit=metadata_limit, inject=inject)


def _unwind_on_signals() -> None:
    """SIGTERM (the lab VM's agent passing on a Ctrl-C, or its client being gone) and SIGHUP
    (a closed terminal) end a backup the way Ctrl-C does: the run unwinds, then exit 130.
    Later signals are ignored so they cannot cut the unwind short."""
    owner = os.getpid()

    def interrupt(signum: int, _frame: object) -> None:
        if os.getpid() != owner:  # a forked helper (pyroute2's, a guard) told to stop: stop
            os._exit(128 + signum)
        for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)
        raise KeyboardInterrupt(f"signal {signum}")

    for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(s, interrupt)


@click.command()
@click.argument("vms", nargs=-1)
@lab_opt
@click.option("--dest", type=click.Path(path_type=Path), default=None,
              help="Backup directory (default: $HVLAB_HOME/backups/<lab>/<run id>, kept by "
                   "`hvlab down`); must not exist.")
@click.option("--pause-after", type=int, default=None,
              help="Stop after step N (not 4-7) with every artifact in place.")
@click.option("--resume", "resume_id", default=None, help="Continue a paused run.")
@click.option("--abort", "abort_id", default=None, help="Unwind a paused or interrupted run.")
@click.option("--no-fingerprints", is_flag=True, help="Skip the content hashes.")
@click.option("--app-aware", type=click.Choice(["require", "try", "off"]), default="try",
              show_default=True,
              help="Application-aware processing: require it (fail if the guest cannot "
                   "quiesce), try it (fall back to crash-consistent, labelled), or off.")
@click.option("--metadata-limit", type=click.IntRange(1, 100), default=None, metavar="PERCENT",
              help="Refuse to start (nothing made, exit 2) when the thin pool's metadata is "
                   "this full or more (default 80), or when this backup's worst case would "
                   "take it past 100%; a pool whose data is full or that LVM reports out of "
                   "data, read-only or failed is always refused.")
@click.option("--mode", type=click.Choice(["on-host", "off-host"]), default=None,
              help="Step 13's backup mode: read S here (on-host, the default) or export it "
                   "over NBD to a proxy in its own network namespace (off-host).")
@click.option("--incremental", is_flag=True,
              help="Read only what changed since each disk's reference point (the last "
                   "incremental-chain backup), and keep a new one; a disk with no valid "
                   "reference is backed up in full, and the manifest says why.")
@click.option("--model", default=None, metavar="2012|2012r2|2016",
              help="The Hyper-V generation to reproduce (default 2012r2): 2012 (and 2008 R2: "
                   "the guest's own shadow copy, the host's rolled back to it), 2012r2 (backup "
                   "and auto-recovery checkpoints, host shadow copy), 2016 (recovery "
                   "checkpoint read directly, reference points).")
@click.option("--inject", default=None, hidden=True,
              help="POINT:ACTION[,...]: kill, raise or hang at a named fault point.")
def backup(vms: tuple[str, ...], lab_name: str | None, dest: Path | None,
           pause_after: int | None, resume_id: str | None, abort_id: str | None,
           no_fingerprints: bool, app_aware: str, metadata_limit: int | None,
           mode: str | None, incremental: bool, model: str | None,
           inject: str | None) -> None:
    """Back up VMs the way Hyper-V (2012 R2's 14 steps by default, --model for 2012 or 2016)
    does, on real thin snapshots."""
    from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

    from hvlab.flow import engine, faults

    req = request_of(vms, dest, pause_after, resume_id, abort_id, no_fingerprints,
                     app_aware, metadata_limit, mode, incremental, inject, model).check()
    if inject is not None:
        os.environ[faults.ENV] = inject
    _unwind_on_signals()

    lab = _lab(lab_name)
    if abort_id:
        run = engine.abort(lab, abort_id, say=click.echo)
        click.echo(f"run {abort_id} aborted; live disks whole")
        return
    # Every read shows bytes, rate and time left on a terminal (rich draws nothing in a pipe).
    with Progress(*Progress.get_default_columns(), DownloadColumn(binary_units=True),
                  TransferSpeedColumn(), transient=True) as prog:
        if resume_id:
            run = engine.resume(lab, resume_id, say=prog.console.print,
                                fingerprints=not no_fingerprints, progress=prog,
                                pause_after=pause_after)
        else:
            run = engine.start(lab, list(req.vms), dest=req.dest, pause_after=req.pause_after,
                               say=prog.console.print, fingerprints=req.fingerprints,
                               progress=prog, app_aware=req.app_aware,
                               mode=req.mode or "on-host", incremental=req.incremental,
                               metadata_limit=req.limit, model=req.model or "2012r2")
    if run.state == "paused":
        _paused(run, lab)
        return
    classes = {vm: run.vm[vm].cls for vm in run.vms}
    _summary(run)
    click.echo(f"run {run.id} done: {run.dest}  "
               + ", ".join(f"{k}: {v}" for k, v in classes.items()))


def _summary(run: Run) -> None:
    """Per disk: how it was read and what it cost (rich: a table on a terminal, plain text in
    a pipe or a file)."""
    from rich.table import Table

    mib = 2 ** 20
    t = Table("disk", "mode", "kind", "mapped MiB", "changed MiB", "read MiB",
              "over the link MiB", "seconds", title=f"run {run.id}", title_justify="left")
    for key, img in run.images.items():
        mapped = img.get("mapped_bytes", img["mapped_blocks"] * img["block_bytes"]) / mib
        link = f"{img['bytes_read'] / mib:.1f}" if img.get("read_by") == "proxy" else "-"
        c = img.get("chain") or {}
        kind = c.get("kind", "full") + (f" ({c['reason']})" if run.incremental else "")
        changed = f"{c['changed_bytes'] / mib:.1f}" if "changed_bytes" in c else "-"
        t.add_row(key, run.mode, kind, f"{mapped:.1f}", changed,
                  f"{img['bytes_read'] / mib:.1f}", link, f"{img.get('seconds', 0):.2f}")
    if run.link and "link_bytes" in run.link:
        t.caption = (f"off-host: {run.link['nbd_bytes'] / mib:.1f} MiB over NBD, "
                     f"{run.link['link_bytes'] / mib:.1f} MiB on the veth (with TCP/IP)")
    make_console().print(t)


@click.command()
@click.argument("backup_ref", metavar="BACKUP")
@click.option("--as", "as_name", required=True, help="Name of the new VM disk set.")
@click.option("--vm", default=None, help="Which VM of a multi-VM backup.")
@lab_opt
def restore(backup_ref: str, as_name: str, vm: str | None, lab_name: str | None) -> None:
    """Create new thin LVs <NAME>_<disk> (and controllers) from a backup; starts no guest."""
    from hvlab.backup.restore import restore as do_restore

    rec = do_restore(_lab(lab_name), backup_ref, as_name, vm)
    click.echo(f"restored {rec['vm']} from {rec['run']} as {as_name} ({rec['consistency']}):")
    for c in rec["controllers"]:
        click.echo(f"  {c}")


@click.command()
@click.argument("backup_ref", metavar="BACKUP")
@lab_opt
@click.option("--json", "as_json", is_flag=True)
def verify(backup_ref: str, lab_name: str | None, as_json: bool) -> None:
    """Checksums, then restore to a temporary LV: fsck -n, mount read-only, ledger check."""
    from hvlab.backup.restore import verify as do_verify

    rep = do_verify(_lab(lab_name), backup_ref)
    if as_json:
        click.echo(json.dumps(rep, indent=2))
    else:
        for r in rep["vms"]:
            sums = "ok" if all(c["ok"] for c in r["checksums"]) else "MISMATCH"
            click.echo(f"{r['vm']} ({r['consistency']}): checksums {sums}")
            for c in r["checksums"]:
                if not c["ok"]:
                    click.echo(f"  {c['disk']}: image {c['image']}: {c['problem']}")
            for d in r["disks"]:
                click.echo(f"  {d['disk']} {d['fs']}: fsck -n "
                           f"{'clean' if d['fsck_clean'] else 'NOT clean'}, read-only mount "
                           f"{'ok' if d['mounted_ro'] else 'FAILED'}")
            led = r.get("ledger")
            if led:
                click.echo(f"  ledger: {'consistent' if led['consistent'] else 'INCONSISTENT'}"
                           f" (last txid {led['last_txid']}, {led['committed']} committed)"
                           + (f" {led['problems'][:2]}" if led["problems"] else ""))
            click.echo(f"  => {'OK' if r.get('ok') else 'FAILED'}")
    if not rep["ok"]:
        bad = [c for r in rep["vms"] for c in r["checksums"] if not c["ok"]]
        click.echo("hvlab: verify FAILED" + (f": damaged image {bad[0]['image']} "
                                             f"({bad[0]['problem']})" if bad else ""), err=True)
        raise SystemExit(1)


@click.command("runs")
@lab_opt
@click.option("--json", "as_json", is_flag=True)
def runs_cmd(lab_name: str | None, as_json: bool) -> None:
    """Backup runs: id, VMs, mode, state, consistency."""

    from hvlab.lab import runs
    from hvlab.lab.paths import Names
    from hvlab.report import explain

    rows = runs.all_runs(Names(_lab(lab_name)))
    if as_json:
        click.echo(json.dumps([{**r.to_dict(), "state": runs.effective_state(r)} for r in rows],
                              indent=2))
        return
    make_console().print(explain.runs_table(rows))


def _out_path(opt: str, value: Path | None) -> Path | None:
    """An output file as an absolute path (what `saved ...` prints), its directory existing."""
    if value is None:
        return None
    path = Path(os.path.abspath(value.expanduser()))  # the user's words, not symlinks
    if not path.parent.is_dir():
        raise BadInput(f"cannot write {opt} {path}: no directory {path.parent}")
    return path


out_file = click.Path(dir_okay=False, path_type=Path)


@click.command()
@click.argument("run_ids", metavar="RUN [RUN ...]", nargs=-1, required=True)
@lab_opt
@click.option("--compare", is_flag=True,
              help="Runs of different Hyper-V generations (--model) side by side: a lane "
                   "per run on a shared axis of phases, as a table (and --png/--svg).")
@click.option("--json", "as_json", is_flag=True, help="The raw events.")
@click.option("--png", type=out_file, default=None,
              help="Save the timeline picture (lanes over seconds, freeze window) as PNG.")
@click.option("--svg", type=out_file, default=None, help="The same picture as SVG.")
@click.option("--table-svg", type=out_file, default=None,
              help="Save the terminal tables as an SVG screenshot.")
@click.option("--commands", "show_commands", is_flag=True,
              help="The exact commands each step ran (lvcreate, thin tools), ready to "
                   "copy; its device-mapper ioctls as comments.")
def explain(run_ids: tuple[str, ...], lab_name: str | None, compare: bool, as_json: bool,
            show_commands: bool, png: Path | None,
            svg: Path | None, table_svg: Path | None) -> None:
    """The timeline of a run: what B, C, A, S held at each step, and where writes went;
    with --compare, runs of the three Hyper-V generations side by side."""
    from rich.console import Console

    from hvlab.lab import runs
    from hvlab.lab.paths import Names
    from hvlab.report import explain as ex

    png, svg = _out_path("--png", png), _out_path("--svg", svg)
    table_svg = _out_path("--table-svg", table_svg)
    if as_json and (png or svg or table_svg or show_commands or compare):
        raise BadInput("--json prints the raw events; use it alone")
    explain_runs(len(run_ids), compare)
    if compare:
        if show_commands:
            raise BadInput("--commands shows one run; not with --compare")
        _compare(Names(_lab(lab_name)), run_ids, png, svg, table_svg)
        return
    (run_id,) = run_ids
    names = Names(_lab(lab_name))
    record = runs.load(names, run_id)
    evs = runs.events(names, run_id)
    if as_json:
        click.echo(json.dumps({"run": record.to_dict(), "events": [e.to_dict() for e in evs]},
                              indent=2))
        return
    if show_commands:
        for line in ex.command_lines(record, evs):
            click.echo(line)
        return
    width = int(os.environ.get("COLUMNS", "0") or 0) or 200
    con = Console(width=width, record=table_svg is not None)
    ex.render_explain(record, evs, con)
    saved = []
    if table_svg is not None:
        try:
            con.save_svg(str(table_svg), title=f"hvlab explain {run_id}")
        except OSError as exc:
            raise BadInput(f"cannot write --table-svg {table_svg}: {exc.strerror}") from None
        saved.append(table_svg)
    for fmt, path in (("png", png), ("svg", svg)):
        if path is not None:
            from hvlab.report import draw

            try:
                draw.save(record, evs, path, fmt, state=runs.effective_state(record))
            except OSError as exc:
                raise BadInput(f"cannot write --{fmt} {path}: {exc.strerror or exc}") from None
            saved.append(path)
    for path in saved:
        click.echo(f"saved {path}")


def explain_runs(n: int, compare: bool) -> None:
    """One run, or (--compare) two or more."""
    if compare and n < 2:
        raise BadInput("--compare needs two runs or more (one per Hyper-V generation)")
    if not compare and n != 1:
        raise BadInput(f"explain takes one run ({n} given): --compare for several")


def _compare(names: Names, run_ids: tuple[str, ...], png: Path | None, svg: Path | None,
             table_svg: Path | None) -> None:
    from rich.console import Console

    from hvlab.lab import runs
    from hvlab.report import compare

    ls = compare.lanes([(runs.load(names, r), runs.events(names, r)) for r in run_ids])
    width = int(os.environ.get("COLUMNS", "0") or 0) or 60 + 44 * len(ls)
    con = Console(width=width, record=table_svg is not None)
    con.print(compare.table(ls))
    saved = []
    if table_svg is not None:
        con.save_svg(str(table_svg), title="hvlab explain --compare")
        saved.append(table_svg)
    for fmt, path in (("png", png), ("svg", svg)):
        if path is not None:
            from hvlab.report import compare_draw

            try:
                compare_draw.save(ls, path, fmt)
            except OSError as exc:
                raise BadInput(f"cannot write --{fmt} {path}: {exc.strerror or exc}") from None
            saved.append(path)
    for path in saved:
        click.echo(f"saved {path}")


@click.command()
@lab_opt
def recover(lab_name: str | None) -> None:
    """Find what dead backup runs left (checkpoints, snapshots, attach devices, a held
    metadata snapshot, frozen guests), say what each is in Hyper-V's terms, and clean it:
    merge a checkpoint the guest wrote to, remove the rest. Exit 1 if anything is left."""
    from hvlab.flow.recover import recover as do_recover

    rep = do_recover(_lab(lab_name), say=click.echo)
    for line in rep.done:
        click.echo(line)
    for line in rep.left:
        click.echo(f"left: {line}")
    if not rep.done and not rep.left:
        click.echo("nothing to recover")
    if rep.left:
        raise SystemExit(1)


COMMANDS: list[click.Command] = [backup, restore, verify, runs_cmd, explain, recover]
