"""Lab definitions: TOML in, validated dataclasses out. Every mistake is one clear line."""

from __future__ import annotations

import os
import re
import stat
import tomllib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from hvlab.errors import BadInput
from hvlab.lab.paths import BACKUPS
from hvlab.sys.fs import FILESYSTEMS, MIN_SIZE
from hvlab.sys.lvm import parse_size

# Safe for LVM and dm names and for our separators ('_' and '-' are ours, so not allowed here).
# Matched whole (fullmatch): a `$` would also match before a final newline ("t1\n").
NAME_RE = re.compile(r"[a-z][a-z0-9]{0,11}")
NAME_RULE = "1-12 characters: lowercase letters and digits, starting with a letter"
PROFILES = ("windows", "linux", "none")
MIN_BACKING = 128 << 20
MAX_BACKING = 1 << 40
MAX_VMS = 64
MAX_DISKS = 64  # per VM: as many as a Hyper-V SCSI controller takes
SECTOR = 512  # lvcreate -V takes whole sectors only

# LVM's own LV names (lvm2 lib/misc/lvm-string.c, apply_lvname_restrictions): an LV name may
# not start with these ...
LVM_RESERVED_PREFIXES = ("pvmove", "snapshot")
# ... nor contain these (LVM names the component LVs of pools, caches, mirrors, RAID and VDO
# `<lv>_<suffix>`). Our LVs are `<vm>_<disk>[_<kind>_<run>]`: a VM name must not start with a
# prefix, and a disk name (after the '_') must not start with a suffix.
LVM_RESERVED_STRINGS = ("_cdata", "_cmeta", "_corig", "_mimage", "_mlog", "_pmspare", "_rimage",
                        "_rmeta", "_tdata", "_tmeta", "_vdata", "_vorigin")
# The lab's own objects. The thin pool is the LV "pool": LVM names its parts pool_tdata and
# pool_tmeta, and a repair leaves pool_meta<N>, so `pool_<disk>` is the pool's namespace.
# `hvlab verify` restores into temporary disk sets vfy<6 hex>_<disk>.
RESERVED_VM = {"pool": "the thin pool's LVs are named pool, pool_tdata, pool_tmeta, "
                       "pool_meta<N>"}
VERIFY_SET_RE = re.compile(r"vfy[0-9a-f]{6}")


def shown(value: object, limit: int = 40) -> str:
    """A value for a one-line message: repr (newlines escaped), long ones cut."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...(" + str(len(text)) + " chars)"


def check_name(kind: str, value: object) -> str:
    """A lab, VM or disk name: our charset and length, and nothing LVM or the lab reserves."""
    if value is None:
        raise BadInput(f"missing {kind} name: it must be {NAME_RULE}")
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise BadInput(f"invalid {kind} name {shown(value)}: must be {NAME_RULE}")
    if kind == "lab" and value == BACKUPS:
        raise BadInput(f"invalid lab name {value!r}: reserved for the backups folder")
    if kind == "VM":
        for p in LVM_RESERVED_PREFIXES:
            if value.startswith(p):
                raise BadInput(f"invalid VM name {value!r}: its disks are LVs {value}_<disk>, "
                               f"and LVM reserves LV names starting {p!r}; allowed: "
                               f"{NAME_RULE}, not starting {' or '.join(LVM_RESERVED_PREFIXES)}")
        if value in RESERVED_VM:
            raise BadInput(f"invalid VM name {value!r}: its disks would be LVs {value}_<disk>, "
                           f"and {RESERVED_VM[value]}; choose another name")
        if VERIFY_SET_RE.fullmatch(value):
            raise BadInput(f"invalid VM name {value!r}: vfy<6 hex digits> names the temporary "
                           f"disk sets of `hvlab verify`; choose another name")
    if kind == "disk":
        for s in LVM_RESERVED_STRINGS:
            if value.startswith(s[1:]):
                raise BadInput(f"invalid disk name {value!r}: its LV <vm>_{value} would contain "
                               f"{s!r}, which LVM reserves for its own LVs; allowed: "
                               f"{NAME_RULE}, not starting "
                               f"{', '.join(x[1:] for x in LVM_RESERVED_STRINGS)}")
    return value


def _size(what: str, value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return parse_size(value)
        except ValueError:
            pass
    raise BadInput(f"invalid size {shown(value)} for {what}: use bytes or a number with "
                   f"K, M, G, T")


@dataclass(frozen=True)
class Disk:
    name: str
    size: int
    fs: str


@dataclass(frozen=True)
class VM:
    name: str
    profile: str
    disks: tuple[Disk, ...]
    workload: tuple[tuple[str, Any], ...] = ()  # knobs for the guest's writers (sorted items)


# [vm.workload] knobs a lab file may set: (check, what is allowed)
WORKLOAD_KNOBS: dict[str, tuple[Any, str]] = {
    "ops_per_s": (lambda v: _num(v) and 0 < v <= 10000, "a number in (0, 10000]"),
    "append_ops_per_s": (lambda v: _num(v) and 0 <= v <= 10000, "a number in [0, 10000]"),
    "scratch_ops_per_s": (lambda v: _num(v) and 0 <= v <= 10000, "a number in [0, 10000]"),
    "value_size": (lambda v: _int(v) and 1 <= v <= 4096, "an integer 1 to 4096"),
    "seed": (lambda v: _int(v) and 0 <= v < 1 << 63, "an integer 0 to 2^63-1"),
    "paused": (lambda v: isinstance(v, bool), "true or false"),
}


def _num(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class LabDef:
    name: str
    backing_size: int
    backing_files: int
    vms: tuple[VM, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> LabDef:
        vms = tuple(
            VM(v["name"], v["profile"], tuple(Disk(**k) for k in v["disks"]),
               tuple((str(k), x) for k, x in v.get("workload", ())))
            for v in d["vms"]
        )
        return LabDef(d["name"], d["backing_size"], d["backing_files"], vms)

    def vm(self, name: str) -> VM:
        for v in self.vms:
            if v.name == name:
                return v
        known = ", ".join(v.name for v in self.vms)
        raise BadInput(f"unknown VM {shown(name)}: this lab has {known}")

    def disks(self) -> list[tuple[VM, Disk]]:
        return [(v, d) for v in self.vms for d in v.disks]


def _table(where: str, value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadInput(f"malformed lab file: {where} must be a table")
    return value


def _choice(kind: str, value: object, allowed: Sequence[str], where: str) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise BadInput(f"invalid {kind} {shown(value)} for {where}: "
                       f"allowed {', '.join(allowed)}")
    return value


def _unknown(where: str, table: dict[str, Any], allowed: set[str]) -> None:
    extra = sorted(set(table) - allowed)
    if extra:
        raise BadInput(f"malformed lab file: unknown key {shown(extra[0])} in {where} "
                       f"(allowed: {', '.join(sorted(allowed))})")


def parse(data: dict[str, Any], *, name: str | None = None,
          backing_size: str | None = None) -> LabDef:
    """Validate a lab document (already parsed TOML); flags override the file."""
    _unknown("the file", data, {"lab", "vm"})
    lab = _table("[lab]", data.get("lab", {}))
    _unknown("[lab]", lab, {"name", "backing_size", "backing_files"})
    lab_name = check_name("lab", name if name is not None else lab.get("name", "hvlab"))
    size = _size("backing_size", backing_size if backing_size is not None
                 else lab.get("backing_size", "4G"))
    if not MIN_BACKING <= size <= MAX_BACKING:
        raise BadInput(f"backing size {shown(size, 24)} bytes is out of range: allowed "
                       f"{MIN_BACKING >> 20} MiB to {MAX_BACKING >> 40} TiB")
    nfiles = lab.get("backing_files", 1)
    if not isinstance(nfiles, int) or isinstance(nfiles, bool) or not 1 <= nfiles <= 8:
        raise BadInput(f"invalid backing_files {shown(nfiles)}: allowed an integer 1 to 8")
    raw_vms = data.get("vm", [])
    if not isinstance(raw_vms, list) or not raw_vms:
        raise BadInput("malformed lab file: at least one [[vm]] is required")
    if len(raw_vms) > MAX_VMS:
        raise BadInput(f"too many VMs ({len(raw_vms)}): a lab holds at most {MAX_VMS} VMs")
    vms: list[VM] = []
    for i, rv in enumerate(raw_vms):
        rv = _table(f"vm #{i + 1}", rv)
        _unknown(f"vm #{i + 1}", rv, {"name", "profile", "disk", "workload"})
        vname = check_name("VM", rv.get("name"))
        if any(v.name == vname for v in vms):
            raise BadInput(f"duplicate VM name {vname!r}: VM names must be unique in a lab")
        profile = _choice("profile", rv.get("profile", "windows"), PROFILES, f"VM {vname}")
        raw_disks = rv.get("disk", [])
        if not isinstance(raw_disks, list):
            raise BadInput(f"malformed lab file: disk of VM {vname} must be an array of tables "
                           f"([[vm.disk]]), not {type(raw_disks).__name__}")
        if not raw_disks:
            raise BadInput(f"VM {vname} has no disks: add at least one [[vm.disk]]")
        if len(raw_disks) > MAX_DISKS:
            raise BadInput(f"too many disks in VM {vname} ({len(raw_disks)}): "
                           f"at most {MAX_DISKS} disks per VM")
        disks: list[Disk] = []
        for j, rd in enumerate(raw_disks):
            rd = _table(f"disk #{j + 1} of {vname}", rd)
            _unknown(f"disk #{j + 1} of {vname}", rd, {"name", "size", "fs"})
            dname = check_name("disk", rd.get("name"))
            if any(d.name == dname for d in disks):
                raise BadInput(f"duplicate disk name {dname!r} in VM {vname}")
            fs = _choice("filesystem", rd.get("fs", "ext4"), FILESYSTEMS, f"{vname}/{dname}")
            dsize = _size(f"{vname}/{dname}", rd.get("size", "256M"))
            if dsize < MIN_SIZE[fs]:
                raise BadInput(f"disk {vname}/{dname} size {shown(dsize, 24)} bytes is below "
                               f"the {fs} minimum of {MIN_SIZE[fs] >> 20} MiB")
            if dsize > size:
                raise BadInput(f"disk {vname}/{dname} size {shown(dsize, 24)} bytes is beyond "
                               f"the backing size of {size} bytes")
            if dsize % SECTOR:
                down, up = dsize // SECTOR * SECTOR, -(-dsize // SECTOR) * SECTOR
                raise BadInput(f"disk {vname}/{dname} size {dsize} bytes is not a multiple of "
                               f"{SECTOR} (LVM sizes are whole sectors): use {down} or {up}")
            disks.append(Disk(dname, dsize, fs))
        vms.append(VM(vname, profile, tuple(disks), _workload(vname, rv.get("workload", {}))))
    return LabDef(lab_name, size, nfiles, tuple(vms))


def _workload(vm: str, raw: object) -> tuple[tuple[str, Any], ...]:
    wl = _table(f"[vm.workload] of {vm}", raw)
    _unknown(f"[vm.workload] of {vm}", wl, set(WORKLOAD_KNOBS))
    for key, value in wl.items():
        ok, allowed = WORKLOAD_KNOBS[key]
        if not ok(value):
            raise BadInput(f"invalid workload {key} {shown(value)} for VM {vm}: "
                           f"allowed {allowed}")
    return tuple(sorted(wl.items()))


def default_text() -> str:
    return resources.files("hvlab.lab").joinpath("default.toml").read_text()


MAX_FILE = 1 << 20  # a lab file is a few hundred bytes


def read_lab_file(path: Path) -> str:
    """The text of a lab file: a regular file (never blocks on a FIFO or reads a device), at
    most MAX_FILE bytes, UTF-8."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        raise BadInput(f"cannot read lab file {shown(str(path), 200)}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BadInput(f"cannot read lab file {shown(str(path), 200)}: "
                           f"not a regular file")
        with os.fdopen(os.dup(fd), "rb") as f:
            raw = f.read(MAX_FILE + 1)
    except OSError as exc:
        raise BadInput(f"cannot read lab file {shown(str(path), 200)}: "
                       f"{exc.strerror}") from None
    finally:
        os.close(fd)
    if len(raw) > MAX_FILE:
        raise BadInput(f"lab file {shown(str(path), 200)} is too large: "
                       f"at most {MAX_FILE >> 10} KiB")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput(f"malformed lab file {shown(str(path), 200)}: not UTF-8 text "
                       f"(byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None


def load(path: Path | None = None, *, name: str | None = None,
         backing_size: str | None = None) -> LabDef:
    if path is None:
        text, where = default_text(), "default lab"
    else:
        text, where = read_lab_file(path), shown(str(path), 200)
    try:
        data = tomllib.loads(text)
    except ValueError as exc:  # TOMLDecodeError, or an integer of more than 4300 digits
        detail = " ".join(str(exc).split())[:200]
        raise BadInput(f"malformed lab file {where}: {detail}") from None
    except RecursionError:
        raise BadInput(f"malformed lab file {where}: nested too deeply") from None
    return parse(data, name=name, backing_size=backing_size)
