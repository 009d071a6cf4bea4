"""The backup's manifest.json: what was backed up, how consistent, when, and every step."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hvlab.errors import BadInput
from hvlab.lab import runs
from hvlab.lab.paths import Names
from hvlab.lab.record import Run
from hvlab.lab.state import write_json_atomic

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
                          "base_at_t0": img.get("base_at_t0")})
        vms.append({"name": vm, "profile": v.profile, "consistency": v.cls,
                    "integration_services": v.answers, "t0": v.t0,
                    "freeze_window": asdict(v.window) if v.window else None,
                    "auto_recovery": v.auto_recovery_result, "disks": disks})
    return {"version": 1, "lab": run.lab, "run": run.id, "mode": run.mode,
            "created": run.created, "vms": vms, "snapshot_set": run.snapshot_set,
            "pre": run.pre, "post": run.post, "events": runs.events(names, run.id)}


def write(names: Names, run: Run) -> Path:
    path = Path(run.dest) / NAME
    write_json_atomic(path, build(names, run))
    return path


def locate(names: Names, backup: str) -> tuple[Path, dict[str, Any]]:
    """A backup by directory (with manifest.json) or by run id."""
    p = Path(backup)
    if not (p / NAME).exists():
        run_dir = names.runs_dir / backup / "run.json"
        if "/" not in backup and run_dir.exists():
            try:
                p = Path(json.loads(run_dir.read_text())["dest"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise BadInput(f"run {backup}: unreadable run record ({exc!r})") from None
    if not (p / NAME).exists() and "/" not in backup:
        p = names.backups_dir / backup  # the default place, also after the lab was removed
    if not (p / NAME).exists():
        raise BadInput(f"no backup at {backup!r} (a backup directory or a finished run id)")
    try:
        data: dict[str, Any] = json.loads((p / NAME).read_text())
    except (OSError, ValueError) as exc:
        raise BadInput(f"unreadable manifest {p / NAME}: {exc}") from None
    if not isinstance(data, dict) or not {"lab", "run", "vms"} <= data.keys():
        raise BadInput(f"{p / NAME} is not an hvlab backup manifest (needs lab, run, vms)")
    return p, data
