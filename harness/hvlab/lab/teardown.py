"""Taking a lab down: `stop` (offline, data kept for the next `up`) and `down` (everything
removed). Both remove in reverse order, find what is left by ownership (inventory.py), and
verify that nothing of the lab is left (LeakError otherwise)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from hvlab.errors import BadInput, HvlabError, LeakError
from hvlab.lab import guests, inventory, links
from hvlab.lab.paths import Names, refuse_links, refuse_links_in_lab
from hvlab.lab.state import State, locked
from hvlab.sys import dm, fs, loop

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def deactivate(names: Names) -> None:
    if not loop.loops_under(names.dir):
        return
    lvm = names.lvm()
    lvm.write_config(inventory.pv_devices(names))
    lvm("vgchange", "-q", "-an", names.vg, check=False)


def remove_dm(names: Names) -> None:
    """Remove what is left of ours, least-held first, until nothing moves."""
    for _ in range(20):
        ours = inventory.owned_dm(names)
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


def teardown(names: Names, *, keep_data: bool, progress: Progress = _quiet) -> None:
    """Remove every live object of the lab in reverse order; keep_data keeps backing files."""
    # A controller left suspended by a killed backup would hang the guest's writes, its exit
    # and the umount: resume first (removing everything, the table it then maps is moot).
    for d in inventory.owned_dm(names):
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
        ours = [d for d in inventory.owned_dm(names)
                if d.uuid.startswith(names.uuid_prefix) and d.open_count == 0
                and not d.uuid.startswith(f"{names.uuid_prefix}pv-")]
        if not ours:
            break
        for d in ours:
            dm.remove(d.name)
            progress(f"remove {d.name}")
    deactivate(names)
    remove_dm(names)
    for lo in loop.loops_under(names.dir):
        loop.detach(lo.name)
        progress(f"detach {lo.name}")
    if not keep_data:
        refuse_links(names.dir, "lab folder")  # rmtree would not follow it, but fail silently
        shutil.rmtree(names.dir, ignore_errors=True)
        if os.path.lexists(names.dir):
            raise LeakError(f"lab {names.lab!r} left behind its folder {names.dir}")
    verify_clean(names)


def verify_clean(names: Names) -> None:
    left = inventory.of(names.lab)
    if not left.empty():
        raise LeakError(f"lab {names.lab!r} left behind: {left.describe()}")


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
        teardown(names, keep_data=True, progress=progress)
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
    if not names.dir.exists() and inventory.of(lab).empty():
        if purge and names.backups_dir.exists():
            _purge_backups(names, progress)
            return
        if missing_ok:
            return
        raise BadInput(f"lab {lab!r} is not up: nothing to remove")
    _down(names, progress)
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


def _down(names: Names, progress: Progress) -> None:
    if names.dir.exists():
        with locked(names.lab):
            try:
                st = State.load(names.lab)
            except HvlabError:
                st = None  # unreadable: teardown finds everything by prefix and path anyway
            if st is not None:
                st.phase = "removing"
                st.save()
            teardown(names, keep_data=False, progress=progress)
    else:
        teardown(names, keep_data=False, progress=progress)


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
