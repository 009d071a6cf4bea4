"""The kernel's view of the lab's thin pool: its -tpool device and that device's status.

Asked with noflush: without it dm-thin commits the pool's metadata before it answers, and a
commit waits on the metadata disk (one that does not complete writes would hang the question,
not just the answer). Even so the answer takes the metadata lock a commit in flight holds.
"""

from __future__ import annotations

from hvlab.lab.paths import Names
from hvlab.sys import dmioctl


def tpool_name(names: Names) -> str:
    """The dm name of the pool's -tpool device: messages go to it, its status is the pool's."""
    return f"{names.dm_lv_name(names.pool)}-tpool"


def words(names: Names) -> list[str]:
    """The pool's status words: `<txid> <meta used/total> <data used/total> <held metadata
    root> <mode> ...`, or `Fail`; [] when the device has no table. DmError when it is not
    active."""
    targets = dmioctl.status(tpool_name(names), noflush=True)
    return targets[0].params.split() if targets else []


def transaction_id(names: Names) -> int | None:
    """The transaction id the kernel's pool reports (LVM keeps its own: they must agree).
    None when the pool is not active or has failed."""
    try:
        return int(words(names)[0])
    except (dmioctl.DmError, IndexError, ValueError):
        return None
