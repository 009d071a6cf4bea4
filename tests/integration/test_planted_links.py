"""Symlinks planted in the middle of a backup, after its checks: the run's own folders are
held open (sys/dirfd.py), so nothing lands where a link points. A link where the run must
write (the live record's folder, the run folder, the metadata snapshot's lock) fails the
step with the link named, and the lab comes back once the link is gone; a backup directory
swapped for a link goes on being written where the run made it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from hvlab.backup import restore as rst
from hvlab.flow import engine, recover
from hvlab.guest.client import GuestClient
from hvlab.lab import guests, runs
from hvlab_fixtures.plugin import LabHandle, one_vm_lab
from hvlab_fixtures.waits import at_fault_point

pytestmark = pytest.mark.integration

Plant = Callable[[LabHandle, str, Path], tuple[Path, Path]]


def _swap(real: Path, away: Path) -> tuple[Path, Path]:
    """`real` moved aside and a link to `away` (made, empty) put in its place; returns
    (the link, where the real one went)."""
    aside = real.with_name(f".{real.name}.aside")
    away.mkdir(parents=True, exist_ok=True)
    if real.exists():
        os.rename(real, aside)
    real.symlink_to(away)
    return real, aside


def live_folder(h: LabHandle, _run: str, away: Path) -> tuple[Path, Path]:
    return _swap(h.names.dir / "live", away / "live")


def run_folder(h: LabHandle, run_id: str, away: Path) -> tuple[Path, Path]:
    return _swap(runs.run_dir(h.names, run_id), away / "run")


def metadata_lock(h: LabHandle, _run: str, away: Path) -> tuple[Path, Path]:
    lock = h.names.dir / "metadata-snap.lock"
    aside = lock.with_name(".lock.aside")
    if lock.exists():
        os.rename(lock, aside)
    (away / "file").parent.mkdir(parents=True, exist_ok=True)
    (away / "file").write_text("not hvlab's\n")
    lock.symlink_to(away / "file")
    return lock, aside


def destination(h: LabHandle, run_id: str, away: Path) -> tuple[Path, Path]:
    return _swap(Path(runs.load(h.names, run_id).dest), away / "dest")


# (where it is planted, at which fault point, whether the run is refused there)
CASES: dict[str, tuple[Plant, str, bool]] = {
    "live-record": (live_folder, "step-05", True),
    "run-folder": (run_folder, "step-07", True),
    "metadata-lock": (metadata_lock, "step-13", True),
    "destination": (destination, "s13-reading", False),
}


def _away_untouched(away: Path) -> list[str]:
    found = sorted(str(p.relative_to(away)) for p in away.rglob("*"))
    if (away / "file").exists():
        assert (away / "file").read_text() == "not hvlab's\n"
        found.remove("file")
    return [f for f in found if f not in ("live", "run", "dest")]


@pytest.mark.parametrize("case", list(CASES))
def test_a_link_planted_mid_run_changes_nothing(case: str,
                                                lab_factory: Callable[..., LabHandle],
                                                monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    plant, point, refused = CASES[case]
    h = lab_factory(one_vm_lab(), start_guests=True)
    client = GuestClient(guests.socket_path(h.names, "vm01"))
    pre, before = h.lv_names(), client.status()["committed_txid"]
    away = tmp_path / "away"
    planted: list[tuple[Path, Path]] = []

    def beside(_go: Path) -> None:
        (active,) = runs.active_runs(h.names)
        planted.append(plant(h, active.id, away))

    with at_fault_point(point, beside, monkeypatch=monkeypatch, tmp_path=tmp_path):
        # A command of its own, as a user runs it: its run is interrupted when it exits.
        res = subprocess.run([sys.executable, "-m", "hvlab.cli", "backup", "vm01", "-n",
                              h.defn.name, "--no-fingerprints"], capture_output=True,
                             text=True, timeout=600, env=os.environ, stdin=subprocess.DEVNULL)
    ((link, aside),) = planted
    try:
        assert _away_untouched(away) == [], f"{case}: written through the link"
    finally:
        link.unlink()
        if aside.exists():
            os.rename(aside, link)
    (first,) = runs.all_runs(h.names)
    if refused:
        assert res.returncode != 0 and "through" in res.stderr, res.stdout + res.stderr
        assert str(link) in res.stderr.splitlines()[-1], res.stderr
        recover.recover(h.defn.name)
        assert h.lv_names() == pre and h.controller_maps_base("vm01", "disk0")
    else:
        assert res.returncode == 0, res.stdout + res.stderr
        assert rst.verify(h.defn.name, first.id)["ok"], "the images are where the run made them"
    st = client.status()
    assert not st["frozen"] and st["committed_txid"] >= before, (res.stderr, st)
    again = engine.start(h.defn.name, ["vm01"], fingerprints=False)
    assert again.state == "done" and rst.verify(h.defn.name, again.id)["ok"]
