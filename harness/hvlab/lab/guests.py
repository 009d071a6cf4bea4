"""The lab's side of the guest emulators: one per VM, started at `up`, stopped at `down`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hvlab.lab.paths import Names

if TYPE_CHECKING:
    from hvlab.lab.definition import LabDef


def socket_path(names: Names, vm: str) -> str:
    return str(names.guest_dir(vm) / "ic.sock")


def config_for(defn: LabDef, names: Names, vm: str, **knobs: Any) -> dict[str, Any]:
    v = defn.vm(vm)
    return {
        "vm": vm,
        "profile": v.profile,
        "socket": socket_path(names, vm),
        "run_dir": str(names.guest_dir(vm)),
        "disks": [{"name": d.name, "mountpoint": str(names.mountpoint(vm, d.name))}
                  for d in v.disks],
        "workload": dict(v.workload),
        **knobs,
    }


def running_pids(names: Names) -> list[int]:
    from hvlab.guest.supervise import running

    root = names.dir / "guests"
    if not root.exists():
        return []
    return [p for d in sorted(root.iterdir()) if d.is_dir() and (p := running(d)) is not None]


def start_all(defn: LabDef, names: Names, **knobs: Any) -> None:
    from hvlab.guest.supervise import start_guest

    for vm in defn.vms:
        names.guest_dir(vm.name).mkdir(parents=True, exist_ok=True)
        start_guest(config_for(defn, names, vm.name, **knobs))


def stop_all(names: Names) -> None:
    root = names.dir / "guests"
    if not root.exists():
        return
    from hvlab.guest.supervise import stop_guest

    for run_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        stop_guest(run_dir, 10.0)


def reboot(defn: LabDef, names: Names, vm: str) -> list[str]:
    """What a reboot does to a VM whose filesystem failed (ext4 read-only after its journal
    aborted on an I/O error, xfs shut down): the guest stopped (thawed first), each disk
    unmounted, checked and repaired, mounted again, the guest started; its applications
    recover from what is on disk. Returns what was done, a line per disk."""
    from hvlab.guest.supervise import start_guest, stop_guest
    from hvlab.sys import fs

    v = defn.vm(vm)
    stop_guest(names.guest_dir(vm), 15.0)
    done = []
    for d in v.disks:
        mp, dev = names.mountpoint(vm, d.name), f"/dev/mapper/{names.ctl(vm, d.name)}"
        if fs.is_mounted(mp):
            fs.umount(mp)
        done.append(fs.repair(dev, d.fs, mp))
        fs.mount(dev, mp, d.fs)
    start_guest(config_for(defn, names, vm))
    return done
