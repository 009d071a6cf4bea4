"""Checkpoints at kernel speed: LVM allocates before the window, the pool snapshots inside it.

Hyper-V takes the checkpoints of all of a VM's disks in one commit while the guest holds its
writes. One `lvcreate -s` costs about a second in the lab VM, so before the window LVM makes
C and A of every disk in one `lvm` process: thin LVs with their names, tags and thin ids,
inactive, holding B as it was then. Inside the window, with the VM's controllers and origins
suspended together, the pool itself replaces each of those thin devices by a snapshot of B
now (`delete`, then `create_snap` into the same id) and C is activated under LVM's own name
and uuid, all by ioctl from this process: milliseconds per disk. Pool messages never move the
transaction id and LVM's metadata is unchanged, so LVM finds exactly what it recorded.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass

from hvlab.errors import HvlabError
from hvlab.flow.context import Ctx
from hvlab.lab.paths import ROLE_TAG
from hvlab.lab.record import Artifact
from hvlab.sys import dmioctl as D
from hvlab.sys.lvm import LvRow, udev_running


@dataclass(frozen=True)
class Want:
    """A checkpoint LV to allocate: of `origin`, for vm/disk, in the role of `art`."""

    vm: str
    disk: str
    art: Artifact
    lv: str
    origin: str


@dataclass(frozen=True)
class Slot:
    """An allocated LV: its thin id in the pool and the dm uuid LVM gives its device."""

    lv: str
    thin_id: int
    uuid: str


def allocate(ctx: Ctx, wants: Sequence[Want]) -> dict[str, Slot]:
    """Make every wanted LV LVM does not have yet (one lvm process), then read all of them
    back in one report: an LV the batch did not make is an error naming it."""
    have = ctx.view.lvs()
    todo = [w for w in wants if w.lv not in have]
    res, report = ctx.view.lvm.batch_report(
        [["lvcreate", "-q", "-s", "-kn", "-an", "-n", w.lv,
          *ctx.tags(ROLE_TAG[w.art], w.vm, w.disk), ctx.vg_lv(w.origin)] for w in todo],
        ctx.names.vg)
    ctx.view.take(report)
    got = slots(report, [w.lv for w in wants])
    missing = [w.lv for w in wants if w.lv not in got]
    if missing:
        why = " ".join(res.stderr.split())[-300:] or "no reason given"
        raise HvlabError(f"LVM did not allocate {', '.join(missing)}: {why}")
    return got


def slots(rows: dict[str, LvRow], lvs: Sequence[str]) -> dict[str, Slot]:
    """lvs' thin ids and dm uuids (what LVM names the kernel device by), from a report."""
    out = {}
    for name in lvs:
        r = rows.get(name)
        if r is not None and r.thin_id is not None:
            uuid = "LVM-" + r.vg_uuid.replace("-", "") + r.uuid.replace("-", "")
            out[name] = Slot(name, r.thin_id, uuid)
    return out


def pool(ctx: Ctx) -> str:
    """The dm device the pool's messages go to (LVM's `-tpool` layer)."""
    return f"{ctx.names.dm_lv_name(ctx.names.pool)}-tpool"


def thin_target(ctx: Ctx, lv: str) -> D.Target:
    """`0 N thin <pool> <id>` of an active thin LV."""
    t = D.table(ctx.names.dm_lv_name(lv))
    if len(t) != 1 or t[0].type != "thin":
        raise HvlabError(f"{lv} is not an active thin volume (table {[x.line for x in t]})")
    return t[0]


def snap_into(ctx: Ctx, slot: Slot, origin_id: int) -> None:
    """The pool's snapshot of origin_id, under slot's id. The origin must be suspended. What
    the id held (LVM's snapshot from before, or one of a killed attempt) goes first; none
    there (a kill between the two messages) is fine."""
    tpool = pool(ctx)
    try:
        D.message(tpool, f"delete {slot.thin_id}")
    except D.DmError as exc:
        if exc.errno != errno.ENODATA:
            raise
    D.message(tpool, f"create_snap {slot.thin_id} {origin_id}")


def activate(ctx: Ctx, slot: Slot, like: D.Target) -> D.Info:
    """Activate the LV as LVM would: its name, its uuid, `thin <pool> <id>` of the origin's
    size (a snapshot has its origin's). Without udev, LVM makes /dev/VG/LV itself: so do we."""
    name = ctx.names.dm_lv_name(slot.lv)
    pool_dev = like.params.split()[0]
    made = D.create(name, [D.Target(0, like.length, "thin", f"{pool_dev} {slot.thin_id}")],
                    uuid=slot.uuid)
    ctx.view.activated(slot.lv, made.major, made.minor)
    if not udev_running():
        link = f"/dev/{ctx.names.vg}/{slot.lv}"
        if os.path.isdir(os.path.dirname(link)) and not os.path.lexists(link):
            os.symlink(f"/dev/mapper/{name}", link)
    return made


def deactivate(ctx: Ctx, lv: str) -> None:
    """Remove an LV's device made by a killed attempt (never mapped): LVM keeps the LV."""
    name = ctx.names.dm_lv_name(lv)
    if D.exists(name):
        D.remove(name, missing_ok=True)
        ctx.view.forget()  # the cached report may show it active
    link = f"/dev/{ctx.names.vg}/{lv}"
    if os.path.islink(link):
        os.unlink(link)


def require_room(ctx: Ctx) -> None:
    """LVM refuses a thin snapshot when the pool's data space is used up; the pool itself
    would take one (a snapshot needs no data), and the first write after it would fail. The
    kernel path keeps LVM's rule: checked with the origins held, from the pool's status."""
    (st,) = D.status(pool(ctx), noflush=True)
    f = st.params.split()
    used, total = (int(x) for x in f[2].split("/"))
    if used >= total or f[4] == "out_of_data_space":
        raise HvlabError(f"Cannot create new thin volume, free space in thin pool "
                         f"{ctx.names.vg}/{ctx.names.pool} reached threshold (data "
                         f"{used}/{total} chunks used, mode {f[4]})")
