"""A guest emulator's configuration: the JSON file `hvlab up` writes for each VM's guest."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hvlab.errors import BadInput
from hvlab.guest.protocol import Limits, one_line
from hvlab.guest.writers import Workload

PROFILES = ("windows", "linux", "none")


@dataclass
class GuestConfig:
    vm: str
    profile: str
    run_dir: Path
    disks: list[tuple[str, Path]]
    socket: Path | None = None
    workload: Workload = field(default_factory=Workload)
    freeze_timeout_s: float = 10.0  # flush-and-hold, as VSS
    writer_timeout_s: float = 60.0  # writer freeze-to-thaw
    status_every_s: float = 1.0
    limits: Limits = field(default_factory=Limits)  # per connection of the channel

    @staticmethod
    def from_dict(d: dict[str, Any]) -> GuestConfig:
        try:
            profile = str(d.get("profile", "windows"))
            if profile not in PROFILES:
                raise BadInput(f"unknown guest profile {profile!r} (one of {', '.join(PROFILES)})")
            disks = [(str(x["name"]), Path(x["mountpoint"])) for x in d["disks"]]
            if not disks:
                raise BadInput("a guest needs at least one disk")
            wl = dict(d.get("workload", {}))
            if "seed" in d:
                wl.setdefault("seed", int(d["seed"]))
            sock = d.get("socket")
            ch = dict(d.get("channel", {}))
            unknown = set(ch) - set(Limits.__dataclass_fields__)
            if unknown:
                raise BadInput(f"unknown channel limits: {sorted(unknown)}")
            limits = Limits(
                max_line=int(ch.get("max_line", Limits.max_line)),
                max_clients=int(ch.get("max_clients", Limits.max_clients)),
                idle_timeout_s=float(ch.get("idle_timeout_s", Limits.idle_timeout_s)),
                send_timeout_s=float(ch.get("send_timeout_s", Limits.send_timeout_s)),
            )
            if min(limits.max_line, limits.max_clients) < 1 or not (
                0 < min(limits.idle_timeout_s, limits.send_timeout_s) < math.inf
            ):
                raise BadInput(f"channel limits must be positive: {limits}")
            if sock is None and profile != "none":
                raise BadInput(f"profile {profile} needs a socket path")
            cfg = GuestConfig(
                vm=str(d["vm"]),
                profile=profile,
                run_dir=Path(d["run_dir"]),
                disks=disks,
                socket=Path(sock) if sock else None,
                workload=Workload.from_dict(wl),
                freeze_timeout_s=float(d.get("freeze_timeout_s", 10.0)),
                writer_timeout_s=float(d.get("writer_timeout_s", 60.0)),
                status_every_s=float(d.get("status_every_s", 1.0)),
                limits=limits,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BadInput(f"bad guest config: {one_line(exc)}") from exc
        return cfg

    @staticmethod
    def load(path: Path) -> GuestConfig:
        try:
            return GuestConfig.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            raise BadInput(f"cannot read guest config {path}: {one_line(exc)}") from exc
