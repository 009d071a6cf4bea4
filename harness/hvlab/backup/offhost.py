"""Step 13 in off-host mode: the external snapshot set exported over NBD to a proxy 'host'.

The proxy is a network namespace of its own, joined to a second namespace of the lab's (the
storage side) by a veth pair with link-local addresses that exist only on that pair. nbdkit
(Debian's) runs in the lab's namespace, bound to the lab's end only, read-only, one export per
snapshot device; the proxy (`hvlab.backup.proxy`, libnbd) runs in its namespace and reads the
mapped ranges it is handed. Everything is named after the lab and the run, so a killed step's
leftovers are found by name (`clean`), also when no run record says so.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from hvlab.errors import HvlabError
from hvlab.lab.links import Link, clean, plan
from hvlab.lab.paths import Names
from hvlab.sys import netns
from hvlab.sys.run import note

READY_S = 15.0  # nbdkit's start, in the lab VM
NBDKIT_STOP_S = 5.0


class OffHostError(HvlabError):
    pass


def missing() -> list[str]:
    """What this machine lacks for an off-host read (checked before a run starts)."""
    out = [f"{tool} (not installed)" for tool in ("nbdkit", "nsenter") if not shutil.which(tool)]
    if importlib.util.find_spec("nbd") is None:
        out.append("libnbd's Python binding (Debian's python3-libnbd, linked into the venv)")
    if not os.path.isdir("/proc/self/ns") or not os.path.exists("/proc/self/ns/net"):
        out.append("network namespaces (a kernel with CONFIG_NET_NS)")
    return out


def _die_with_parent() -> None:
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: a killed backup ends us


def _in(ns: str, argv: list[str]) -> list[str]:
    # nsenter execs the program (no fork for a network namespace): it stays our child.
    return ["nsenter", f"--net={netns.path(ns)}", "--", *argv]


@dataclass
class Proxy:
    link: Link
    server: subprocess.Popen[bytes]

    def read(self, disks: list[dict[str, Any]], progress: Callable[[int], None],
             pass_fds: tuple[int, ...] = ()) -> tuple[list[dict[str, Any]], int]:
        """Have the proxy read each disk's ranges; (images, bytes read over NBD). pass_fds:
        the backup folder held for the run, which the images' paths name."""
        argv = _in(self.link.proxy.ns, [sys.executable, "-m", "hvlab.backup.proxy"])
        job = {"address": self.link.lab.address, "port": self.link.port, "disks": disks}
        start = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, pass_fds=pass_fds,
                                preexec_fn=_die_with_parent)
        images: list[dict[str, Any]] = []
        done: dict[str, Any] | None = None
        error: dict[str, Any] | None = None
        try:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(json.dumps(job))
            proc.stdin.close()
            for line in proc.stdout:
                kind, _, rest = line.rstrip("\n").partition(" ")
                if kind == "progress":
                    progress(int(rest))
                elif kind == "image":
                    images.append(json.loads(rest))
                elif kind == "done":
                    done = json.loads(rest)
                elif kind == "error":
                    error = json.loads(rest)
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            note(argv, proc.returncode, time.monotonic() - start)
        if error is not None:
            raise OSError(error["errno"], error["message"])
        if done is None or proc.returncode != 0:
            stderr = (proc.stderr.read() if proc.stderr else "").strip().splitlines()
            raise OffHostError(f"the off-host proxy failed (exit {proc.returncode}): "
                               f"{stderr[-1] if stderr else 'no message'}")
        return images, int(done["nbd_bytes"])

    def link_bytes(self) -> int:
        return netns.rx_bytes(self.link.proxy)

    def server_bytes(self) -> int | None:
        """Stop the server; the read bytes its stats filter counted (None if unreadable)."""
        _stop_server(self.server)
        try:
            return server_read_bytes((self.link.dir / "stats.txt").read_text())
        except OSError:
            return None


def _start_server(link: Link) -> subprocess.Popen[bytes]:
    """nbdkit in the lab's namespace; its stats filter counts what the server itself sent
    (written to stats.txt when it exits), its messages go to nbdkit.log."""
    pidfile = link.dir / "nbdkit.pid"
    argv = _in(link.lab.ns, ["nbdkit", "--exit-with-parent", "--foreground", "--readonly",
                             "--ipaddr", link.lab.address, "--port", str(link.port),
                             "--pidfile", str(pidfile), "--filter=stats", "file",
                             f"dir={link.exports}", f"statsfile={link.dir / 'stats.txt'}"])
    start = time.monotonic()
    with open(link.dir / "nbdkit.log", "wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    # nbdkit writes its pid file once it accepts connections.
    while not pidfile.exists():
        if proc.poll() is not None or time.monotonic() - start > READY_S:
            _stop_server(proc)
            err = (link.dir / "nbdkit.log").read_text(errors="replace").strip()
            raise OffHostError(f"nbdkit did not start on {link.lab.address}:{link.port} in "
                               f"namespace {link.lab.ns}: {err or 'no message'}")
        time.sleep(0.02)
    note(argv, 0, time.monotonic() - start)
    return proc


def _stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(NBDKIT_STOP_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def server_read_bytes(stats: str) -> int | None:
    """Bytes the server sent for reads, from nbdkit's stats filter file: a line like
    `read: 12 ops, 0.0 s, 7.50 MiB, ...` (the units vary), or the raw bytes where given."""
    for line in stats.splitlines():
        m = re.match(r"\s*read:.*?\b(\d+(?:\.\d+)?) (B|KiB|MiB|GiB)\b", line)
        if m:
            unit = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[m.group(2)]
            return round(float(m.group(1)) * unit)
    return None


@contextmanager
def link(names: Names, run_id: str, exports: dict[str, str]) -> Iterator[Proxy]:
    """Set up the link, serve `exports` (name -> snapshot device), yield the proxy; on every
    path the server is stopped and the link removed, verified."""
    ln = plan(names, run_id)
    clean(names, run_id)  # what a killed step 13 of this run left: it starts over
    server = None
    owner = os.getpid()  # a forked helper that ran on must never remove the link
    try:
        ln.exports.mkdir(parents=True, mode=0o700)
        for name, dev in exports.items():
            os.symlink(dev, ln.exports / name)
        netns.pair(ln.lab, ln.proxy, ln.alias)
        server = _start_server(ln)
        yield Proxy(ln, server)
    finally:
        if os.getpid() == owner:
            if server is not None:
                _stop_server(server)
            clean(names, run_id)


def describe(ln: Link) -> dict[str, Any]:
    return {"proxy": {"namespace": ln.proxy.ns, "address": ln.proxy.address},
            "server": {"namespace": ln.lab.ns, "address": ln.lab.address, "port": ln.port,
                       "program": "nbdkit --readonly file dir=..."}}

