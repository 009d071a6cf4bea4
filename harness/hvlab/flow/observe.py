"""The one recorder: every step's event, built in one place, written also when the step fails.

An event holds the step's detail, its timing, the block devices the kernel added and removed
(uevents plus a sysfs difference), where each disk's guest writes (sysfs: no command), every
external command the step ran (argv, exit code, seconds: a program log), the error if it
failed, and at the three points the invariants need them (T0, after auto-recovery, before the
merge) the artifacts' fingerprints. Observation stays cheap: nothing runs inside the freeze
window, and content is hashed again only when the thin metadata shows other data blocks.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from hvlab.backup import thinmeta
from hvlab.flow.context import Ctx, thin_ids
from hvlab.lab import runs
from hvlab.lab.record import Command, Event
from hvlab.sys.run import program_log
from hvlab.sys.uevents import watch

# Where the invariants need content is each model's steps' `mark` (2012 R2: B and A at T0,
# after the thaw and outside the window; A after auto-recovery; B and S before the merge).
# Hashed in the background, from the pool's metadata as it was when the step ended: after
# the thaw B cannot change (the controller maps C) and A not until auto-recovery writes it;
# after auto-recovery, A is left alone until it is removed. Only B's and A's devices are read.
BACKGROUND = ("T0", "after auto-recovery")
# A hash still running ends first where a step's `flush_before` says so: nothing runs beside
# a freeze window or a guard's fork, nor beside a step that suspends or removes what it reads.


def run_step(ctx: Ctx, n: int, vm: str | None) -> Event:
    """Run step n's action for vm (None: the job) and record its event, also on failure."""
    model = ctx.model
    st = model.step(n)
    ev = Event(run=ctx.run.id, step=n, name=st.name, vm=vm, veeam=st.veeam, lab=st.lab,
               in_freeze=st.in_freeze, start=time.time(), end=0.0)
    ok = False
    if st.flush_before:
        flush(ctx)
    try:
        with watch(settle=0.0) as rec, program_log() as commands:
            ctx.obs.uevents = rec
            try:
                ev.detail = model.actions[n](ctx, vm)
                ok = True
            except BaseException as exc:
                ev.error = f"{type(exc).__name__}: {exc}"
                raise
            finally:
                ev.end = time.time()
    finally:
        ev.devices_created = rec.created()
        ev.devices_removed = rec.removed()
        ev.commands = [Command(c.argv, c.returncode, c.seconds) for c in commands]
        ev.writes_to = writes_to(ctx, vm)
        if ok and ctx.obs.fingerprints and st.mark:
            flush(ctx)  # a hash still running in the background fills the cache first
            if st.mark in BACKGROUND:
                ev.fingerprints_note = f"{st.mark}: hashed in the background"
                in_background(ctx, ev, vm)
            else:
                ev.fingerprints = fingerprints(ctx, vm)
                ev.fingerprints_note = st.mark
        ctx.obs.last_dump = None
        ev.observed_s = round(time.time() - ev.end, 4)
        runs.append_event(ctx.names, ctx.run.id, ev, durable=not ctx.in_window)
    return ev


def in_background(ctx: Ctx, ev: Event, vm: str | None) -> None:
    """Fingerprint what exists now, later: which artifacts exist and which is live are read
    now, and the pool's metadata snapshot is taken now (one message); reading it, and the
    blocks it maps, happen in a thread while the next steps run (`flush` waits for it)."""
    present = _present(ctx, vm)
    held = contextlib.ExitStack()
    snap = held.enter_context(thinmeta.metadata_snap(ctx.names))

    def work() -> dict[str, dict[str, Any]]:
        with held:
            maps = snap.mappings(i for _, _, _, i, _, _ in present)
        return hash_planned(ctx, _plan(present, maps))

    pool = ThreadPoolExecutor(max_workers=1)
    try:
        ctx.obs.pending_future = pool.submit(work)
    except BaseException:
        held.close()
        raise
    ctx.obs.pending = (ev, pool)


def flush(ctx: Ctx) -> None:
    """Wait for a background hash and record it (a supplement to its step's event, which
    `runs.events` folds in). Called before the next hash, a pause, the end or an unwind."""
    if ctx.obs.pending is None or ctx.obs.pending_future is None:
        return
    (ev, pool), future = ctx.obs.pending, ctx.obs.pending_future
    ctx.obs.pending, ctx.obs.pending_future = None, None
    try:
        fps, note = future.result(), ctx.model.step(ev.step or 1).mark
    except Exception as exc:  # the run goes on; the event says why it has no hash
        fps, note = None, f"not hashed: {type(exc).__name__}: {exc}"
    finally:
        pool.shutdown()
    runs.append_event(ctx.names, ctx.run.id, {
        "run": ctx.run.id, "step": ev.step, "vm": ev.vm, "supplement": "fingerprints",
        "fingerprints": fps, "fingerprints_note": note, "at": time.time()})


def writes_to(ctx: Ctx, vm: str | None) -> dict[str, dict[str, str | None]]:
    """Per disk of the step's VM (every disk for a job step): the LV the guest's controller
    maps now, and its role letter. A VM's step never moves another VM's controller, and
    asking for all of them after every step grew with the square of a job's VMs."""
    out: dict[str, dict[str, str | None]] = {}
    for v, d, disk in ctx.disks(vm):
        lv = ctx.mapped_lv(disk)
        role = "B" if lv == disk.B else "C" if lv and lv == disk.C else "?"
        out[f"{v}/{d}"] = {"lv": lv, "artifact": role}
    return out


Planned = tuple[dict[str, dict[str, Any]], dict[tuple[tuple[int, int], ...],
                                              tuple[str, thinmeta.Mapping]],
                list[tuple[str, str, tuple[tuple[int, int], ...] | None]]]


# (artifact key, role, LV, its thin id, its device, live: the disk's controller maps it)
Present = list[tuple[str, str, str, int, str, bool]]


def _present(ctx: Ctx, vm: str | None) -> Present:
    """B, C, A, S_B, S_A of each disk that exist now, and which one the guest writes."""
    found = [(f"{v}/{d}", a, lv, disk) for v, d, disk in ctx.disks(vm)
             for a, lv in disk.present().items() if os.path.exists(ctx.lv_dev(lv))]
    ids = thin_ids(ctx, [lv for _, _, lv, _ in found])
    return [(key, a, lv, ids[lv], ctx.lv_dev(lv), disk.lv(a) == ctx.mapped_lv(disk))
            for key, a, lv, disk in found if lv in ids]


def _plan(present: Present, maps: dict[int, thinmeta.Mapping]) -> Planned:
    """How many blocks each artifact maps (`maps`: by thin id) and, for all but the live disk
    (whose content moves under any hash), what to hash. The content can be hashed later from
    the device of one artifact per mapping."""
    out: dict[str, dict[str, Any]] = {}
    todo: dict[tuple[tuple[int, int], ...], tuple[str, thinmeta.Mapping]] = {}
    where: list[tuple[str, str, tuple[tuple[int, int], ...] | None]] = []
    for key, a, _lv, thin_id, dev, live in present:
        m = maps[thin_id]
        out.setdefault(key, {})[a] = {"mapped_blocks": m.mapped_blocks, "thin_id": m.dev_id}
        if live:
            out[key][a]["live"] = True
            where.append((key, a, None))
        else:
            pairs = tuple(m.pairs)
            todo.setdefault(pairs, (dev, m))
            where.append((key, a, pairs))
    return out, todo, where


def hash_planned(ctx: Ctx, planned: Planned) -> dict[str, dict[str, Any]]:
    """Content hashes: sha256 over (virtual block, sha256 of the block) of every mapped block.
    A data block is read once per run: until the merge every block hashed here stays shared
    with an artifact nobody writes (B after T0, A after auto-recovery, S), and a thin pool
    never writes a shared block in place. Different mappings are read in parallel."""
    out, todo, where = planned
    with ThreadPoolExecutor(max_workers=2) as pool:
        hashes = dict(zip(todo, pool.map(lambda job: _content_hash(ctx, *job), todo.values()),
                          strict=True))
    for key, a, pairs in where:
        if pairs is not None:
            out[key][a].update(hashes[pairs])
    return out


def fingerprints(ctx: Ctx, vm: str | None) -> dict[str, dict[str, Any]]:
    present = _present(ctx, vm)
    ids = [i for _, _, _, i, _, _ in present]
    if ctx.obs.last_dump is not None:  # step 13 just took one: S and B have not moved since
        maps = {i: thinmeta.mapping_in(ctx.obs.last_dump, i) for i in ids}
    else:
        with thinmeta.metadata_snap(ctx.names) as snap:
            maps = snap.mappings(ids)
    return hash_planned(ctx, _plan(present, maps))


def _content_hash(ctx: Ctx, dev: str, m: thinmeta.Mapping) -> dict[str, Any]:
    cache = ctx.obs.block_digests
    missing = [v for v, data in m.pairs if data not in cache]
    data_of = dict(m.pairs)
    for off, chunk in thinmeta.read_ranges(dev, thinmeta.merge(missing), m.block_bytes):
        for i in range(0, len(chunk), m.block_bytes):
            virtual = (off + i) // m.block_bytes
            cache[data_of[virtual]] = hashlib.sha256(chunk[i:i + m.block_bytes]).digest()
    h = hashlib.sha256()
    for virtual, data in m.pairs:
        h.update(virtual.to_bytes(8, "little"))
        h.update(cache[data])
    return {"sha256": h.hexdigest(), "blocks_read": len(missing)}
