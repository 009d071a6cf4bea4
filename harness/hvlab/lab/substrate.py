"""The storage substrate: backing files -> loops -> PV/VG -> thin pool -> thin LVs ->
virtual controllers (dm-linear) -> filesystems -> mounts.

`up` rolls back what it made on failure; `down` discovers by prefix/path (not only from the
state file), removes in reverse order and verifies that nothing of the lab is left.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from hvlab.errors import BadInput, CommandError, HvlabError, LeakError
from hvlab.lab import guests, links, live
from hvlab.lab.definition import LabDef
from hvlab.lab.paths import ROLE_TAG, Names, refuse_links, refuse_links_in_lab
from hvlab.lab.state import State, locked
from hvlab.sys import dm, fs, loop, private
from hvlab.sys.lvm import Lvm
from hvlab.sys.run import Result
from hvlab.sys.uevents import wait_node

Progress = Callable[[str], None]
T = TypeVar("T")


def _quiet(_: str) -> None:
    pass


def lvm_for(names: Names) -> Lvm:
    return Lvm(names.lvm_dir)


@dataclass
class Inventory:
    """What of a lab exists right now, found by ownership (path, prefix, uuid), not by memory."""

    loops: list[loop.Loop] = field(default_factory=list)
    dm_devices: list[dm.DmDevice] = field(default_factory=list)
    mounts: list[fs.Mount] = field(default_factory=list)
    guests: list[int] = field(default_factory=list)
    links: list[str] = field(default_factory=list)  # off-host: namespaces, stray veths

    def empty(self) -> bool:
        return not (self.loops or self.dm_devices or self.mounts or self.guests or self.links)

    def describe(self) -> str:
        parts = [lo.name for lo in self.loops] + [d.name for d in self.dm_devices]
        parts += [m.target for m in self.mounts] + [f"guest pid {p}" for p in self.guests]
        return ", ".join(parts + self.links)


def owned_dm(names: Names, loops: list[loop.Loop] | None = None) -> list[dm.DmDevice]:
    """The lab's dm devices, by ownership, never by name alone: ours carry the lab's uuid
    prefix (PVs, controllers, attach devices); LVM's carry its LVM- uuid, a name in the lab's
    VG, and sit on nothing but the lab's own loops. A device that merely looks like ours by
    name (hvlab_<lab>_x made by someone else) is left alone."""
    loops = loop.loops_under(names.dir) if loops is None else loops
    ours_below = {Path(lo.name).name for lo in loops}

    def ours(d: dm.DmDevice) -> bool:
        if d.uuid.startswith(names.uuid_prefix):
            return True
        if not (d.uuid.startswith("LVM-") and d.name.startswith(names.dm_prefixes[0])):
            return False
        leaves = dm.leaves(d)
        return bool(leaves) and leaves <= ours_below

    return [d for d in dm.list_devices() if ours(d)]


def inventory(lab: str) -> Inventory:
    names = Names(lab)
    # By path even when the directory is gone: a loop on a deleted backing file is ours too.
    loops = loop.loops_under(names.dir)
    return Inventory(
        loops=loops,
        dm_devices=owned_dm(names, loops),
        mounts=fs.mounts_under(names.dir),
        guests=guests.running_pids(names),
        links=links.owned(names),
    )


def is_up(lab: str) -> bool:
    st = State.load(lab)
    return st is not None and st.phase == "up" and bool(inventory(lab).loops)


# --------------------------------------------------------------------------------------- up
def _bind(fn: Callable[[T], None], arg: T) -> Callable[[], None]:
    return lambda: fn(arg)


class _Undo:
    """Undo actions registered right after each creation; run in reverse on failure.

    Used as `with _Undo() as undo:` by both `up` paths: on any failure inside, every action
    runs, the original error is re-raised, and what the rollback could not undo is reported
    with it."""

    def __init__(self) -> None:
        self.actions: list[tuple[str, Callable[[], None]]] = []

    def __enter__(self) -> _Undo:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is None:
            return
        errors = self.run()
        if errors:
            raise HvlabError(f"up failed ({exc}) and rollback left: {'; '.join(errors)}") from exc

    def push(self, what: str, fn: Callable[[], None]) -> None:
        self.actions.append((what, fn))

    def run(self) -> list[str]:
        errors = []
        for what, fn in reversed(self.actions):
            try:
                fn()
            except Exception as exc:  # keep unwinding; report every failure
                errors.append(f"{what}: {exc}")
        return errors


def up(defn: LabDef, *, start_guests: bool = True, progress: Progress = _quiet) -> State:
    """Bring a lab up: create it, or re-attach an existing one (after a restart) with data."""
    names = Names(defn.name)
    refuse_links_in_lab(names)  # before even reading it: a symlinked lab folder is refused
    orphaned = names.dir.exists() and not names.state_file.exists()
    if orphaned and (not inventory(defn.name).empty() or names.backing_dir.exists()):
        raise BadInput(f"lab {defn.name!r} has leftovers but no state file: "
                       f"run `hvlab down --lab-name {defn.name}` first")
    with locked(defn.name):
        st = State.load(defn.name)
        if st is not None:
            if st.phase == "creating" or st.phase == "removing":
                raise BadInput(f"lab {defn.name!r} was left {st.phase} by an interrupted "
                               f"command: run `hvlab down --lab-name {defn.name}` first")
            if st.definition != defn:
                raise BadInput(f"lab {defn.name!r} already exists with a different definition: "
                               f"use the same lab file, or `hvlab down` it first")
            if st.phase == "up" and inventory(defn.name).loops:
                raise BadInput(f"lab {defn.name!r} is already up (hvlab status shows it)")
            return _restart(st, names, start_guests, progress)
        return _create(defn, names, start_guests, progress)


def _attach_all(st: State, names: Names, undo: _Undo) -> list[str]:
    """Loop per backing file, and over each a dm-linear PV (lvm2's test suite's habit): a
    fault target (error, delay, dust) can replace its table under a live pool."""
    devs = []
    for i in range(st.definition.backing_files):
        dev = loop.attach(names.backing_file(i))
        undo.push(f"detach {dev}", _bind(loop.detach, dev))
        pv = dm.create_linear(names.pv(i), dev, uuid=names.pv_uuid(i))
        undo.push(f"remove {names.pv(i)}", _bind(dm.remove, names.pv(i)))
        devs.append(pv)
    return devs


def _create(defn: LabDef, names: Names, start_guests: bool, progress: Progress) -> State:
    st = State(defn, phase="creating")
    with _Undo() as undo:
        private.make_dirs(names.dir)  # 0700, as every folder and file below is root's only
        st.save()
        undo.push("remove lab directory", lambda: shutil.rmtree(names.dir, ignore_errors=True))
        private.make_dirs(names.backing_dir)
        per_file = defn.backing_size // defn.backing_files
        for i in range(defn.backing_files):
            fd = private.open_file(names.backing_file(i), os.O_WRONLY | os.O_TRUNC)  # 0600
            try:
                os.ftruncate(fd, per_file)  # sparse
            finally:
                os.close(fd)
        progress(f"backing files: {defn.backing_files} x {per_file >> 20} MiB (sparse)")
        devs = _attach_all(st, names, undo)
        progress(f"PVs: {' '.join(devs)} (dm-linear over loops)")
        lvm = lvm_for(names)
        lvm.write_config(devs)
        undo.push(f"remove VG {names.vg}", lambda: _deactivate(names))
        disks = [(vm, disk, names.lv(vm.name, disk.name)) for vm, disk in defn.disks()]
        # VG (its PVs too), pool and thin LVs in one lvm process. A full pool must fail
        # writes at once, not queue them for 60 s (that hangs filesystems).
        _batch(names, lvm, [["vgcreate", "-q", "--addtag", names.tag, names.vg, *devs],
                            ["lvcreate", "-q", "--type", "thin-pool", "-l", "90%VG",
                             "--chunksize", "64k", "-Zn", "--addtag", names.tag,
                             "-n", names.pool, names.vg],
                            ["lvchange", "-q", "--errorwhenfull", "y",
                             f"{names.vg}/{names.pool}"],
                            *[["lvcreate", "-q", "-V", f"{disk.size}b", "-T",
                               f"{names.vg}/{names.pool}", "-n", lv, "--addtag", names.tag,
                               "--addtag", ROLE_TAG["B"], "--addtag", f"vm_{vm.name}",
                               "--addtag", f"disk_{disk.name}"] for vm, disk, lv in disks]],
               [names.pool] + [lv for *_, lv in disks], error_when_full=names.pool)
        progress(f"thin pool {names.vg}/{names.pool}")
        for _vm, disk, lv in disks:
            wait_node(names.lv_path(lv))
            progress(f"thin LV {lv} ({disk.size >> 20} MiB virtual)")
        _controllers(defn, names, undo)
        for vm, disk in defn.disks():
            fs.mkfs(f"/dev/mapper/{names.ctl(vm.name, disk.name)}", disk.fs,
                    f"{vm.name}{disk.name}")
            progress(f"mkfs.{disk.fs} {vm.name}/{disk.name}")
        _go_live(st, names, undo, start_guests)
        progress(f"lab {defn.name} is up")
        return st


def _go_live(st: State, names: Names, undo: _Undo, start_guests: bool) -> None:
    """Last part of both `up` paths: mount every disk, start the guests, record phase up."""
    _mount_all(st.definition, names, undo)
    if start_guests:
        guests.start_all(st.definition, names)
        undo.push("stop guests", lambda: guests.stop_all(names))
    st.phase = "up"
    st.save()


def _restart(st: State, names: Names, start_guests: bool, progress: Progress) -> State:
    defn = st.definition
    with _Undo() as undo:
        missing = [names.backing_file(i) for i in range(defn.backing_files)
                   if not names.backing_file(i).exists()]
        if missing:
            raise HvlabError(f"cannot restart lab {defn.name!r}: backing file {missing[0]} "
                             f"is gone; run `hvlab down --lab-name {defn.name}`")
        for i in range(defn.backing_files):  # made by an older hvlab: root's only now
            private.tighten(names.backing_file(i), private.FILE_MODE)
        private.tighten(names.backing_dir, private.DIR_MODE)
        devs = _attach_all(st, names, undo)
        progress(f"re-attached {' '.join(devs)}")
        lvm = lvm_for(names)
        lvm.write_config(devs)
        existing = set(lvm.lvs(names.vg))
        undo.push(f"deactivate VG {names.vg}", lambda: _deactivate(names))
        targets = {}
        for vm, disk in defn.disks():
            targets[(vm.name, disk.name)] = live.lv_to_map(names, vm.name, disk.name, existing)
        # The guest was writing to a backup checkpoint when the lab stopped: keep mapping it
        # (snapshots may carry the activation-skip flag: -K). All in one lvm process.
        checkpoints = [lv for (v, d), lv in targets.items() if lv != names.lv(v, d)]
        _batch(names, lvm, [["vgchange", "-q", "-ay", names.vg],
                            *[["lvchange", "-q", "-ay", "-K", f"{names.vg}/{lv}"]
                              for lv in checkpoints]], list(targets.values()))
        for (v, d), lv in targets.items():
            if lv in checkpoints:
                progress(f"{v}/{d}: the guest writes to {lv} (a backup's C)")
            wait_node(names.lv_path(lv))
        _controllers(defn, names, undo, targets)
        _go_live(st, names, undo, start_guests)
        progress(f"lab {defn.name} is up again (data kept)")
        return st


def _batch(names: Names, lvm: Lvm, commands: list[list[str]], active: list[str],
           error_when_full: str = "") -> None:
    """Commands in one lvm process (it exits 0 whatever they did), then one report: every LV
    of `active` must exist and be active (and the pool error_when_full set so), else one
    error naming them and what LVM said."""
    try:
        res, rows = lvm.batch_report(commands, names.vg)
    except CommandError as exc:
        rows, res = {}, Result(exc.argv, exc.returncode, exc.stdout, exc.stderr)
    short = [f"{lv} missing" if lv not in rows else f"{lv} inactive" for lv in active
             if lv not in rows or not rows[lv].active]
    if error_when_full and (error_when_full not in rows
                            or rows[error_when_full].when_full != "error"):
        short.append(f"{error_when_full} not set to fail writes when full")
    if short:
        said = " | ".join(ln.strip() for ln in res.stderr.splitlines() if ln.strip())
        raise HvlabError(f"lvm ({', '.join(sorted({c[0] for c in commands}))}) left "
                         f"{', '.join(short)}: {said or 'lvm said nothing'}")


def _controllers(defn: LabDef, names: Names, undo: _Undo,
                 targets: dict[tuple[str, str], str] | None = None) -> None:
    """The guest mounts a dm-linear 'controller' on the LV, never the LV: see platform notes.
    targets (after a restart): the LV each disk's guest last wrote to; default B."""
    for vm, disk in defn.disks():
        ctl = names.ctl(vm.name, disk.name)
        lv = (targets or {}).get((vm.name, disk.name), names.lv(vm.name, disk.name))
        dm.create_linear(ctl, names.lv_path(lv), uuid=names.ctl_uuid(vm.name, disk.name))
        undo.push(f"remove {ctl}", _bind(dm.remove, ctl))
        wait_node(f"/dev/mapper/{ctl}")


def _mount_all(defn: LabDef, names: Names, undo: _Undo) -> None:
    for vm, disk in defn.disks():
        mp = names.mountpoint(vm.name, disk.name)
        fs.mount(f"/dev/mapper/{names.ctl(vm.name, disk.name)}", mp, disk.fs)
        undo.push(f"umount {mp}", _bind(fs.umount, mp))


# ------------------------------------------------------------------------------ stop / down
def pv_devices(names: Names) -> list[str]:
    """The lab's PVs as LVM must see them: our dm-linears, or (a lab brought up by an older
    hvlab, whose PVs were the loops themselves) the loops."""
    pvs = [d.path for d in dm.list_devices() if d.uuid.startswith(f"{names.uuid_prefix}pv-")]
    return sorted(pvs) or [lo.name for lo in loop.loops_under(names.dir)]


def _deactivate(names: Names) -> None:
    if not loop.loops_under(names.dir):
        return
    lvm = lvm_for(names)
    lvm.write_config(pv_devices(names))
    lvm("vgchange", "-q", "-an", names.vg, check=False)


def _remove_dm(names: Names) -> None:
    """Remove what is left of ours, least-held first, until nothing moves."""
    for _ in range(20):
        ours = owned_dm(names)
        if not ours:
            return
        progress = False
        for dev in sorted(ours, key=lambda d: d.open_count):
            if dev.open_count:
                continue
            if dev.suspended:
                dm.run_resume(dev.name)
            dm.remove(dev.name)
            progress = True
        if not progress:
            return


def teardown(lab: str, *, keep_data: bool, progress: Progress = _quiet) -> None:
    """Remove every live object of the lab in reverse order; keep_data keeps backing files."""
    names = Names(lab)
    # A controller left suspended by a killed backup would hang the guest's writes, its exit
    # and the umount: resume first (removing everything, the table it then maps is moot).
    for d in owned_dm(names):
        if d.suspended:
            dm.run_resume(d.name)
            progress(f"resumed suspended {d.name}")
    for x in links.clean(names):  # nbdkit holds the snapshot devices open
        progress(f"remove off-host link {x}")
    guests.stop_all(names)
    # A frozen filesystem cannot be unmounted cleanly and blocks writers: thaw first.
    for m in sorted(fs.mounts_under(names.dir), key=lambda m: -len(m.target)):
        fs.thaw(Path(m.target))
    for m in sorted(fs.mounts_under(names.dir), key=lambda m: -len(m.target)):
        fs.umount(Path(m.target))
        progress(f"umount {m.target}")
    # Our own (non-LVM) devices first: controllers and flow devices sit on top of the LVs
    # (the PVs below them are held open by the pool until the VG is deactivated).
    for _ in range(10):
        ours = [d for d in owned_dm(names)
                if d.uuid.startswith(names.uuid_prefix) and d.open_count == 0
                and not d.uuid.startswith(f"{names.uuid_prefix}pv-")]
        if not ours:
            break
        for d in ours:
            dm.remove(d.name)
            progress(f"remove {d.name}")
    _deactivate(names)
    _remove_dm(names)
    for lo in loop.loops_under(names.dir):
        loop.detach(lo.name)
        progress(f"detach {lo.name}")
    if not keep_data:
        refuse_links(names.dir, "lab folder")  # rmtree would not follow it, but fail silently
        shutil.rmtree(names.dir, ignore_errors=True)
        if os.path.lexists(names.dir):
            raise LeakError(f"lab {lab!r} left behind its folder {names.dir}")
    verify_clean(lab)


def verify_clean(lab: str) -> None:
    left = inventory(lab)
    if not left.empty():
        raise LeakError(f"lab {lab!r} left behind: {left.describe()}")


def stop(lab: str, *, progress: Progress = _quiet) -> None:
    """Take the lab offline (as a host shutdown would) but keep its data for the next `up`."""
    from hvlab.lab import runs

    st = State.load(lab)
    if st is None:
        raise BadInput(f"lab {lab!r} does not exist")
    names = Names(lab)
    busy = runs.active_runs(names)
    if busy:
        # A stop would pull the lab from under the run's process: finish or abort it first.
        raise BadInput(f"lab {lab!r} has backup run {busy[0].id} "
                       f"({runs.effective_state(busy[0])}): `hvlab backup --resume` or "
                       f"`--abort` it before `hvlab stop`")
    with locked(lab):
        teardown(lab, keep_data=True, progress=progress)
        st.phase = "stopped"
        st.save()


def down(lab: str, *, progress: Progress = _quiet, missing_ok: bool = False,
         purge: bool = False) -> None:
    """Remove the lab. Its backups (in the default folder) are kept unless purge. A symlink
    in the lab folder or at its backups folder is refused before anything is removed: down
    never removes through one, and never reports a lab gone whose files stay elsewhere."""
    names = Names(lab)
    refuse_links_in_lab(names)
    if purge:  # checked before anything is removed: a purge must not fail half way
        refuse_links(names.backups_dir, "backups folder")
        if os.path.lexists(names.backups_dir) and not names.backups_dir.is_dir():
            raise BadInput(f"backups folder {names.backups_dir} is not a folder: "
                           f"not removing it")
    if not names.dir.exists() and inventory(lab).empty():
        if purge and names.backups_dir.exists():
            _purge_backups(names, progress)
            return
        if missing_ok:
            return
        raise BadInput(f"lab {lab!r} is not up: nothing to remove")
    _down(lab, names, progress)
    if purge:
        _purge_backups(names, progress)
    elif names.backups_dir.is_dir() and any(names.backups_dir.iterdir()):
        n = sum(1 for p in names.backups_dir.iterdir() if p.is_dir())
        progress(f"backups kept: {n} in {names.backups_dir} (`hvlab down --purge` removes them)")


def _purge_backups(names: Names, progress: Progress) -> None:
    refuse_links(names.backups_dir, "backups folder")
    if not names.backups_dir.is_dir():
        progress(f"no backups to remove ({names.backups_dir} does not exist)")
        return
    shutil.rmtree(names.backups_dir)
    progress(f"removed backups {names.backups_dir}")


def _down(lab: str, names: Names, progress: Progress) -> None:
    if names.dir.exists():
        with locked(lab):
            try:
                st = State.load(lab)
            except HvlabError:
                st = None  # unreadable: teardown finds everything by prefix and path anyway
            if st is not None:
                st.phase = "removing"
                st.save()
            teardown(lab, keep_data=False, progress=progress)
    else:
        teardown(lab, keep_data=False, progress=progress)


def lab_names() -> list[str]:
    from hvlab.lab.paths import home

    root = home()
    if not root.exists():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "state.json").exists())


def refuse_under_runs(lab: str, *, force: bool) -> None:
    """`down` never pulls a lab from under a backup: a running one is refused always, a
    paused or interrupted one unless forced (abort it first to merge what the guest wrote)."""
    from hvlab.lab import runs

    for r in runs.active_runs(Names(lab)):
        state = runs.effective_state(r)
        if state in ("running", "aborting"):
            raise BadInput(f"lab {lab!r} has backup run {r.id} running in process {r.pid}: "
                           f"interrupt it (it unwinds) before `hvlab down`")
        if not force:
            raise BadInput(f"lab {lab!r} has backup run {r.id} ({state}): `hvlab backup "
                           f"--abort {r.id}` first, or `hvlab down --force`")


def resolve_name(name: str | None) -> str:
    """The lab a command means: -n NAME, else $HVLAB_LAB, else the only lab, else 'hvlab'."""
    from hvlab.lab.definition import check_name

    if name is not None:  # `-n ""` is a bad name, not "the default lab"
        return check_name("lab", name)
    if os.environ.get("HVLAB_LAB"):
        return check_name("lab", os.environ["HVLAB_LAB"])
    labs = lab_names()
    return labs[0] if len(labs) == 1 else "hvlab"
