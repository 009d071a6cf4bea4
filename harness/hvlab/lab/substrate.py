"""Bringing a lab up: backing files -> loops -> PV/VG -> thin pool -> thin LVs -> virtual
controllers (dm-linear) -> filesystems -> mounts, or up again after a stop or a restart
(data kept). `up` rolls back what it made on failure; teardown.py takes a lab down."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from types import TracebackType
from typing import TypeVar

from hvlab.errors import BadInput, CommandError, HvlabError
from hvlab.lab import guests, inventory, live, teardown, thinsync
from hvlab.lab.definition import LabDef
from hvlab.lab.handle import Lab
from hvlab.lab.paths import ROLE_TAG, Names, refuse_links_in_lab
from hvlab.lab.state import State, locked
from hvlab.sys import dm, fs, loop, private
from hvlab.sys.lvm import Lvm, LvRow
from hvlab.sys.run import Result
from hvlab.sys.uevents import wait_node

Progress = Callable[[str], None]
T = TypeVar("T")


def _quiet(_: str) -> None:
    pass



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


def up(defn: LabDef, *, start_guests: bool = True, progress: Progress = _quiet) -> Lab:
    """Bring a lab up: create it, or re-attach an existing one (after a restart) with data.
    Returns its handle (names, state, LVM), as `Lab.open` would."""
    names = Names(defn.name)
    refuse_links_in_lab(names)  # before even reading it: a symlinked lab folder is refused
    orphaned = names.dir.exists() and not names.state_file.exists()
    if orphaned and (not inventory.of(defn.name).empty() or names.backing_dir.exists()):
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
            if st.phase == "up" and inventory.of(defn.name).loops:
                raise BadInput(f"lab {defn.name!r} is already up (hvlab status shows it)")
            st = restart(st, names, start_guests=start_guests, progress=progress)
        else:
            st = _create(defn, names, start_guests, progress)
    return Lab(names, st, names.lvm())


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
        lvm = names.lvm()
        lvm.write_config(devs)
        undo.push(f"remove VG {names.vg}", lambda: teardown.deactivate(names))
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


def restart(st: State, names: Names, *, start_guests: bool = True,
            progress: Progress = _quiet) -> State:
    """Bring a stopped lab back (the caller holds its lock): loops, PVs, the VG (LVM checks
    the pool's metadata as it activates it), the LVs the guests write to, controllers,
    mounts and guests."""
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
        lvm = names.lvm()
        lvm.write_config(devs)
        existing = set(lvm.lvs(names.vg))
        undo.push(f"deactivate VG {names.vg}", lambda: teardown.deactivate(names))
        targets = {}
        for vm, disk in defn.disks():
            targets[(vm.name, disk.name)] = live.lv_to_map(names, vm.name, disk.name, existing)
        # The guest was writing to a backup checkpoint when the lab stopped: keep mapping it
        # (snapshots may carry the activation-skip flag: -K). All in one lvm process.
        checkpoints = [lv for (v, d), lv in targets.items() if lv != names.lv(v, d)]
        rows = _batch(names, lvm, [["vgchange", "-q", "-ay", names.vg],
                                   *[["lvchange", "-q", "-ay", "-K", f"{names.vg}/{lv}"]
                                     for lv in checkpoints]], list(targets.values()))
        # A power cut inside an LVM change to the pool: send what LVM left queued.
        thinsync.send_queued(names, rows, progress)
        for (v, d), lv in targets.items():
            if lv in checkpoints:
                progress(f"{v}/{d}: the guest writes to {lv} (a backup's C)")
            wait_node(names.lv_path(lv))
        _controllers(defn, names, undo, targets)
        _go_live(st, names, undo, start_guests)
        progress(f"lab {defn.name} is up again (data kept)")
        return st


def _batch(names: Names, lvm: Lvm, commands: list[list[str]], active: list[str],
           error_when_full: str = "") -> dict[str, LvRow]:
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
    return rows


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
