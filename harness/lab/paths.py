"""Where a lab lives and what its objects are called. Every name carries the lab's prefix."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("HVLAB_HOME", "/var/lib/hvlab"))


# Backups live beside the labs, not inside one: `hvlab down` removes a lab's directory and
# must not take its backups with it (`hvlab down --purge` does).
BACKUPS = "backups"


def backups_root() -> Path:
    return home() / BACKUPS


@dataclass(frozen=True)
class Names:
    lab: str

    # --- host files -----------------------------------------------------------------
    @property
    def dir(self) -> Path:
        return home() / self.lab

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    @property
    def lock_file(self) -> Path:
        return self.dir / ".lock"

    @property
    def lvm_dir(self) -> Path:
        return self.dir / "lvm"

    @property
    def backing_dir(self) -> Path:
        return self.dir / "backing"

    def backing_file(self, i: int) -> Path:
        return self.backing_dir / f"pv{i}.img"

    @property
    def mnt_dir(self) -> Path:
        return self.dir / "mnt"

    def mountpoint(self, vm: str, disk: str) -> Path:
        return self.mnt_dir / vm / disk

    def guest_dir(self, vm: str) -> Path:
        return self.dir / "guests" / vm

    @property
    def runs_dir(self) -> Path:
        return self.dir / "runs"

    @property
    def backups_dir(self) -> Path:
        """Default home of this lab's backups: outside the lab directory, so they outlive it."""
        return backups_root() / self.lab

    # --- LVM and device-mapper ----------------------------------------------------------
    @property
    def vg(self) -> str:
        return f"hvlab_{self.lab}"

    @property
    def tag(self) -> str:
        return f"hvlab_{self.lab}"

    pool = "pool"

    @staticmethod
    def lv(vm: str, disk: str) -> str:
        return f"{vm}_{disk}"

    @property
    def dm_prefixes(self) -> tuple[str, str]:
        """LVM's devices are VG-LV; ours are VG_kind_... Lab names contain neither '-' nor '_'."""
        return (f"{self.vg}-", f"{self.vg}_")

    def ctl(self, vm: str, disk: str) -> str:
        return f"{self.vg}_ctl_{vm}_{disk}"

    def ctl_uuid(self, vm: str, disk: str) -> str:
        return f"HVLAB-{self.lab}-ctl-{vm}-{disk}"

    @property
    def uuid_prefix(self) -> str:
        return f"HVLAB-{self.lab}-"

    def lv_path(self, lv: str) -> str:
        return f"/dev/{self.vg}/{lv}"

    def dm_lv_name(self, lv: str) -> str:
        return f"{self.vg}-{lv.replace('-', '--')}"
