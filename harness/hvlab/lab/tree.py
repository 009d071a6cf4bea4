"""The lab's device tree, as data (for --json) and as a picture (rich)."""

from __future__ import annotations

import os
from typing import Any

import psutil
from rich.tree import Tree

from hvlab.console import console as make_console
from hvlab.lab import guests
from hvlab.lab.inventory import pv_devices as substrate_pvs
from hvlab.lab.paths import Names, role_of
from hvlab.lab.state import State
from hvlab.sys import dm, fs, loop


def holders(path: str) -> list[str]:
    """Processes with files open below a mount point (psutil), as 'name[pid]'."""
    out = []
    prefix = path.rstrip("/") + "/"
    for proc in psutil.process_iter(["pid", "name"]):
        try:
            files = proc.open_files()
            cwd = proc.cwd()
        except psutil.Error:
            continue
        if cwd.startswith(prefix) or cwd == path or any(
                f.path.startswith(prefix) for f in files):
            out.append(f"{proc.info['name']}[{proc.info['pid']}]")
    return out


def build(lab: str) -> dict[str, Any]:
    names = Names(lab)
    st = State.load(lab)
    out: dict[str, Any] = {"lab": lab, "dir": str(names.dir),
                           "phase": st.phase if st else "absent", "files": [], "pool": None,
                           "lvs": [], "controllers": [], "mounts": [], "guests": []}
    if st is None:
        return out
    loops = {lo.back_file: lo.name for lo in loop.loops_under(names.dir)}
    dms = {d.name: d for d in dm.list_devices() if d.uuid.startswith(names.uuid_prefix)}
    for i in range(st.definition.backing_files):
        f = names.backing_file(i)
        size = f.stat().st_size if f.exists() else 0
        used = f.stat().st_blocks * 512 if f.exists() else 0
        pv = dms.get(names.pv(i))
        out["files"].append({"file": str(f), "size": size, "allocated": used,
                             "loop": loops.get(str(f.resolve())) or loops.get(str(f)),
                             "pv": pv.path if pv else None})
    if loops:
        lvm = names.lvm()
        rows = list(lvm.lvs(names.vg).values()) if (names.lvm_dir / "lvm.conf").exists() else []
        for r in rows:
            if r.name == names.pool:
                out["pool"] = {"name": f"{names.vg}/{names.pool}", "size": r.size or 0,
                               "data_percent": r.data_percent,
                               "metadata_percent": r.metadata_percent,
                               "vg": names.vg, "pvs": substrate_pvs(names)}
            elif r.hidden:
                continue  # hidden pool internals
            else:
                tags = ",".join(sorted(r.tags))
                out["lvs"].append({"name": r.name, "size": r.size or 0,
                                   "allocated_percent": r.data_percent,
                                   "origin": r.origin, "role": role_of(r.tags),
                                   "tags": tags, "active": "active" if r.active else "",
                                   "path": names.lv_path(r.name)})
        by_majmin = {r.majmin: r.name for r in rows if r.majmin}
        for d in dms.values():
            if d.uuid.startswith(f"{names.uuid_prefix}pv-"):
                continue  # shown with its backing file
            target = dm.target_of(d.name)
            kind = ("auto-recovery attach (step 10)" if d.name.startswith(f"{names.vg}_ar_")
                    else "controller")
            out["controllers"].append({"name": d.name, "path": d.path, "kind": kind,
                                       "maps_to": by_majmin.get(target, target),
                                       "open": d.open_count})
    for m in fs.mounts_under(names.dir):
        out["mounts"].append({"target": m.target, "source": os.path.realpath(m.source),
                              "fstype": m.fstype, "device": m.source,
                              "holders": holders(m.target)})
    for vm in st.definition.vms:
        from hvlab.guest.supervise import guest_status

        run_dir = names.guest_dir(vm.name)
        info = guest_status(run_dir) if run_dir.exists() else {"alive": False}
        out["guests"].append({"vm": vm.name, "profile": vm.profile, **info,
                              "socket": guests.socket_path(names, vm.name)})
    return out


def _mb(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


def render(t: dict[str, Any], *, with_guests: bool = False) -> None:
    con = make_console()
    root = Tree(f"[bold]lab {t['lab']}[/] ({t['phase']}) - {t['dir']}")
    if t["phase"] == "absent":
        con.print(root)
        con.print("no such lab; `hvlab up` creates it")
        return
    mounts_by_dev = {m["device"]: m for m in t["mounts"]}
    ctl_by_lv: dict[str, list[dict[str, Any]]] = {}
    for c in t["controllers"]:
        ctl_by_lv.setdefault(c["maps_to"], []).append(c)
    for f in t["files"]:
        node = root.add(f"file {f['file']}  {_mb(f['size'])} ({_mb(f['allocated'])} allocated)")
        node = node.add(f"loop {f['loop'] or '[red]not attached[/]'}")
        if f.get("pv"):
            node.add(f"dm-linear {f['pv']} (the PV; a fault target can replace it)")
    pool = t["pool"]
    if pool:
        pnode = root.add(f"PV {' '.join(pool['pvs'])} -> VG {pool['vg']} -> thin pool "
                         f"{pool['name']}  {_mb(pool['size'])}  data {pool['data_percent']}%  "
                         f"meta {pool['metadata_percent']}%")
        for lv in t["lvs"]:
            extra = f" origin={lv['origin']}" if lv["origin"] else ""
            role = f" [cyan]{lv['role']}[/]" if lv["role"] else ""
            lnode = pnode.add(f"LV {lv['name']}{role}  {_mb(lv['size'])} virtual, "
                              f"{lv['allocated_percent']}% allocated{extra}")
            for c in ctl_by_lv.get(lv["name"], []):
                cnode = lnode.add(f"{c.get('kind', 'controller')} {c['path']} "
                                  f"(open {c['open']})")
                m = mounts_by_dev.get(c["path"])
                if m:
                    held = ", ".join(m["holders"]) or "-"
                    cnode.add(f"mount {m['target']} ({m['fstype']}) holders: {held}")
    con.print(root)
    if with_guests and t["guests"]:
        for g in t["guests"]:
            state = "running" if g.get("alive") else "stopped"
            st = g.get("status") or {}
            frozen = " [red]FROZEN[/]" if st.get("frozen") else ""
            con.print(f"guest {g['vm']} ({g['profile']}): {state}, pid {g.get('pid', '-')}, "
                      f"committed txid {st.get('committed_txid', '-')}{frozen}")


