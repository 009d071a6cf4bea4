"""Incremental backups on thin metadata (Hyper-V 2016's resilient change tracking, done the
way the pool can: a reference snapshot per disk and `thin_delta` against it).

A backup run with `--incremental` keeps each disk's external snapshot S_A as the disk's
reference point (`<vm>_<disk>_ref_<run>`, tagged role_reference and gen_<generation>). The next
one reads only the blocks whose mapping differs between that reference and its own S_A, and
the reference moves on. `chains.json` in the lab folder says, per disk, which reference and
which backup the chain's last link is; any doubt (no record, the reference gone, of another
generation, a disk of another size, the last backup gone) makes a full backup of that disk,
and the manifest says why.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hvlab.backup.thinmeta import Range, merge
from hvlab.lab.paths import REFERENCE_TAG, Names
from hvlab.lab.state import write_json_atomic
from hvlab.sys import dirfd
from hvlab.sys.lvm import LvRow

FILE = "chains.json"


def reference_lv(vm: str, disk: str, run_id: str) -> str:
    return f"{vm}_{disk}_ref_{run_id}"


def load(names: Names) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads((names.dir / FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@contextmanager
def updating(names: Names) -> Iterator[dict[str, dict[str, Any]]]:
    """chains.json read, changed by the block and written back atomically, under a lock of
    its own (blocking: the update is short; runs of other VMs of the lab make theirs)."""
    fd = dirfd.open_file(names.dir / ".chains.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        chains = load(names)
        yield chains
        write_json_atomic(names.dir / FILE, chains)
    finally:
        os.close(fd)


def references(rows: dict[str, LvRow], vm: str, disk: str) -> list[str]:
    """The disk's reference LVs (normally one; more only after a killed step 14)."""
    return sorted(n for n, r in rows.items() if REFERENCE_TAG in r.tags
                  and r.tag_value("vm_") == vm and r.tag_value("disk_") == disk)


@dataclass(frozen=True)
class Plan:
    """How one disk is read: full or incremental, why, and the chain it extends."""

    kind: str  # full | incremental
    reason: str
    generation: str | None = None  # None: no chain (a plain full backup)
    parent: dict[str, str] | None = None  # {run, dest} of the last link, for an incremental
    reference: str | None = None  # the reference LV the delta is taken against

    def record(self) -> dict[str, Any]:
        return {"kind": self.kind, "reason": self.reason, "generation": self.generation,
                "parent": self.parent, "reference": self.reference}


def decide(rec: dict[str, Any] | None, rows: dict[str, LvRow], size: int,
           wanted: bool) -> Plan:
    """Incremental only when every link holds; otherwise full, with the reason."""
    if not wanted:
        return Plan("full", "not asked for an incremental")

    def full(reason: str) -> Plan:
        return Plan("full", reason, generation=secrets.token_hex(6))

    if not rec:
        return full("no earlier backup of this disk in a chain: the first, or a disk added "
                    "since")
    ref, gen = str(rec.get("reference", "")), str(rec.get("generation", ""))
    if ref not in rows:
        return full(f"the reference snapshot {ref} is gone (lost or removed)")
    if REFERENCE_TAG not in rows[ref].tags or f"gen_{gen}" not in rows[ref].tags:
        have = rows[ref].tag_value("gen_")
        return full(f"the reference snapshot {ref} belongs to another chain (generation "
                    f"{have}, the chain's is {gen}): reset or foreign")
    if int(rec.get("size", -1)) != size:
        return full(f"the disk's size changed from {rec.get('size')} to {size} bytes")
    dest = Path(str(rec.get("dest", "")))
    if not _holds_run(dest, str(rec.get("run"))):
        return full(f"the chain's last backup ({rec.get('run')}, {dest}) is gone")
    return Plan("incremental", f"changes since {rec.get('run')}", generation=gen,
                parent={"run": str(rec.get("run")), "dest": str(dest)}, reference=ref)


def _holds_run(dest: Path, run_id: str) -> bool:
    try:
        return bool(json.loads((dest / "manifest.json").read_text()).get("run") == run_id)
    except (OSError, ValueError, AttributeError):
        return False


def changed(delta: dict[str, list[Range]]) -> tuple[list[Range], list[Range]]:
    """thin_delta reference..S_A -> (ranges to read: remapped or newly mapped, ranges now
    unmapped: discarded since, read as zeros)."""
    blocks = sorted({b + i for kind in ("different", "right_only")
                     for b, n in delta.get(kind, []) for i in range(n)})
    return merge(blocks), sorted(delta.get("left_only", []))


def links_of(dest: Path, vm: str, disk: str,
             manifest_of: Any) -> list[tuple[Path, dict[str, Any]]]:
    """The chain ending at the backup in dest, oldest (the full) first: (backup directory,
    its manifest's record of the disk) for each link. manifest_of(path) reads one."""
    out: list[tuple[Path, dict[str, Any]]] = []
    path: Path | None = dest
    seen: set[str] = set()
    while path is not None:
        key = os.path.realpath(path)
        if key in seen:
            raise ValueError(f"backup chain loops at {path}")
        seen.add(key)
        man = manifest_of(path)
        rec = next((d for v in man["vms"] if v["name"] == vm for d in v["disks"]
                    if d["name"] == disk), None)
        if rec is None:
            raise ValueError(f"backup {path} has no disk {vm}/{disk}")
        if out:  # the parent its child named: that run, that chain
            want = (out[-1][1].get("chain") or {})
            if man.get("run") != want["parent"]["run"] or (rec.get("chain") or {}).get(
                    "generation") != want.get("generation"):
                raise ValueError(f"{path} holds run {man.get('run')} (generation "
                                 f"{(rec.get('chain') or {}).get('generation')}), not the "
                                 f"parent {want['parent']['run']} of chain "
                                 f"{want.get('generation')}")
        out.append((path, rec))
        chain = rec.get("chain") or {}
        parent = chain.get("parent") if chain.get("kind") == "incremental" else None
        path = Path(parent["dest"]) if parent else None
    return list(reversed(out))
