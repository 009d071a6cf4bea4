"""The one recorder: every step's event, built in one place, written also when the step fails.

An event holds the step's detail, its timing, the block devices the kernel added and removed
(uevents plus a sysfs difference), where each disk's guest writes (sysfs: no command), every
external command the step ran (argv, exit code, seconds: a program log), the error if it
failed, and at the three points the invariants need them (T0, after auto-recovery, before the
merge) the artifacts' fingerprints. Observation stays cheap: nothing runs inside the freeze
window, and content is hashed again only when the thin metadata shows other data blocks.
"""

from __future__ import annotations

import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from hvlab.backup import thinmeta
from hvlab.flow import job  # noqa: F401  (registers steps 11-14)
from hvlab.flow import steps as S
from hvlab.flow.actions import ACTIONS
from hvlab.flow.context import Ctx, thin_ids
from hvlab.lab import runs
from hvlab.sys.run import program_log
from hvlab.sys.uevents import watch

# Where the invariants need content: B and A at T0 (after the thaw, outside the window), A
# after auto-recovery, B and S before the merge.
FINGERPRINT_AFTER = {8: "T0", 10: "after auto-recovery", 13: "before the merge"}
BACKGROUND = {8}


def run_step(ctx: Ctx, n: int, vm: str | None) -> dict[str, Any]:
    """Run step n's action for vm (None: the job) and record its event, also on failure."""
    st = S.step(n)
    ev: dict[str, Any] = {"run": ctx.run.id, "step": n, "name": st.name, "vm": vm,
                          "veeam": st.veeam, "lab": st.lab, "in_freeze": st.in_freeze,
                          "start": time.time()}
    ok = False
    try:
        with watch(settle=0.0) as rec, program_log() as commands:
            ctx.uevents = rec
            try:
                ev["detail"] = ACTIONS[n](ctx, vm)
                ok = True
            except BaseException as exc:
                ev["error"] = f"{type(exc).__name__}: {exc}"
                raise
            finally:
                ev["end"] = time.time()
    finally:
        ev["devices_created"] = rec.created()
        ev["devices_removed"] = rec.removed()
        ev["commands"] = [{"argv": c.argv, "rc": c.returncode, "seconds": c.seconds}
                          for c in commands]
        ev["writes_to"] = writes_to(ctx, vm)
        ev["fingerprints"] = None
        if ok and ctx.fingerprints and n in FINGERPRINT_AFTER:
            flush(ctx)  # a hash still running in the background fills the cache first
            planned = plan_fingerprints(ctx, vm)
            if n in BACKGROUND:
                # B (and A, which shares its blocks) cannot change until step 10 writes A,
                # and only B's device is read: hash while steps 9-10 run.
                ev["fingerprints_note"] = f"{FINGERPRINT_AFTER[n]}: hashed in the background"
                ctx.pending = (ev, ThreadPoolExecutor(max_workers=1))
                ctx.pending_future = ctx.pending[1].submit(hash_planned, ctx, planned)
            else:
                ev["fingerprints"] = hash_planned(ctx, planned)
                ev["fingerprints_note"] = FINGERPRINT_AFTER[n]
        ctx.last_dump = None
        ev["observed_s"] = round(time.time() - ev["end"], 4)
        runs.append_event(ctx.names, ctx.run.id, ev, durable=not ctx.in_window)
    return ev


def flush(ctx: Ctx) -> None:
    """Wait for a background hash and record it (a supplement to its step's event, which
    `runs.events` folds in). Called before the next hash, a pause, the end or an unwind."""
    if ctx.pending is None or ctx.pending_future is None:
        return
    (ev, pool), future = ctx.pending, ctx.pending_future
    ctx.pending, ctx.pending_future = None, None
    try:
        fps, note = future.result(), FINGERPRINT_AFTER[ev["step"]]
    except Exception as exc:  # the run goes on; the event says why it has no hash
        fps, note = None, f"not hashed: {type(exc).__name__}: {exc}"
    finally:
        pool.shutdown()
    runs.append_event(ctx.names, ctx.run.id, {
        "run": ctx.run.id, "step": ev["step"], "vm": ev["vm"], "supplement": "fingerprints",
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


def plan_fingerprints(ctx: Ctx, vm: str | None) -> Planned:
    """B, C, A, S_B, S_A of each disk: how many blocks are mapped and, for all but the live
    disk (whose content moves under any hash), what to hash. The mappings are read now; the
    content can be hashed later from the device of one artifact per mapping."""
    present = [(f"{v}/{d}", a, lv, disk) for v, d, disk in ctx.disks(vm)
               for a, lv in disk.present().items() if os.path.exists(ctx.lv_dev(lv))]
    ids = thin_ids(ctx, [lv for _, _, lv, _ in present])
    if ctx.last_dump is not None:  # step 13 just took one: S and B have not moved since
        maps = {lv: thinmeta.mapping_in(ctx.last_dump, ids[lv]) for _, _, lv, _ in present
                if lv in ids}
    else:
        with thinmeta.metadata_snap(ctx.names) as snap:
            by_id = snap.mappings(ids[lv] for _, _, lv, _ in present if lv in ids)
            maps = {lv: by_id[ids[lv]] for _, _, lv, _ in present if lv in ids}
    out: dict[str, dict[str, Any]] = {}
    todo: dict[tuple[tuple[int, int], ...], tuple[str, thinmeta.Mapping]] = {}
    where: list[tuple[str, str, tuple[tuple[int, int], ...] | None]] = []
    for key, a, lv, disk in present:
        if lv not in maps:
            continue
        m = maps[lv]
        out.setdefault(key, {})[a] = {"mapped_blocks": m.mapped_blocks, "thin_id": m.dev_id}
        if disk.lv(a) == ctx.mapped_lv(disk):
            out[key][a]["live"] = True
            where.append((key, a, None))
        else:
            pairs = tuple(m.pairs)
            todo.setdefault(pairs, (ctx.lv_dev(lv), m))
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
    return hash_planned(ctx, plan_fingerprints(ctx, vm))


def _content_hash(ctx: Ctx, dev: str, m: thinmeta.Mapping) -> dict[str, Any]:
    cache = ctx.block_digests
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


def check_registry() -> list[str]:
    """Problems with the step registry: every step of the plan has exactly one action."""
    want = {s.number for s in S.STEPS}
    return ([f"step {n} has no action" for n in sorted(want - set(ACTIONS))]
            + [f"action for unknown step {n}" for n in sorted(set(ACTIONS) - want)])
