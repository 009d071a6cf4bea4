"""Where a lab lives and what its objects are called. Every name carries the lab's prefix."""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from hvlab.errors import BadInput
from hvlab.lab.record import Artifact
from hvlab.sys.lvm import Lvm


def home() -> Path:
    """HVLAB_HOME with its symlinks resolved: the folder itself may be a symlink (say
    /var/lib/hvlab on a bigger disk), nothing below it may be (see refuse_links)."""
    return Path(os.path.realpath(os.environ.get("HVLAB_HOME", "/var/lib/hvlab")))


def below_home(path: Path) -> bool:
    """Whether `path` (symlinks resolved) lies strictly inside HVLAB_HOME."""
    return home() in Path(os.path.realpath(path)).parents


def refuse_links(path: Path, what: str) -> None:
    """Where the lab writes or removes, nothing inside HVLAB_HOME may be a symlink: a planted
    link would send a backup, a state file or a removal elsewhere. Walks `path` part by part
    as the kernel does (following symlinks outside HVLAB_HOME, which are yours: the parents
    of a --dest) and refuses the first symlink that lies inside HVLAB_HOME, and a file where
    a folder must be. What does not exist yet is made by us, without following anything."""
    root = home()
    cur = Path("/") if path.is_absolute() else Path(os.getcwd())
    pending = list(path.parts[1:] if path.is_absolute() else path.parts)
    hops = 0
    while pending:
        part = pending.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            cur = cur.parent  # cur is always a real folder: its parent is the kernel's too
            continue
        nxt = cur / part
        try:
            st = os.lstat(nxt)
        except FileNotFoundError:
            return
        except NotADirectoryError:
            raise BadInput(f"{what} {path}: {cur} is not a folder") from None
        if stat.S_ISLNK(st.st_mode):
            if root in nxt.parents:
                where = f"{what} {path}: {nxt}" if nxt != path else f"{what} {nxt}"
                raise BadInput(f"{where} is a symlink (to {os.readlink(nxt)}): hvlab never "
                               f"writes or removes through a symlink inside HVLAB_HOME {root} "
                               f"(HVLAB_HOME itself may be one); remove the link")
            hops += 1
            if hops > 40:
                raise BadInput(f"{what} {path}: too many levels of symlinks")
            target = Path(os.readlink(nxt))
            if target.is_absolute():
                cur = Path("/")
            pending = list(target.parts[1:] if target.is_absolute() else target.parts) + pending
            continue
        if any(p not in ("", ".") for p in pending) and not stat.S_ISDIR(st.st_mode):
            raise BadInput(f"{what} {path}: {nxt} is not a folder")
        cur = nxt


def refuse_links_in_lab(names: Names) -> None:
    """The lab folder and everything in it, on its own filesystem (a mounted disk is the
    guest's): no symlink anywhere, so nothing the lab writes, mounts or removes goes elsewhere.
    hvlab never makes a symlink there; one found was planted."""
    refuse_links(names.dir, "lab folder")
    try:
        top = os.lstat(names.dir)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(top.st_mode):
        raise BadInput(f"lab folder {names.dir} is not a folder: remove it or choose "
                       f"another lab name")
    todo = [names.dir]
    while todo:
        try:
            entries = list(os.scandir(todo.pop()))
        except (FileNotFoundError, NotADirectoryError):
            continue  # removed meanwhile (a verify's scratch folder)
        for e in entries:
            try:
                st = e.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            except OSError as exc:  # a guest's disk that failed (xfs shut down): its own
                if exc.errno in (errno.EIO, errno.EUCLEAN) and e.path.startswith(
                        str(names.mnt_dir)):
                    continue
                raise
            if stat.S_ISLNK(st.st_mode):
                refuse_links(Path(e.path), "in the lab folder,")
            if stat.S_ISDIR(st.st_mode) and st.st_dev == top.st_dev:
                todo.append(Path(e.path))


# Backups live beside the labs, not inside one: `hvlab down` removes a lab's directory and
# must not take its backups with it (`hvlab down --purge` does).
BACKUPS = "backups"

# What each LV is, as its LVM tag says (every LV of a lab has exactly one role tag).
ROLE_TAG: dict[Artifact, str] = {"B": "role_base", "C": "role_checkpoint",
                                 "A": "role_autorecovery", "S_B": "role_external",
                                 "S_A": "role_external", "D": "role_diffarea",
                                 "S_D": "role_external"}
REFERENCE_TAG = "role_reference"  # an incremental chain's reference point (hvlab's RCT)
ROLE_LABEL: dict[str, str] = {
    "role_base": "live disk (B)",
    "role_checkpoint": "backup checkpoint (C)",
    "role_autorecovery": "auto-recovery checkpoint (A)",
    "role_external": "external snapshot (S)",
    "role_diffarea": "guest shadow copy's diff area (D, 2012)",
    REFERENCE_TAG: "reference point of an incremental chain (RCT)",
}
# Each artifact of a disk, in a few words (the explain picture's lanes).
ARTIFACT_ROLE: dict[Artifact, str] = {"B": "live disk", "C": "backup checkpoint",
                                      "A": "auto-recovery ckpt", "S_B": "host snapshot of B",
                                      "S_A": "host snapshot of A", "D": "guest's diff area",
                                      "S_D": "host snapshot of D"}
# The roles only a backup run gives (a lab between runs has none of them).
RUN_ROLES = ("role_checkpoint", "role_autorecovery", "role_external", "role_diffarea")
# A run's artifact LV: <vm>_<disk>_<kind>_<run id>.
KIND: dict[Artifact, str] = {"C": "c", "A": "a", "S_B": "sb", "S_A": "sa", "D": "d",
                             "S_D": "sd"}


def role_of(tags: frozenset[str] | set[str]) -> str:
    """The label of the role these LVM tags give an LV, or ''."""
    return next((ROLE_LABEL[t] for t in sorted(tags) if t in ROLE_LABEL), "")


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

    def lvm(self) -> Lvm:
        """LVM for this lab: its private config (a filter that sees only the lab's loops)."""
        return Lvm(self.lvm_dir)

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

    @staticmethod
    def artifact_lv(vm: str, disk: str, art: Artifact, run_id: str) -> str:
        """A backup run's C, A, S_B or S_A of one disk."""
        return f"{vm}_{disk}_{KIND[art]}_{run_id}"

    def ar_ctl(self, vm: str, disk: str) -> str:
        """The device that attaches A to the guest in step 10."""
        return f"{self.vg}_ar_{vm}_{disk}"

    def shadow(self, vm: str, disk: str) -> str:
        """2012: the guest's own shadow copy of the disk (dm-snapshot of B, its store on D)."""
        return f"{self.vg}_gs_{vm}_{disk}"

    def revert(self, vm: str, disk: str) -> str:
        """2012: the host's roll-back of S_B to the guest's shadow copy (snapshot-merge)."""
        return f"{self.vg}_rv_{vm}_{disk}"

    @property
    def dm_prefixes(self) -> tuple[str, str]:
        """LVM's devices are VG-LV; ours are VG_kind_... Lab names contain neither '-' nor '_'."""
        return (f"{self.vg}-", f"{self.vg}_")

    def ctl(self, vm: str, disk: str) -> str:
        return f"{self.vg}_ctl_{vm}_{disk}"

    def ctl_uuid(self, vm: str, disk: str) -> str:
        return f"HVLAB-{self.lab}-ctl-{vm}-{disk}"

    def pv(self, i: int) -> str:
        """The PV: a dm-linear over the i-th loop, so a test can swap in a fault target."""
        return f"{self.vg}_pv{i}"

    def pv_uuid(self, i: int) -> str:
        return f"HVLAB-{self.lab}-pv-{i}"

    @property
    def netns_prefix(self) -> str:
        """Network namespaces (and veth aliases) of the off-host link: <prefix><run>_<side>."""
        return f"{self.vg}_net_"

    @property
    def uuid_prefix(self) -> str:
        return f"HVLAB-{self.lab}-"

    def lv_path(self, lv: str) -> str:
        return f"/dev/{self.vg}/{lv}"

    def dm_lv_name(self, lv: str) -> str:
        return f"{self.vg}-{lv.replace('-', '--')}"
