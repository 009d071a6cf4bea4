"""Probes for `hvlab doctor`: try what the lab relies on, on real devices, instead of assuming.

- freeze:  sparse file -> loop -> ext4 -> mount -> fsfreeze -f -> fsfreeze -u.
- nesting: the same on a dm-linear device, then a dm suspend *with* lockfs while the filesystem
  is user-frozen. Linux 6.1 refuses (EBUSY: the freeze is already taken); >= 6.8 nests the two.
  This is why the lab redirects controllers with --nolockfs inside a guest's freeze.

Everything a probe makes lives in a private temp dir and is undone on every path (thaw,
resume, umount, dm remove, loop detach, rmdir); afterwards the probe checks that nothing is
left and reports what was.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hvlab.errors import CommandError, HvlabError
from hvlab.sys import dm, dmioctl, fs, loop
from hvlab.sys.run import run

SCRATCH_SIZE = 32 << 20  # sparse; ext4's minimum is 16 MiB
SUSPEND_TIMEOUT = 10.0  # a dm suspend that waits on a frozen filesystem must not hang doctor
EBUSY_TEXT = "Device or resource busy"


@dataclass(frozen=True)
class ProbeResult:
    name: str  # "freeze" | "nesting"
    verdict: str  # freeze: works | fails; nesting: nests | no-nest | unknown
    detail: str
    kernel: str  # the release of the kernel it ran on
    in_vm: bool  # ran inside the lab VM
    leaks: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """The probe ran, found a definite answer and left nothing behind."""
        return self.verdict in ("works", "nests", "no-nest") and not self.leaks

    def where(self) -> str:
        return (f"in the lab VM (Linux {self.kernel})" if self.in_vm
                else f"on this kernel (Linux {self.kernel})")

    def line(self) -> str:
        if self.name == "freeze":
            what = ("freeze + thaw of a scratch ext4 works" if self.verdict == "works"
                    else f"freeze + thaw of a scratch ext4 FAILED: {self.detail}")
            text = f"fsfreeze: {self.where()}: {what}"
        else:
            what = {"nests": "user freeze + dm suspend nest (the suspend succeeded)",
                    "no-nest": f"user freeze + dm suspend do not nest ({self.detail})"}.get(
                        self.verdict, f"user freeze + dm suspend: unknown ({self.detail})")
            text = f"nesting: {self.where()}: {what}"
        if self.leaks:
            text += f"; LEFT BEHIND: {', '.join(self.leaks)}"
        return text


def classify_suspend(returncode: int, stderr: str, timed_out: bool) -> tuple[str, str]:
    """A lockfs dm suspend of a user-frozen device: (verdict, detail)."""
    if timed_out:
        return "unknown", f"dmsetup suspend did not return within {SUSPEND_TIMEOUT:g} s"
    if returncode == 0:
        return "nests", "suspended"
    if EBUSY_TEXT in stderr:
        return "no-nest", "EBUSY"
    last = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit {returncode}"
    return "unknown", f"dmsetup suspend failed: {last}"


def to_json(results: list[ProbeResult]) -> str:
    return json.dumps([asdict(r) for r in results])


def from_json(text: str) -> list[ProbeResult]:
    out = []
    for d in json.loads(text):
        d["leaks"] = tuple(d.get("leaks") or ())
        out.append(ProbeResult(**d))
    return out


# ------------------------------------------------------------------------------ scratch
@dataclass
class _Scratch:
    """What a probe made, with the undo of each thing, newest last."""

    dir: Path
    image: Path
    undo: list[tuple[str, Callable[[], object]]] = field(default_factory=list)
    dm_name: str = ""
    errors: list[str] = field(default_factory=list)
    leaks: tuple[str, ...] = ()

    def cleanup(self) -> tuple[str, ...]:
        """Undo everything (each step even if an earlier one failed), then check: a loop on
        our image, a mount under our dir, our dm device or the dir itself is a leak."""
        for what, fn in reversed(self.undo):
            try:
                fn()
            except (HvlabError, OSError) as exc:
                self.errors.append(f"{what}: {exc}")
        self.undo.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
        leaks = [f"loop {lo.name}" for lo in loop.list_loops()
                 if lo.back_file == str(self.image)]
        leaks += [f"mount {m.target}" for m in fs.mounts()
                  if m.target.startswith(str(self.dir) + "/")]
        if self.dm_name and any(d.name == self.dm_name for d in dm.list_devices()):
            leaks.append(f"dm device {self.dm_name}")
        if self.dir.exists():
            leaks.append(f"directory {self.dir}")
        return tuple(leaks)


@contextlib.contextmanager
def _scratch() -> Iterator[_Scratch]:
    """A private temp dir with a sparse image; on the way out everything is undone and the
    leaks are recorded in `leaks`, whatever happened inside."""
    d = Path(tempfile.mkdtemp(prefix="hvlab-doctor-"))
    s = _Scratch(d, d / "scratch.img")
    try:
        with open(s.image, "wb") as f:
            f.truncate(SCRATCH_SIZE)
        yield s
    finally:
        s.leaks = s.cleanup()


def _mounted_ext4(s: _Scratch, dev: str) -> Path:
    fs.mkfs(dev, "ext4", "hvlabdoctor")
    mnt = s.dir / "mnt"
    fs.mount(dev, mnt, "ext4")
    s.undo.append(("umount", lambda: fs.umount(mnt)))
    return mnt


def _attach(s: _Scratch) -> str:
    dev = loop.attach(s.image)
    s.undo.append(("loop detach", lambda: loop.detach(dev)))
    return dev


def _freeze(s: _Scratch, mnt: Path) -> None:
    fs.freeze(mnt)
    # Guaranteed thaw: undone before the umount (a frozen filesystem must never be left).
    s.undo.append(("thaw", lambda: fs.thaw(mnt)))


def _kernel() -> str:
    return os.uname().release


def _in_vm() -> bool:
    return os.environ.get("HVLAB_IN_VM") == "1"


def freeze_probe() -> ProbeResult:
    verdict, detail = "fails", ""
    with _scratch() as s:
        try:
            mnt = _mounted_ext4(s, _attach(s))
            _freeze(s, mnt)
            if fs.thaw(mnt):
                verdict, detail = "works", "frozen and thawed"
            else:
                detail = "fsfreeze -u failed"
        except (HvlabError, OSError) as exc:
            detail = str(exc)
    if s.errors and verdict == "works":
        verdict, detail = "fails", "; ".join(s.errors)
    return ProbeResult("freeze", verdict, detail, _kernel(), _in_vm(), s.leaks)


def nesting_probe() -> ProbeResult:
    verdict, detail = "unknown", ""
    with _scratch() as s:
        try:
            dev = _attach(s)
            s.dm_name = f"hvlab-doctor-{os.getpid()}"  # never a lab's prefix (hvlab_<lab>)
            path = dm.create_linear(s.dm_name, dev, uuid=f"HVLAB-doctor-{os.getpid()}")
            s.undo.append(("dm remove", lambda: dm.remove(s.dm_name)))
            mnt = _mounted_ext4(s, path)
            _freeze(s, mnt)
            # Resume first on the way out (the newest undo runs first), then thaw.
            s.undo.append(("dm resume", lambda: dm.run_resume(s.dm_name)))
            try:  # lockfs (no --nolockfs): the kernel freezes the filesystem itself
                res = run(["dmsetup", "suspend", "--noudevsync", s.dm_name], check=False,
                          timeout=SUSPEND_TIMEOUT)
                rc, err = res.returncode, res.stderr
            except CommandError as exc:  # run() reports a timeout as exit -1
                rc, err = exc.returncode, exc.stderr
            verdict, detail = classify_suspend(rc, err, rc == -1)
        except (HvlabError, OSError) as exc:
            detail = str(exc)
    return ProbeResult("nesting", verdict, detail, _kernel(), _in_vm(), s.leaks)


def dm_usable() -> bool:
    """Can this kernel make a dm-linear device? (/dev/mapper/control alone proves nothing: a
    dmsetup run on a kernel without device-mapper leaves the node behind.)"""
    if not dm.available():
        return False
    try:
        return "linear" in dmioctl.targets()
    except dmioctl.DmError:
        return False


def run_here() -> list[ProbeResult]:
    """The probes on this kernel; nesting only where device-mapper is."""
    out = [freeze_probe()]
    if dm_usable():
        out.append(nesting_probe())
    return out
