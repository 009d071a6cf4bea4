"""LVM's view of a lab's VG for one run: one `lvs` report (0.5 s of CPU in the lab VM) serves
every question until a command through this view's Lvm may have changed the answer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from hvlab.errors import HvlabError
from hvlab.lab.handle import Lab
from hvlab.sys.lvm import Lvm, LvRow
from hvlab.sys.run import Result


def _nothing() -> None:
    pass


REPORTS = frozenset({"lvs", "vgs", "pvs", "fullreport"})


@dataclass
class TrackedLvm(Lvm):
    """The lab's Lvm, telling its Ctx before any command that may change LVM's view: the
    Ctx's cached report is then read again when next needed (a command that failed or was
    killed half-way leaves nothing stale behind)."""

    changing: Callable[[], None] = _nothing

    def __call__(self, *args: str, check: bool = True, timeout: float = 120.0) -> Result:
        if not args or args[0] not in REPORTS:
            self.changing()
        return super().__call__(*args, check=check, timeout=timeout)

    def batch(self, commands: Sequence[Sequence[str]], *, timeout: float = 300.0) -> Result:
        self.changing()
        return super().batch(commands, timeout=timeout)


class BatchFailed(HvlabError):
    """An lvm batch left LVM short of what it was to make or remove."""


class LvmView:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self._rows: dict[str, LvRow] | None = None
        self.lvm: Lvm = TrackedLvm(lab.lvm.conf_dir, self.forget)

    def vg_lv(self, lv: str) -> str:
        return f"{self.lab.names.vg}/{lv}"

    def forget(self) -> None:
        """Drop the cached report: LVM's view may change."""
        self._rows = None

    def lvs(self, fresh: bool = False) -> dict[str, LvRow]:
        """Every LV of the lab's VG, from one `lvs` reused until a command through self.lvm
        may have changed it (or fresh)."""
        if self._rows is None or fresh:
            self._rows = self.lab.lvs()
        return self._rows

    def activated(self, lv: str, major: int, minor: int) -> None:
        """An LV activated by ioctl, not by LVM (steps 5 and 6): LVM's metadata is unchanged,
        so the cached report stays, with that row active. Kept, it spares every later VM of
        a job's step 4 an `lvs` (0.35-0.6 s in the lab VM)."""
        rows = self._rows
        if rows is None or lv not in rows:
            self.forget()
            return
        row = rows[lv]
        attr = row.attr[:4] + "a" + row.attr[5:] if len(row.attr) > 4 else row.attr
        rows[lv] = replace(row, attr=attr, active=True, major=major, minor=minor)

    def take(self, rows: dict[str, LvRow]) -> dict[str, LvRow]:
        """Keep a full `lvs` report read some other way (at the end of a batch)."""
        self._rows = dict(rows)
        return self._rows

    def exists(self, lv: str) -> bool:
        return lv in self.lvs()

    def remove_lvs(self, lvs: Sequence[str]) -> list[str]:
        """One lvremove for those of lvs that exist (a killed run may have removed some);
        returns them. The cached report stays valid: lvremove exits 0 only when all went."""
        rows = self.lvs()
        present = [lv for lv in dict.fromkeys(lvs) if lv in rows]
        if present:
            self.lvm("lvremove", "-q", "-y", *map(self.vg_lv, present))
            self._rows = {k: r for k, r in rows.items() if k not in present}
        return present

    def remove_lv(self, lv: str) -> bool:
        """lvremove if present; False when it was already gone (a killed run did it)."""
        return bool(self.remove_lvs([lv]))

    def batch(self, commands: Sequence[Sequence[str]], *, present: Sequence[str] = (),
              absent: Sequence[str] = (), active: bool = True) -> dict[str, LvRow]:
        """Commands in one `lvm` process, ending with a report to check what they did: every
        LV of `present` exists (and, when active, is active), none of `absent` does. The
        shell exits 0 whatever happened: a shortfall is an error naming the LVs and quoting
        what LVM said. Returns the report."""
        if not commands:
            return self.lvs()
        res, report = self.lvm.batch_report(commands, self.lab.names.vg)
        rows = self.take(report)
        short = [f"{lv} missing" for lv in present if lv not in rows]
        short += [f"{lv} inactive" for lv in present
                  if active and lv in rows and rows[lv].major is None]
        short += [f"{lv} still present" for lv in absent if lv in rows]
        if short:
            said = " | ".join(ln.strip() for ln in res.stderr.splitlines() if ln.strip())
            raise BatchFailed(f"lvm batch of {len(commands)} commands "
                              f"({', '.join(sorted({c[0] for c in commands}))}): "
                              f"{', '.join(short)}; lvm said: {said or '(nothing)'}")
        return rows
