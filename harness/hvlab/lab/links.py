"""The off-host link's names, and its removal: owned by the lab, so `down` and `recover`
remove what a killed off-host read left (namespaces, veths, nbdkit) by name alone."""

from __future__ import annotations

import shutil
import zlib
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from hvlab.lab.paths import Names
from hvlab.sys import netns
from hvlab.sys.netns import End

PORT = 10809  # NBD's own port, on the lab's link-local address only
# The exports are symlinks to the snapshot devices: not in the lab folder, where hvlab never
# follows a link. Lab names are unique per kernel (its VG), so per kernel here too.
RUN_ROOT = Path("/run/hvlab")


@dataclass(frozen=True)
class Link:
    lab: End  # the storage side: nbdkit listens here
    proxy: End
    port: int
    alias: str  # on both veth ends: what `clean` finds a stray one by
    dir: Path  # exports (symlinks to the snapshot devices) and nbdkit's pid file

    @property
    def exports(self) -> Path:
        return self.dir / "exports"


def plan(names: Names, run_id: str) -> Link:
    """The run's names and addresses: 169.254.X.1 and .2/30, X from the lab and the run."""
    h = zlib.crc32(f"{names.lab}/{run_id}".encode())
    x, tag = 1 + h % 254, f"{h:08x}"
    base = f"{names.netns_prefix}{run_id}"
    return Link(End(f"{base}_lab", f"hv{tag}l", f"169.254.{x}.1"),
                End(f"{base}_proxy", f"hv{tag}p", f"169.254.{x}.2"), PORT, base,
                RUN_ROOT / names.lab / f"{run_id}.offhost")


def runs_with_links(names: Names) -> set[str]:
    """Runs of this lab that have a namespace or a stray veth (by its alias)."""
    p = names.netns_prefix
    return ({n[len(p):].rsplit("_", 1)[0] for n in netns.names() if n.startswith(p)}
            | {a[len(p):] for a in netns.stray_links(p).values()})


def owned(names: Names) -> list[str]:
    """The lab's off-host objects now: its namespaces (with what runs in them), stray veths."""
    p = names.netns_prefix
    out = []
    for ns in (n for n in netns.names() if n.startswith(p)):
        pids = netns.pids_in(ns)
        out.append(f"network namespace {ns}" + (f" (pids {pids})" if pids else ""))
    return out + [f"veth {v}" for v in netns.stray_links(p)]


def clean(names: Names, run_id: str | None = None) -> list[str]:
    """Remove the off-host link of a run (or every one of the lab): the processes in its
    namespaces (nbdkit, the proxy), the namespaces with their veth ends, stray veths, the
    exports. Verified; safe to call when there is nothing."""
    prefix = names.netns_prefix + (f"{run_id}_" if run_id else "")
    planned = plan(names, run_id) if run_id else None
    done = netns.remove([n for n in netns.names() if n.startswith(prefix)], prefix.rstrip("_"),
                        ifnames=[planned.lab.ifname, planned.proxy.ifname] if planned else [])
    for d in (RUN_ROOT / names.lab).glob(f"{run_id or '*'}.offhost"):
        shutil.rmtree(d)
        done.append(str(d))
    with suppress(OSError):  # only when empty: another run's link may be up
        (RUN_ROOT / names.lab).rmdir()
    return done
