"""A thin pool the kernel has failed, and the host's way back.

After an I/O error on its metadata device dm-thin writes no more metadata: the pool goes
read-only (`ro`: writes that need a new chunk fail) or fails (`Fail`: every I/O of every
thin volume fails), and sets needs_check. Nothing comes back when the device heals; no pool
message is served, so LVM can neither make nor remove a thin volume. The way back is the
host's: deactivate the pool and activate it again, when LVM runs thin_check on its metadata
(clearing needs_check if it is sound). For a lab that is `hvlab stop` then `hvlab up`: guests
stopped, filesystems unmounted, every LV down, then all of it back with the data kept.
"""

from __future__ import annotations

from dataclasses import dataclass

from hvlab.errors import HvlabError
from hvlab.lab import poolstatus, substrate, teardown
from hvlab.lab.paths import Names
from hvlab.lab.state import State, locked
from hvlab.lab.teardown import Progress
from hvlab.sys.dmioctl import DmError


@dataclass(frozen=True)
class Health:
    mode: str  # the kernel's word: rw, ro, out_of_data_space or Fail
    needs_check: bool

    @property
    def failed(self) -> bool:
        """Failed by the kernel (not merely full: extending the pool mends that)."""
        return self.mode in ("ro", "Fail") or self.needs_check

    def describe(self, names: Names) -> str:
        flag = ", needs_check" if self.needs_check and self.mode != "Fail" else ""
        return (f"thin pool {names.vg}/{names.pool} has failed in the kernel (mode "
                f"{self.mode}{flag}): its metadata could not be written, and it serves no "
                f"LVM change until it is activated again")


def health(names: Names) -> Health | None:
    """The pool's state from its status line; None when it is not active."""
    try:
        return parse(poolstatus.words(names))
    except DmError:
        return None


def parse(words: list[str]) -> Health | None:
    """The status words `<txid> <meta used/total> <data used/total> <held root> <mode> ...
    <needs_check|-> ...` of a live pool, or a single `Fail` (dm-thin's pool_status)."""
    if not words:
        return None
    if words[0] in ("Fail", "Error"):
        return Health("Fail", True)
    return Health(words[4] if len(words) > 4 else "?", "needs_check" in words)


def failure(names: Names) -> str | None:
    """One line naming the pool's failure, or None when it has not failed."""
    h = health(names)
    return f"{h.describe(names)}; `hvlab recover` does that" if h and h.failed else None


def repair(names: Names, progress: Progress) -> Health:
    """Stop the lab and bring it up again (LVM's activation checks and clears the pool's
    metadata). The caller makes sure no backup process still runs. Returns the pool's
    health after; a pool thin_check does not pass stays down, said in one line."""
    before = health(names)
    st = State.load(names.lab)
    if st is None:
        raise HvlabError(f"lab {names.lab!r} does not exist")
    with locked(names.lab):
        teardown.teardown(names, keep_data=True, progress=progress)
        st.phase = "stopped"
        st.save()
        try:
            substrate.restart(st, names, progress=progress)
        except HvlabError as exc:
            raise HvlabError(f"thin pool {names.vg}/{names.pool} did not come back after "
                             f"its failure ({before.mode if before else '?'}): {exc}; its "
                             f"metadata may need `lvconvert --repair`") from exc
    after = health(names)
    if after is None or after.failed:
        raise HvlabError(f"thin pool {names.vg}/{names.pool} is still failed after a restart "
                         f"(mode {after.mode if after else 'inactive'}): its metadata may "
                         f"need `lvconvert --repair`")
    return after
