"""The backup's manifest.json: what was backed up, how consistent, when, and every step."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hvlab.errors import BadInput
from hvlab.lab import runs
from hvlab.lab.definition import NAME_RE, check_name, shown
from hvlab.lab.paths import Names
from hvlab.lab.record import Run
from hvlab.lab.state import write_json_atomic
from hvlab.sys.fs import FILESYSTEMS

NAME = "manifest.json"


def build(names: Names, run: Run) -> dict[str, Any]:
    vms = []
    for vm in run.vms:
        v = run.vm[vm]
        disks = []
        for d, info in v.disks.items():
            img = run.images.get(f"{vm}/{d}", {})
            disks.append({"name": d, "fs": info.fs, "size": img.get("size", info.size),
                          "consistency": v.cls, "image": img.get("file"),
                          "sha256": img.get("sha256"), "mapped_blocks": img.get("mapped_blocks"),
                          "block_bytes": img.get("block_bytes"),
                          "bytes_read": img.get("bytes_read"),
                          "auto_recovery_ranges": img.get("auto_recovery_ranges", []),
                          "base_at_t0": img.get("base_at_t0"),
                          "mapped_bytes": img.get("mapped_bytes"), "chain": img.get("chain")})
        vms.append({"name": vm, "profile": v.profile, "consistency": v.cls,
                    "integration_services": v.answers, "t0": v.t0,
                    "app_aware": run.app_aware, "fallback": v.fallback or v.no_answer,
                    "freeze_window": asdict(v.window) if v.window else None,
                    "auto_recovery": v.auto_recovery_result, "disks": disks})
    return {"version": 1, "lab": run.lab, "run": run.id, "mode": run.mode,
            "created": run.created, "vms": vms, "snapshot_set": run.snapshot_set,
            "link": run.link,
            "pre": run.pre, "post": run.post,
            "events": [ev.to_dict() for ev in runs.events(names, run.id)]}


def write(names: Names, run: Run) -> Path:
    path = Path(run.dest) / NAME
    write_json_atomic(path, build(names, run))
    return path


def _exists(path: Path) -> bool:
    """exists(), and False for a name the kernel refuses (too long, say), not OSError."""
    try:
        return path.exists()
    except OSError:
        return False


def locate(names: Names, backup: str) -> tuple[Path, dict[str, Any]]:
    """A backup by directory (with manifest.json) or by run id; its manifest checked."""
    p = Path(backup)
    if not _exists(p / NAME):
        run_dir = names.runs_dir / backup / "run.json"
        if "/" not in backup and _exists(run_dir):
            try:
                p = Path(json.loads(run_dir.read_text())["dest"])
            except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
                raise BadInput(f"run {backup}: unreadable run record ({exc!r})") from None
    if not _exists(p / NAME) and "/" not in backup:
        p = names.backups_dir / backup  # the default place, also after the lab was removed
    if not _exists(p / NAME):
        raise BadInput(f"no backup at {shown(backup, 200)} (a backup directory or a finished "
                       f"run id)")
    try:
        data = json.loads((p / NAME).read_bytes())
    except (OSError, ValueError, RecursionError) as exc:
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise BadInput(f"unreadable manifest {p / NAME}: {detail}") from None
    return p, check(data, p / NAME)


# What restore and verify read from a manifest, and what each field must be.
CLASSES = ("application-consistent", "filesystem-consistent", "crash-consistent")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
RUN_ID_RE = re.compile(r"[a-z0-9]{1,64}")  # ids are r<timestamp><hex>; it is in LV tags
MAX_DISK = 1 << 50


class _Field:
    """Checks one field of the manifest; every refusal names the manifest and the field."""

    def __init__(self, where: Path) -> None:
        self.where = where

    def bad(self, path: str, value: object, want: str) -> BadInput:
        if value is _MISSING:
            return BadInput(f"malformed manifest {self.where}: {path} is missing ({want})")
        return BadInput(f"malformed manifest {self.where}: {path} is {shown(value)}, "
                        f"want {want}")

    def get(self, table: dict[str, Any], key: str, path: str, ok: Any, want: str) -> Any:
        value = table.get(key, _MISSING)
        if value is _MISSING or not ok(value):
            raise self.bad(f"{path}{key}", value, want)
        return value


_MISSING: Any = object()


def _int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _image_name(v: object) -> bool:
    """A plain file name in the backup directory: never a path elsewhere."""
    return (isinstance(v, str) and 0 < len(v) <= 255 and "/" not in v and "\0" not in v
            and v not in (".", "..", NAME))


def _name(kind: str) -> Any:
    def ok(v: object) -> bool:
        try:
            check_name(kind, v)
        except BadInput:
            return False
        return True
    return ok


def check(data: object, where: Path) -> dict[str, Any]:
    """The manifest as restore and verify use it, or one line naming the first bad field."""
    f = _Field(where)
    if not isinstance(data, dict):
        raise f.bad("the manifest", data, "a JSON object with lab, run, vms")
    f.get(data, "lab", "", _name("lab"), "a lab name")
    f.get(data, "run", "", lambda v: isinstance(v, str) and RUN_ID_RE.fullmatch(v) is not None,
          "a run id like r20250101120000abcd")
    vms = f.get(data, "vms", "", lambda v: isinstance(v, list) and v, "a non-empty list")
    for i, vm in enumerate(vms):
        at = f"vms[{i}]"
        if not isinstance(vm, dict):
            raise f.bad(at, vm, "an object")
        f.get(vm, "name", f"{at}.", lambda v: isinstance(v, str) and NAME_RE.fullmatch(v),
              "a VM name")
        f.get(vm, "consistency", f"{at}.", lambda v: v in CLASSES, " or ".join(CLASSES))
        disks = f.get(vm, "disks", f"{at}.", lambda v: isinstance(v, list) and v,
                      "a non-empty list")
        seen: set[str] = set()
        for j, d in enumerate(disks):
            dat = f"{at}.disks[{j}]"
            if not isinstance(d, dict):
                raise f.bad(dat, d, "an object")
            name = f.get(d, "name", f"{dat}.", _name("disk"), "a disk name")
            if name in seen:
                raise f.bad(f"{dat}.name", name, "a disk name not already in this VM")
            seen.add(name)
            f.get(d, "fs", f"{dat}.", lambda v: v in FILESYSTEMS, " or ".join(FILESYSTEMS))
            f.get(d, "size", f"{dat}.", lambda v: _int(v) and 0 < v <= MAX_DISK
                  and v % 512 == 0, "a size in bytes, whole 512-byte sectors")
            f.get(d, "image", f"{dat}.", _image_name, "a file name in the backup directory")
            f.get(d, "sha256", f"{dat}.",
                  lambda v: isinstance(v, str) and SHA256_RE.fullmatch(v) is not None,
                  "64 lowercase hex digits")
            f.get(d, "block_bytes", f"{dat}.", lambda v: _int(v) and 512 <= v <= 1 << 30
                  and v % 512 == 0, "the pool's block size in bytes")
    return data
