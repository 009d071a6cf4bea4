"""Network namespaces joined by a veth pair (pyroute2): the off-host proxy's own 'host'.

Every veth we make carries an alias naming its owner, so one that a kill left in the root
namespace (made, not yet moved) is found by the alias alone, never by a name we only guess.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hvlab.errors import HvlabError

RUN_DIR = Path("/var/run/netns")  # where `ip netns` and pyroute2 keep a namespace's handle


class NetnsError(HvlabError):
    pass


@dataclass(frozen=True)
class End:
    ns: str  # namespace name
    ifname: str  # veth end inside it (at most 15 characters)
    address: str  # link-local, /30: exists only on this pair


def names() -> list[str]:
    try:
        return sorted(os.listdir(RUN_DIR))
    except FileNotFoundError:
        return []


def path(ns: str) -> str:
    return str(RUN_DIR / ns)


def pair(a: End, b: End, alias: str) -> None:
    """Two new namespaces, a veth pair between them, an address and `up` on each end (and on
    each namespace's loopback). A name already taken is an error: nothing of ours is reused."""
    from pyroute2 import IPRoute, NetNS, config, netns  # 0.4 s of a command's start: here

    _helpers_safe(config)

    taken = set(names()) & {a.ns, b.ns}
    if taken:
        raise NetnsError(f"network namespace {', '.join(sorted(taken))} already exists")
    for end in (a, b):
        netns.create(end.ns)
    with IPRoute() as ip:
        ip.link("add", ifname=a.ifname, kind="veth", peer={"ifname": b.ifname})
        for end in (a, b):
            idx = ip.link_lookup(ifname=end.ifname)[0]
            ip.link("set", index=idx, ifalias=alias)
            ip.link("set", index=idx, net_ns_fd=end.ns)
    for end in (a, b):
        with NetNS(end.ns) as n:
            found = n.link_lookup(ifname=end.ifname)
            if not found:  # say what the namespace holds
                held = [str(x.get("ifname")) for x in n.get_links()]
                raise NetnsError(f"veth {end.ifname} is not in namespace {end.ns} after the "
                                 f"move (it holds {', '.join(held)})")
            idx = found[0]
            n.addr("add", index=idx, address=end.address, prefixlen=30)
            n.link("set", index=idx, state="up")
            n.link("set", index=n.link_lookup(ifname="lo")[0], state="up")


def _helpers_safe(config: Any) -> None:
    """pyroute2 forks a helper for each namespace operation. It gives it 2 s (a lab VM under
    load can take longer) and stops it with SIGTERM, whose handler the helper inherits: the
    CLI's raises KeyboardInterrupt, and the helper then ran on as a copy of the backup,
    unwinding it and removing the namespaces under the real one. SIG_DFL in helpers."""
    config.default_communicate_timeout = max(config.default_communicate_timeout, 30)
    config.disable_mp_signal = True


def rx_bytes(end: End) -> int:
    """Bytes the end has received (frames, headers included): what crossed the link to it."""
    from pyroute2 import NetNS, config

    _helpers_safe(config)
    with NetNS(end.ns) as n:
        link = n.get_links(n.link_lookup(ifname=end.ifname)[0])[0]
        stats = link.get("stats64") or link.get("stats")
        return int(stats.get("rx_bytes")) if stats else 0


def pids_in(ns: str) -> list[int]:
    """Processes whose network namespace is `ns` (by the namespace file's inode)."""
    try:
        want = os.stat(path(ns)).st_ino
    except OSError:
        return []
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}/ns/net").st_ino == want:
                    out.append(int(entry))
            except OSError:
                pass  # gone, or a kernel thread
    return out


def stray_links(alias_prefix: str) -> dict[str, str]:
    """Links in this (the root) namespace whose alias starts with alias_prefix: name -> alias.
    Read from sysfs: cheap enough for every leak check."""
    out = {}
    for link in Path("/sys/class/net").iterdir():
        try:
            alias = (link / "ifalias").read_text().strip()
        except OSError:
            continue
        if alias.startswith(alias_prefix):
            out[link.name] = alias
    return out


def remove(ns_names: list[str], alias_prefix: str, *, ifnames: Sequence[str] = (),
           timeout: float = 10.0) -> list[str]:
    """Kill what runs in the namespaces, delete them (their veth ends go with them) and any
    stray veth of ours; verified. Returns what was removed."""
    def strays() -> dict[str, str]:
        # ifnames: a pair a kill left between its creation and its alias, found by its name
        return {**stray_links(alias_prefix),
                **{n: "" for n in ifnames if (Path("/sys/class/net") / n).exists()}}

    if not ns_names and not strays():
        return []  # the common case, every teardown: no pyroute2 import (~1 s in the lab VM)
    from pyroute2 import IPRoute, config, netns

    _helpers_safe(config)
    done: list[str] = []
    for ns in ns_names:
        pids = pids_in(ns)
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while pids_in(ns) and time.monotonic() < deadline:
            time.sleep(0.02)
        if ns in names():
            netns.remove(ns)
        done.append(ns + (f" (killed {', '.join(map(str, pids))})" if pids else ""))
    left_links = strays()  # a veth whose peer was in a namespace went with it
    if left_links:
        with IPRoute() as ip:
            for ifname in left_links:
                for idx in ip.link_lookup(ifname=ifname):
                    ip.link("del", index=idx)
                done.append(f"veth {ifname}")
    left = [ns for ns in ns_names if ns in names()] + list(stray_links(alias_prefix))
    if left:
        raise NetnsError(f"could not remove {', '.join(left)}")
    return done
