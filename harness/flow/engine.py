"""The backup flow: Veeam's 14 steps on real thin snapshots, pausable, resumable, abortable.

Artifacts per disk (LV names carry the run id; every LV has the lab tag, a role tag, vm_, disk_
and run_ tags):  B `<vm>_<disk>` (live disk, frozen at T0), C `<vm>_<disk>_c_<run>`,
A `<vm>_<disk>_a_<run>`, S_B / S_A `<vm>_<disk>_sb_<run>` / `_sa_<run>`.

Every failure path thaws (guest `abort`, then `recover_after_crash`) and unwinds: auto-recovery
controllers, S and A are removed; C is merged into B if the controller already writes to it
(nothing the guest wrote is lost), else removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hvlab.backup import thinmeta
from hvlab.errors import BadInput, CommandError, HvlabError
from hvlab.flow import runs
from hvlab.flow import steps as S
from hvlab.guest.client import GuestClient, GuestError, GuestTimeout, GuestUnavailable
from hvlab.guest.quiesce import recover_after_crash
from hvlab.lab import guests, live
from hvlab.lab.paths import Names
from hvlab.lab.state import State, locked
from hvlab.sys import dm, fs
from hvlab.sys.lvm import Lvm
from hvlab.sys.run import run
from hvlab.sys.uevents import wait_node, watch

FLUSH_AND_HOLD_S = 10.0
ROLE_OF = {"C": "role_checkpoint", "A": "role_autorecovery", "S_B": "role_external",
           "S_A": "role_external"}
KIND = {"C": "c", "A": "a", "S_B": "sb", "S_A": "sa"}
LEFTOVER_TEXT = {"role_checkpoint": "backup checkpoint", "role_autorecovery":
                 "auto-recovery checkpoint", "role_external": "external snapshot"}

Say = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


class FlowFailed(HvlabError):
    """A step failed; the run was unwound (thawed, artifacts removed, C merged if live)."""


# ------------------------------------------------------------------------------- context
class Ctx:
    """One process working on one run: names, LVM, guests, console, and the run record."""

    def __init__(self, names: Names, run: dict[str, Any], say: Say = _quiet,
                 fingerprints: bool = True) -> None:
        self.names = names
        self.run = run
        self.lvm = Lvm(names.lvm_dir)
        self.say = say
        self.fingerprints = fingerprints
        self.progress: Any = None  # a rich Progress for step 13, when on a console

    def save(self) -> None:
        runs.save(self.names, self.run)

    def vm(self, vm: str) -> dict[str, Any]:
        d: dict[str, Any] = self.run["vm"][vm]
        return d

    def disks(self, vm: str | None = None) -> list[tuple[str, str, dict[str, Any]]]:
        vms = [vm] if vm else list(self.run["vms"])
        return [(v, d, info) for v in vms for d, info in self.vm(v)["disks"].items()]

    def client(self, vm: str, timeout: float = 10.0) -> GuestClient:
        return GuestClient(guests.socket_path(self.names, vm), timeout=timeout)

    def lv_dev(self, lv: str) -> str:
        return f"/dev/mapper/{self.names.dm_lv_name(lv)}"

    def tags(self, role: str, vm: str, disk: str) -> list[str]:
        out = []
        for t in (self.names.tag, role, f"vm_{vm}", f"disk_{disk}", f"run_{self.run['id']}"):
            out += ["--addtag", t]
        return out

    def snapshot(self, origin: str, name: str, role: str, vm: str, disk: str,
                 read_only: bool = False) -> None:
        self.lvm("lvcreate", "-q", "-s", "-kn", *(["-pr"] if read_only else []),
                 "-n", name, *self.tags(role, vm, disk), f"{self.names.vg}/{origin}")
        wait_node(self.lv_dev(name))

    def lvs(self) -> dict[str, dict[str, Any]]:
        return {r["lv_name"]: r for r in self.lvm.lvs(self.names.vg)}

    def exists(self, lv: str) -> bool:
        return lv in self.lvs()

    def remove_lv(self, lv: str) -> bool:
        """lvremove if present; False when it was already gone (a killed run did it)."""
        if not self.exists(lv):
            return False
        self.lvm("lvremove", "-q", "-y", f"{self.names.vg}/{lv}")
        return True


def lv_name(vm: str, disk: str, kind: str, run_id: str) -> str:
    return f"{vm}_{disk}_{KIND[kind]}_{run_id}"


def _lv_of_majmin(names: Names, majmin: str) -> str:
    try:
        dmname = Path(f"/sys/dev/block/{majmin}/dm/name").read_text().strip()
    except OSError:
        return majmin
    prefix = f"{names.vg}-"
    if dmname.startswith(prefix):
        return dmname[len(prefix):].replace("--", "-")
    return dmname


def writes_to(ctx: Ctx, vm: str | None = None) -> dict[str, dict[str, str]]:
    """Per disk: the LV the guest's controller maps to now, and its role letter."""
    out = {}
    for v, d, info in ctx.disks(vm):
        try:
            lv = _lv_of_majmin(ctx.names, dm.target_of(info["ctl"]))
        except CommandError:
            lv = "?"
        role = next((k for k in ("B", "C") if info.get(k) == lv), "?")
        out[f"{v}/{d}"] = {"lv": lv, "artifact": role}
    return out


def fingerprints(ctx: Ctx, vm: str | None = None) -> dict[str, dict[str, Any]]:
    """B, C, A, S_B, S_A of each disk: sha256 of the mapped blocks and their count."""
    if not ctx.fingerprints:
        return {}
    present: list[tuple[str, str, str]] = []  # key, artifact, lv
    for v, d, info in ctx.disks(vm):
        for art in ("B", "C", "A", "S_B", "S_A"):
            lv = info.get(art)
            if lv and info.get(f"{art}_exists", art == "B") and os.path.exists(ctx.lv_dev(lv)):
                present.append((f"{v}/{d}", art, lv))
    ids = thin_ids(ctx, [lv for _, _, lv in present])
    out: dict[str, dict[str, Any]] = {}
    with thinmeta.metadata_snap(ctx.names) as snap:
        for key, art, lv in present:
            if lv in ids:
                out.setdefault(key, {})[art] = thinmeta.fingerprint(ctx.lv_dev(lv),
                                                                    snap.mapping(ids[lv]))
    return out


def thin_ids(ctx: Ctx, lvs: list[str]) -> dict[str, int]:
    """Thin device ids from the dm tables (`0 N thin <pool> <id>`), no LVM call."""
    out = {}
    for lv in lvs:
        res = run(["dmsetup", "table", ctx.names.dm_lv_name(lv)], check=False)
        f = res.stdout.split()
        if res.returncode == 0 and len(f) >= 5 and f[2] == "thin":
            out[lv] = int(f[4])
    return out


# ------------------------------------------------------------------------------ the steps
def s01(ctx: Ctx, vm: str) -> dict[str, Any]:
    v = ctx.vm(vm)
    return {"disks": list(v["disks"]), "profile": v["profile"],
            "locked": f"{ctx.names.runs_dir / 'locks' / vm}.lock"}


def s02(ctx: Ctx, vm: str) -> dict[str, Any]:
    v = ctx.vm(vm)
    try:
        ident = ctx.client(vm, timeout=5.0).identify()
        v["answers"] = True
        v["auto_recovery"] = bool(ident.get("auto_recovery"))
        v["guest_profile"] = ident.get("profile")
    except (GuestUnavailable, GuestTimeout) as exc:
        v["answers"] = False
        v["auto_recovery"] = False
        v["no_answer"] = str(exc)
    v["class"] = S.consistency_for(v.get("guest_profile") or v["profile"], v["answers"])
    ctx.save()
    return {"answers": v["answers"], "class": v["class"], "note": v.get("no_answer")}


def s03(ctx: Ctx, vm: str) -> dict[str, Any]:
    if not ctx.vm(vm)["answers"]:
        return {"skipped": "no integration services"}
    rep = ctx.client(vm).prepare()
    return {"state": rep.get("state")}


def s04(ctx: Ctx, vm: str) -> dict[str, Any]:
    v = ctx.vm(vm)
    if not v["answers"]:
        return {"skipped": "no integration services: no freeze (crash-consistent)"}
    v["window"] = {"freeze_start": time.time()}
    v["frozen"] = True  # before the request: a failure from here on must thaw
    ctx.save()
    rep = ctx.client(vm).freeze(timeout_s=FLUSH_AND_HOLD_S)
    v["window"]["frozen_at"] = rep.get("frozen_at")
    v["window"]["open_txid"] = rep.get("open_txid")
    v["freeze_reply"] = {k: rep.get(k) for k in ("frozen", "timeout_s", "open_txid",
                                                 "ledger_last_txid", "t0")}
    return {"frozen": rep.get("frozen"), "open_txid": rep.get("open_txid")}


def _suspend(ctl: str) -> None:
    run(["dmsetup", "suspend", "--nolockfs", "--noudevsync", ctl])


def _resume(ctl: str) -> None:
    run(["dmsetup", "resume", "--noudevsync", ctl])


def s05(ctx: Ctx, vm: str) -> dict[str, Any]:
    """C per disk, all controllers of the VM held (suspend --nolockfs) across snapshot and
    redirect: no write can reach B after C was taken, even without a guest freeze."""
    made = []
    suspended: list[str] = []
    disks = []
    done = False
    for v, d, info in ctx.disks(vm):  # resumed after a kill: keep a C already in use
        c = info.get("C")
        if c and ctx.exists(c):
            if _maps(ctx, info["ctl"], c):
                info.setdefault("c_created_at", time.time())
                continue
            ctx.remove_lv(c)  # made, never mapped: take it again under suspension
        disks.append((v, d, info))
    try:
        for _, _, info in disks:
            _suspend(info["ctl"])
            suspended.append(info["ctl"])
        for v, d, info in disks:
            info["C"] = lv_name(v, d, "C", ctx.run["id"])
        ctx.save()  # names first: an unwind finds them (and by tags) whatever happens next
        for v, d, info in disks:
            c = info["C"]
            ctx.snapshot(info["B"], c, ROLE_OF["C"], v, d)
            info["C_exists"] = True
            info["c_created_at"] = time.time()
            made.append(c)
        for _, _, info in disks:
            run(["dmsetup", "reload", info["ctl"], "--table", dm.linear_table(
                ctx.lv_dev(info["C"]))])
        # Durable before the resume: from it on the guest writes to C, and a restart of the
        # lab (even a power loss) must map C again, never B.
        for v, d, info in disks:
            live.record(ctx.names, v, d, info["C"])
        done = True
    finally:
        for ctl in suspended:
            _resume(ctl)
        if suspended and not done:  # whatever became live on a failure is recorded too
            sync_live(ctx, vm)
    for _, _, info in ctx.disks(vm):
        info["redirected"] = dm.target_of(info["ctl"]) == dm.majmin(ctx.lv_dev(info["C"]))
        if not info["redirected"]:
            raise HvlabError(f"controller {info['ctl']} does not map C after the redirect")
    ctx.save()
    return {"made": made}


def s06(ctx: Ctx, vm: str) -> dict[str, Any]:
    made = []
    # Only a resumed run (name already recorded) pays for an lvs scan: this is in the freeze.
    known = {d for _, d, info in ctx.disks(vm) if info.get("A")}
    for v, d, info in ctx.disks(vm):
        info["A"] = lv_name(v, d, "A", ctx.run["id"])
    ctx.save()
    for v, d, info in ctx.disks(vm):
        a = info["A"]
        if d not in known or not ctx.exists(a):
            ctx.snapshot(info["B"], a, ROLE_OF["A"], v, d)
        info["A_exists"] = True
        made.append(a)
    ctx.save()
    return {"made": made}


def s07(ctx: Ctx, vm: str) -> dict[str, Any]:
    v = ctx.vm(vm)
    for _, _, info in ctx.disks(vm):
        if not info.get("redirected"):
            raise HvlabError(f"T0 without C on {info['ctl']}")
    v["t0"] = max(info["c_created_at"] for _, _, info in ctx.disks(vm))
    ctx.save()
    return {"t0": v["t0"]}


def s08(ctx: Ctx, vm: str) -> dict[str, Any]:
    v = ctx.vm(vm)
    if not v["answers"]:
        return {"skipped": "nothing frozen"}
    if not v["frozen"] and "thawed_at" in v["window"]:  # resumed after a kill past the thaw
        return {"window_s": round(v["window"]["seconds"], 3), "timed_out": False}
    rep = ctx.client(vm).thaw()
    end = time.time()
    v["frozen"] = False
    w = v["window"]
    w["thawed_at"] = rep.get("thawed_at") or end
    w["seconds"] = end - w["freeze_start"]
    w["guest_frozen_for_s"] = rep.get("frozen_for_s")
    ctx.save()
    if rep.get("timed_out"):
        raise HvlabError(f"{vm}: VSS_E_FLUSH_WRITES_TIMEOUT: the guest thawed itself after "
                         f"{rep.get('frozen_for_s')} s; the checkpoint is not consistent")
    if w["seconds"] > FLUSH_AND_HOLD_S:
        raise HvlabError(f"{vm}: freeze window {w['seconds']:.2f} s exceeds "
                         f"{FLUSH_AND_HOLD_S:g} s")
    return {"window_s": round(w["seconds"], 3), "timed_out": False}


def s09(ctx: Ctx, vm: str) -> dict[str, Any]:
    if not ctx.vm(vm)["answers"]:
        return {"skipped": "no integration services"}
    st = ctx.client(vm).status()
    if st.get("frozen"):
        raise HvlabError(f"{vm}: guest still reports frozen after thaw")
    return {"state": st.get("state"), "committed_txid": st.get("committed_txid")}


def ar_ctl(names: Names, vm: str, disk: str) -> str:
    return f"{names.vg}_ar_{vm}_{disk}"


def detach_ar(ctx: Ctx, name: str) -> bool:
    """Remove an auto-recovery attach device; first unmount it where a killed guest left it
    mounted (only mounts inside the lab dir: nothing else is ours). True if it existed."""
    if not any(x.name == name for x in dm.list_devices()):
        return False
    node = os.path.realpath(f"/dev/mapper/{name}")
    for m in fs.mounts_under(ctx.names.dir):
        if m.source.startswith("/dev/") and os.path.realpath(m.source) == node:
            fs.umount(Path(m.target))
            for d in (Path(m.target), Path(m.target).parent):  # the guest's ar-XXXX/<disk>
                with contextlib.suppress(OSError):
                    d.rmdir()
    dm.remove(name)
    return True


def s10(ctx: Ctx, vm: str) -> dict[str, Any]:
    v = ctx.vm(vm)
    if v["class"] != S.APP or not v.get("auto_recovery"):
        return {"skipped": f"{v['class']}: no auto-recovery (A stays = B@T0)"}
    devices: dict[str, str] = {}
    try:
        for _, d, info in ctx.disks(vm):
            name = ar_ctl(ctx.names, vm, d)
            info["ar_ctl"] = name
            ctx.save()
            detach_ar(ctx, name)  # left by a killed run: attach afresh
            devices[d] = dm.create_linear(name, ctx.lv_dev(info["A"]),
                                          uuid=f"{ctx.names.uuid_prefix}ar-{vm}-{d}")
            wait_node(devices[d])
        rep = ctx.client(vm).post_snapshot(devices)
    finally:
        for _, d, _info in ctx.disks(vm):
            detach_ar(ctx, ar_ctl(ctx.names, vm, d))
    v["auto_recovery_result"] = {k: rep.get(k) for k in ("auto_recovery", "repaired", "check")}
    ctx.save()
    check = rep.get("check") or {}
    if check and not check.get("consistent"):
        raise HvlabError(f"{vm}: auto-recovery left A inconsistent: {check.get('problems')}")
    return {"attached": devices, "repaired": rep.get("repaired"),
            "consistent_after": check.get("consistent")}


def s11(ctx: Ctx, vm: None) -> dict[str, Any]:
    made = []
    start = time.time()
    for v, d, info in ctx.disks():
        for art, origin in (("S_B", info["B"]), ("S_A", info["A"])):
            name = lv_name(v, d, art, ctx.run["id"])
            info[art] = name
            ctx.save()
            if not ctx.exists(name):
                ctx.snapshot(origin, name, ROLE_OF[art], v, d, read_only=True)
            else:  # made by a killed step 11; a kill inside lvcreate may leave it inactive
                ctx.lvm("lvchange", "-q", "-ay", vg_lv(ctx, name))
                wait_node(ctx.lv_dev(name))
            info[f"{art}_exists"] = True
            made.append(name)
    ctx.run["snapshot_set"] = {"start": start, "end": time.time(), "members": made}
    ctx.save()
    return {"made": made}


def s12(ctx: Ctx, vm: None) -> dict[str, Any]:
    removed = []
    for _, _, info in ctx.disks():
        if info.get("A_exists"):
            ctx.remove_lv(info["A"])
            info["A_exists"] = False
            removed.append(info["A"])
            ctx.save()
    return {"removed": removed}


def s13(ctx: Ctx, vm: None) -> dict[str, Any]:
    from hvlab.backup import reader

    dest = Path(ctx.run["dest"])
    if not owns_dest(dest, ctx.run["id"]):
        raise HvlabError(f"backup directory {dest} is missing or no longer this run's "
                         f"(no {DEST_MARK} naming {ctx.run['id']})")
    images: dict[str, Any] = {}
    lvs = [info[a] for _, _, info in ctx.disks() for a in ("S_B", "S_A")]
    ids = thin_ids(ctx, lvs)
    with thinmeta.metadata_snap(ctx.names) as snap:
        maps = {lv: snap.mapping(ids[lv]) for lv in lvs}
        deltas = {f"{v}/{d}": snap.delta(ids[info["S_B"]], ids[info["S_A"]])
                  for v, d, info in ctx.disks()}
    total = sum(maps[info["S_A"]].mapped_blocks * maps[info["S_A"]].block_bytes
                for _, _, info in ctx.disks())
    prog = ctx.progress
    task = prog.add_task("step 13: reading S", total=total) if prog is not None else None

    def advance(n: int) -> None:
        if prog is not None:
            prog.update(task, advance=n)

    for v, d, info in ctx.disks():
        key = f"{v}/{d}"
        m = maps[info["S_A"]]
        file = dest / f"{v}_{d}.img"
        file.unlink(missing_ok=True)  # a resumed step 13 starts its images over
        dev = ctx.lv_dev(info["S_A"])
        # The LV's own size (rounded up to whole extents; the filesystem spans all of it).
        res = reader.read_image(dev, m, _dev_size(dev), file, advance)
        delta = deltas[key]
        bs = m.block_bytes
        images[key] = {
            "file": file.name, **res, "vm": v, "disk": d, "fs": info["fs"],
            "source": info["S_A"],
            "base_at_t0": {"lv": info["S_B"], "mapped_blocks": maps[info["S_B"]].mapped_blocks},
            "auto_recovery_ranges": [
                {"kind": k, "offset": b * bs, "length": n * bs}
                for k in ("different", "right_only", "left_only") for b, n in delta[k]],
        }
    ctx.run["images"] = images
    ctx.save()
    return {"images": {k: {"sha256": i["sha256"], "bytes_read": i["bytes_read"],
                           "auto_recovery_blocks": sum(r["length"] for r in
                                                       i["auto_recovery_ranges"]) // bs}
                       for k, i in images.items()}}


def _dev_size(dev: str) -> int:
    fd = os.open(dev, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def promote(ctx: Ctx, vm: str, disk: str, info: dict[str, Any]) -> None:
    """Merge C into B: B's LV goes, C takes its name and the live-disk role. The controller
    maps C's dm device, which LVM renames in place: the guest sees nothing. Every part is
    skipped when already done, so a run killed half-way through finishes it."""
    vg = ctx.names.vg
    if ctx.exists(info["C"]):
        ctx.remove_lv(info["B"])
        ctx.lvm("lvrename", "-q", vg, info["C"], info["B"])
    live.record(ctx.names, vm, disk, info["B"])  # the renamed C is the disk now
    info["C_exists"] = False
    ctx.save()
    retag_base(ctx, info["B"])
    info["merged"] = True
    ctx.save()


def retag_base(ctx: Ctx, lv: str) -> None:
    """A renamed C still carries its checkpoint tags: make it the live disk (idempotent)."""
    tags = ctx.lvs()[lv]["lv_tags"].split(",")
    stale = [t for t in tags if t == "role_checkpoint" or t.startswith("run_")]
    if stale or "role_base" not in tags:
        ctx.lvm("lvchange", "-q", *[x for t in stale for x in ("--deltag", t)],
                "--addtag", "role_base", f"{vg_lv(ctx, lv)}")


def vg_lv(ctx: Ctx, lv: str) -> str:
    return f"{ctx.names.vg}/{lv}"


def s14(ctx: Ctx, vm: None) -> dict[str, Any]:
    removed = []
    for _, _, info in ctx.disks():
        for art in ("S_B", "S_A"):
            if info.get(f"{art}_exists"):
                ctx.remove_lv(info[art])
                info[f"{art}_exists"] = False
                removed.append(info[art])
                ctx.save()
    merged = []
    for v, d, info in ctx.disks():
        promote(ctx, v, d, info)  # idempotent: a resumed step 14 finishes a half-done merge
        merged.append(f"{info['C']} -> {info['B']}")
    return {"removed": removed, "merged": merged}


def action(n: int) -> Callable[[Ctx, Any], dict[str, Any]]:
    """Looked up at call time, so a test can monkeypatch `engine.s05` to inject a failure."""
    fn: Callable[[Ctx, Any], dict[str, Any]] = globals()[f"s{n:02d}"]
    return fn


# ------------------------------------------------------------------------------ execution
def _event(ctx: Ctx, n: int, vm: str | None, fn: Callable[[Ctx, Any], dict[str, Any]]
           ) -> dict[str, Any]:
    st = S.step(n)
    ev: dict[str, Any] = {"run": ctx.run["id"], "step": n, "name": st.name, "vm": vm,
                          "veeam": st.veeam, "lab": st.lab, "in_freeze": st.in_freeze}
    ev["start"] = time.time()
    try:
        with watch(settle=0.0 if st.in_freeze else 0.25) as rec:
            try:
                ev["detail"] = fn(ctx, vm)
            except BaseException as exc:
                ev["error"] = f"{type(exc).__name__}: {exc}"
                raise
            finally:
                ev["end"] = time.time()
    finally:  # the recorder is filled when the watch ends
        ev["devices_created"] = rec.created()
        ev["devices_removed"] = rec.removed()
    scope = vm
    ev["writes_to"] = writes_to(ctx)
    if st.in_freeze:
        ev["fingerprints"] = None
        ev["fingerprints_note"] = "not measured inside the freeze window (kept short)"
    else:
        ev["fingerprints"] = fingerprints(ctx, scope)
    return ev


def _say_event(ctx: Ctx, ev: dict[str, Any]) -> None:
    d = ev.get("detail") or {}
    who = ev["vm"] or "job"
    def fmt(v: Any) -> str:
        return " ".join(map(str, v)) if isinstance(v, list) else str(v)

    extra = d.get("skipped") or ", ".join(f"{k}={fmt(v)}" for k, v in d.items()
                                          if k in ("class", "made", "removed", "merged",
                                                   "window_s", "consistent_after"))
    w = ", ".join(f"{k}->{x['artifact']}" for k, x in ev["writes_to"].items()
                  if ev["vm"] is None or k.startswith(f"{ev['vm']}/"))
    ctx.say(f"[{ev['step']:02d}] {who:5} {ev['name']:<24} {ev['end'] - ev['start']:6.2f}s  "
            f"{extra}  writes: {w}")


def execute(ctx: Ctx) -> dict[str, Any]:
    """Run from run['pos'] to the pause point or the end. Any failure thaws and unwinds."""
    run_ = ctx.run
    plan = S.plan(run_["vms"])
    try:
        while run_["pos"] < len(plan):
            n, vm = plan[run_["pos"]]
            ev = _event(ctx, n, vm, action(n))
            runs.append_event(ctx.names, run_["id"], ev)
            _say_event(ctx, ev)
            run_["pos"] += 1
            run_["last_step"] = n
            ctx.save()
            if run_.get("pause_at") is not None and run_["pos"] - 1 == run_["pause_at"]:
                run_["state"] = "paused"
                run_["pause_at"] = None
                ctx.save()
                return run_
        finish(ctx)
        return run_
    except BaseException as exc:
        err = f"{type(exc).__name__}: {exc}"
        run_["error"] = err
        ctx.say(f"step failed: {err}; unwinding")
        try:
            unwind(ctx, final="failed")
        except Exception as exc2:
            run_["unwind_error"] = str(exc2)
            ctx.save()
            raise FlowFailed(f"run {run_['id']} failed ({err}) and unwinding failed: "
                             f"{exc2}") from exc
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise FlowFailed(f"run {run_['id']} failed and was unwound: {err}") from exc


def finish(ctx: Ctx) -> None:
    from hvlab.backup import manifest

    ctx.run["post"] = snapshot_state(ctx)
    ctx.save()
    # The manifest first: a kill between the two leaves a resumable run, never a "done" run
    # whose backup cannot be verified or restored.
    manifest.write(ctx.names, {**ctx.run, "state": "done"})
    ctx.run["state"] = "done"
    ctx.save()


def thaw_all(ctx: Ctx) -> list[str]:
    """Thaw every VM of the run that may be frozen; safe to call any time."""
    notes = []
    for vm in ctx.run["vms"]:
        v = ctx.vm(vm)
        if v.get("answers"):
            try:
                rep = ctx.client(vm).abort()
                if rep.get("thawed"):
                    notes.append(f"{vm}: thawed by abort")
            except GuestError as exc:
                notes.append(f"{vm}: abort: {exc}")
        rec = recover_after_crash(ctx.names.guest_dir(vm))
        if rec.get("thawed"):
            notes.append(f"{vm}: recovered freeze marker, thawed {rec['thawed']}")
        v["frozen"] = False
    ctx.save()
    return notes


def resume_controllers(ctx: Ctx) -> None:
    """Resume every controller of the run: one left suspended by a killed step 5 holds the
    guest's writes. A table loaded before the kill (C) becomes live, which is what step 5
    had decided; steps that follow check what the controller maps."""
    for _, _, info in ctx.disks():
        dm.run_resume(info["ctl"])
    sync_live(ctx)


def sync_live(ctx: Ctx, vm: str | None = None) -> None:
    """Record, per disk, the LV its controller maps now (what a restarted lab must map)."""
    for v, d, info in ctx.disks(vm):
        lv = _lv_of_majmin(ctx.names, dm.target_of(info["ctl"]))
        if lv in (info["B"], info.get("C")):
            live.record(ctx.names, v, d, lv)


def _maps(ctx: Ctx, ctl: str, lv: str) -> bool:
    """Does controller ctl map lv? An LV left inactive by a kill inside lvcreate has no
    node, so nothing maps it."""
    dev = ctx.lv_dev(lv)
    return os.path.exists(dev) and dm.target_of(ctl) == dm.majmin(dev)


def unwind(ctx: Ctx, final: str) -> list[str]:
    """Undo a run at any point, leaving the live disks whole."""
    run_ = ctx.run
    run_["state"] = "aborting"
    runs.mark_self(run_)
    ctx.save()
    # Resume before thawing: ext4's thaw writes its superblock, and on a controller left
    # suspended (a kill inside step 5) that write, and the thaw with it, would never end.
    resume_controllers(ctx)
    notes = thaw_all(ctx)
    vg = ctx.names.vg
    existing = ctx.lvs()
    for v, d, info in ctx.disks():
        name = ar_ctl(ctx.names, v, d)
        if detach_ar(ctx, name):
            notes.append(f"removed {name}")
        for art in ("S_A", "S_B", "A"):
            lv = info.get(art)
            if lv and lv in existing:
                ctx.lvm("lvremove", "-q", "-y", f"{vg}/{lv}")
                notes.append(f"removed {art} {lv}")
            info[f"{art}_exists"] = False
        c = info.get("C")
        if c and c in existing:
            # Live (mapped, or recorded live before a restart): the guest may have written
            # to it. Only a C that never went live is removed.
            if _maps(ctx, info["ctl"], c) or live.recorded(ctx.names, v, d) == c:
                promote(ctx, v, d, info)
                notes.append(f"merged C {c} into {info['B']} (the guest already wrote to it)")
            else:
                ctx.lvm("lvremove", "-q", "-y", f"{vg}/{c}")
                notes.append(f"removed C {c} (never written)")
        elif c and info["B"] in existing and f"run_{run_['id']}" in existing[info["B"]][
                "lv_tags"].split(","):
            retag_base(ctx, info["B"])  # killed between the rename and the retag
            notes.append(f"finished the merge of C into {info['B']}")
        info["C_exists"] = False
        ctx.save()
    dest = Path(run_["dest"])
    if run_.get("dest_made") and run_.get("state") != "done":
        if owns_dest(dest, run_["id"]):
            shutil.rmtree(dest, ignore_errors=True)
            notes.append(f"removed partial backup {dest}")
        elif dest.exists():
            notes.append(f"left {dest}: not marked as this run's")
    run_["unwound"] = notes
    run_["state"] = final
    run_["post"] = snapshot_state(ctx)
    ctx.save()
    runs.append_event(ctx.names, run_["id"], {"run": run_["id"], "step": None,
                                             "name": f"unwind ({final})", "vm": None,
                                             "start": time.time(), "end": time.time(),
                                             "detail": {"notes": notes},
                                             "writes_to": writes_to(ctx)})
    for note in notes:
        ctx.say(f"  {note}")
    return notes


# ------------------------------------------------------------------------------ start
def snapshot_state(ctx: Ctx) -> dict[str, Any]:
    """LV set (name -> roles) and pool usage: invariant 8 compares pre and post."""
    lvs = {}
    for name, r in ctx.lvs().items():
        if name.startswith("[") or name == ctx.names.pool:
            continue
        lvs[name] = sorted(t for t in r["lv_tags"].split(",") if t.startswith("role_"))
    used, total = thinmeta.pool_usage(ctx.names)
    return {"lvs": lvs, "pool_used_blocks": used, "pool_blocks": total}


def leftovers(names: Names, lvm: Lvm, vms: list[str], live_runs: set[str]
              ) -> list[str]:
    out = []
    for r in lvm.lvs(names.vg):
        tags = r["lv_tags"].split(",")
        role = next((t for t in tags if t in LEFTOVER_TEXT), None)
        vm = next((t[3:] for t in tags if t.startswith("vm_")), None)
        run_tag = next((t[4:] for t in tags if t.startswith("run_")), None)
        if role and vm in vms and run_tag not in live_runs:
            out.append(f"{vm}: {LEFTOVER_TEXT[role]} exists ({r['lv_name']}, run "
                       f"{run_tag or '?'}) - like 0x800423FB; `hvlab backup --abort "
                       f"{run_tag}` or remove it by hand")
    return out


DEST_MARK = ".hvlab-run"


def claim_dest(dest: Path, run_id: str) -> None:
    """Make the backup directory now, marked with the run id: a second run (or a paused one)
    can never write into or remove a directory that is not its own."""
    try:
        dest.mkdir(parents=True)
    except FileExistsError:
        raise BadInput(f"backup directory {dest} already exists") from None
    (dest / DEST_MARK).write_text(run_id + "\n")


def owns_dest(dest: Path, run_id: str) -> bool:
    try:
        return (dest / DEST_MARK).read_text().strip() == run_id
    except OSError:
        return False


def _check_dest(dest: Path) -> None:
    if dest.exists():
        raise BadInput(f"backup directory {dest} already exists")
    parent = dest.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK) or not parent.is_dir():
        raise BadInput(f"backup directory {dest} is not writable ({parent})")


def _check_lab_up(lab: str) -> State:
    st = State.load(lab)
    if st is None or st.phase != "up":
        raise BadInput(f"lab {lab!r} is not up (`hvlab up` first)")
    return st


def start(lab: str, vms: list[str], *, dest: Path | None = None,
          pause_after: int | None = None, say: Say = _quiet, fingerprints: bool = True,
          progress: Any = None) -> dict[str, Any]:
    """`hvlab backup VM [VM ...]`: validate everything, register the run, execute."""
    names = Names(lab)
    st = _check_lab_up(lab)
    if not vms:
        raise BadInput("name at least one VM to back up")
    if len(set(vms)) != len(vms):
        raise BadInput("a VM is named twice")
    defn = st.definition
    vmdefs = [defn.vm(v) for v in vms]  # BadInput for an unknown VM
    run_id = runs.new_id()
    pause_at = S.pause_position(vms, pause_after)
    dest = (dest or names.backups_dir / run_id).absolute()
    _check_dest(dest)
    with runs.VmLocks(names, vms):
        with locked(lab):
            ctx = _register(names, run_id, vms, vmdefs, dest, pause_at, pause_after, say,
                            fingerprints)
        ctx.progress = progress
        ctx.say(f"run {run_id}: backup of {', '.join(vms)} -> {dest}")
        return execute(ctx)


def _register(names: Names, run_id: str, vms: list[str], vmdefs: list[Any], dest: Path,
              pause_at: int | None, pause_after: int | None, say: Say,
              fingerprints: bool) -> Ctx:
    """Under the lab lock: no other live run for these VMs, no leftovers; write run.json."""
    lab = names.lab
    active = {r["id"]: r for r in runs.active_runs(names)}
    for r in active.values():
        busy = sorted(set(r["vms"]) & set(vms))
        if busy:
            raise BadInput(f"VM {busy[0]} is already in a running backup "
                           f"({r['id']}, {runs.effective_state(r)})")
    left = leftovers(names, Lvm(names.lvm_dir), vms, set(active))
    if left:
        raise BadInput("leftovers of an earlier run, not reused: " + "; ".join(left))
    run_: dict[str, Any] = {
        "id": run_id, "lab": lab, "vms": vms, "dest": str(dest), "state": "running",
        "mode": "on-host", "created": time.time(), "pos": 0, "pause_at": pause_at,
        "pause_after": pause_after, "error": None, "vm": {}}
    for vd in vmdefs:
        run_["vm"][vd.name] = {
            "profile": vd.profile, "answers": None, "class": None, "frozen": False,
            "disks": {d.name: {"B": names.lv(vd.name, d.name), "ctl": names.ctl(
                vd.name, d.name), "size": d.size, "fs": d.fs} for d in vd.disks}}
    runs.mark_self(run_)
    ctx = Ctx(names, run_, say, fingerprints)
    run_["pre"] = snapshot_state(ctx)
    claim_dest(dest, run_id)
    run_["dest_made"] = True
    ctx.save()
    return ctx


def resume(lab: str, run_id: str, *, say: Say = _quiet, fingerprints: bool = True,
           progress: Any = None, pause_after: int | None = None) -> dict[str, Any]:
    names = Names(lab)
    run_ = runs.load(names, run_id)
    state = runs.effective_state(run_)
    if state in runs.FINAL:
        raise BadInput(f"run {run_id} is {state}: nothing to resume")
    if state not in ("paused", "interrupted"):
        raise BadInput(f"run {run_id} is {state} in another process")
    if run_.get("state") == "aborting":
        raise BadInput(f"run {run_id} was interrupted while aborting: "
                       f"`hvlab backup --abort {run_id}` finishes it")
    plan = S.plan(run_["vms"])
    if state == "interrupted" and 0 < run_["pos"] < len(plan) and (
            any(run_["vm"][v].get("frozen") for v in run_["vms"])):
        raise BadInput(f"run {run_id} was interrupted inside a freeze window: "
                       f"`hvlab backup --abort {run_id}`")
    pos = S.pause_position(run_["vms"], pause_after)
    if pos is not None and pos < run_["pos"]:
        raise BadInput(f"run {run_id} is already past step {pause_after}: "
                       f"--pause-after must name a later step")
    _check_lab_up(lab)
    with runs.VmLocks(names, run_["vms"]):
        run_["pause_at"] = pos
        run_["state"] = "running"
        runs.mark_self(run_)
        ctx = Ctx(names, run_, say, fingerprints)
        ctx.progress = progress
        ctx.save()
        if state == "interrupted":
            resume_controllers(ctx)
        if run_["pos"] >= len(plan):
            ctx.say(f"run {run_id}: all steps done; writing the manifest")
        else:
            ctx.say(f"run {run_id}: resuming at step {plan[run_['pos']][0]}")
        return execute(ctx)


def abort(lab: str, run_id: str, *, say: Say = _quiet) -> dict[str, Any]:
    names = Names(lab)
    run_ = runs.load(names, run_id)
    state = runs.effective_state(run_)
    if state in runs.FINAL:
        raise BadInput(f"run {run_id} is {state}: nothing to abort")
    if state == "running":
        raise BadInput(f"run {run_id} is running in process {run_.get('pid')}; "
                       f"interrupt it (Ctrl-C unwinds it)")
    _check_lab_up(lab)
    with runs.VmLocks(names, run_["vms"]):
        ctx = Ctx(names, run_, say, fingerprints=False)
        unwind(ctx, final="aborted")
    return run_


def describe_devices(ctx_or_run: dict[str, Any], names: Names) -> list[tuple[str, str, str]]:
    """(device path, role, note) of every artifact of a run that exists now."""
    out = []
    for vm, v in ctx_or_run["vm"].items():
        for d, info in v["disks"].items():
            out.append((f"/dev/mapper/{info['ctl']}", f"controller {vm}/{d}",
                        "guest writes here"))
            out.append((names.lv_path(info["B"]), "B live disk / frozen at T0"
                        if info.get("redirected") and not info.get("merged") else "B live disk",
                        ""))
            labels = {"C": "C backup checkpoint", "A": "A auto-recovery checkpoint",
                      "S_B": "S external snapshot of B", "S_A": "S external snapshot of A"}
            for art, label in labels.items():
                if info.get(f"{art}_exists") and info.get(art):
                    out.append((names.lv_path(info[art]), label, ""))
    return out
