"""LVM's queued thin-pool messages, sent after a power cut the way LVM sends them.

LVM changes a thin pool in two commits: it writes its metadata with the pool's transaction id
one ahead and the change queued as a message (`create`, `delete`), sends the message and the
new transaction id to the kernel (which commits its own metadata), then writes its metadata
again with the queue empty. A power cut between the first commit and the kernel's leaves the
kernel's pool one transaction behind, with the change still queued. LVM accepts that state at
activation but does not send the queue then: it waits for its next change to that pool. Until
then `lvs` and the pool disagree (an LV LVM removed still holds the pool's chunks, or one it
made has no thin device). `hvlab up` sends the queue at once, as LVM's library does
(libdm's _thin_pool_node_send_messages): each message, then `set_transaction_id`. LVM's next
change finds the kernel's id equal to its own, counts the messages as sent and drops them.
The pool commits after each message, so a cut between two of them leaves a message committed
and the transaction id not: such a message answers EEXIST (create) or ENODATA (delete) when
sent again, and counts as sent, as libdm counts it.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Callable

from hvlab.errors import HvlabError
from hvlab.lab import poolstatus
from hvlab.lab.paths import Names
from hvlab.sys import dmioctl
from hvlab.sys.lvm import LvRow

# In LVM's text metadata, inside the thin-pool's segment: message1 { delete = 5 } or
# message2 { create = "lv_name" }.
_MESSAGE = re.compile(r'message\d+\s*\{\s*(?:delete\s*=\s*(\d+)|create\s*=\s*"([^"]+)")\s*\}')

# What the pool answers for a message it has already committed.
_DONE = {"delete": errno.ENODATA, "create_thin": errno.EEXIST, "create_snap": errno.EEXIST}


def queued(metadata: str) -> list[tuple[str, str]]:
    """The queued messages of LVM's text metadata, in order: ("delete", id) or
    ("create", lv name). A lab has one pool: every message in the VG's text is its."""
    return [("delete", d) if d else ("create", lv) for d, lv in _MESSAGE.findall(metadata)]


def pool_messages(todo: list[tuple[str, str]], rows: dict[str, LvRow]) -> list[str]:
    """The pool messages for the queue: `delete N`, `create_thin N`, `create_snap N O`."""
    out = []
    for kind, what in todo:
        if kind == "delete":
            out.append(f"delete {what}")
            continue
        row = rows.get(what)
        if row is None or row.thin_id is None:
            raise HvlabError(f"LVM queued the creation of {what}, which it does not report")
        origin = rows.get(row.origin) if row.origin else None
        if row.origin and (origin is None or origin.thin_id is None):
            raise HvlabError(f"LVM queued the snapshot {what} of {row.origin}, which it does "
                             "not report")
        out.append(f"create_snap {row.thin_id} {origin.thin_id}" if origin and origin.thin_id
                   is not None else f"create_thin {row.thin_id}")
    return out


def send_queued(names: Names, rows: dict[str, LvRow],
                say: Callable[[str], None] = lambda _: None) -> list[str]:
    """If the kernel's pool is one transaction behind LVM and LVM holds queued messages, send
    them (a snapshot's origin suspended meanwhile, as LVM does) and the transaction id.
    rows: LVM's report of the VG. Returns the messages sent. Call with the pool active,
    before anything mounts its LVs."""
    kernel_tid = poolstatus.transaction_id(names)
    pool = rows.get(names.pool)
    if pool is None or pool.transaction_id is None or kernel_tid is None \
            or pool.transaction_id != kernel_tid + 1:
        return []
    lvm = names.lvm()
    path = lvm.conf_dir / "queued.vg"
    try:
        lvm("vgcfgbackup", "-q", "-f", str(path), names.vg)
        todo = queued(path.read_text())
    finally:
        path.unlink(missing_ok=True)
    if not todo:
        return []  # LVM itself refuses such a pool's next change: its error says so
    tpool = poolstatus.tpool_name(names)
    sent: list[str] = []
    done: list[str] = []
    for text in pool_messages(todo, rows):
        origin = _origin_of(text, rows, names)
        if origin:
            with dmioctl.suspended(origin):
                fresh = _send(tpool, text)
        else:
            fresh = _send(tpool, text)
        (sent if fresh else done).append(text)
    dmioctl.message(tpool, f"set_transaction_id {kernel_tid} {kernel_tid + 1}")
    sent.append(f"set_transaction_id {kernel_tid} {kernel_tid + 1}")
    say(f"sent what LVM had queued for pool {names.vg}/{names.pool} when the power went: "
        f"{'; '.join(sent)}"
        + (f" (the pool had already committed {'; '.join(done)})" if done else ""))
    return sent


def _send(tpool: str, text: str) -> bool:
    """Send one message; False when the pool had already committed it."""
    try:
        dmioctl.message(tpool, text)
    except dmioctl.DmError as exc:
        if exc.errno != _DONE.get(text.split()[0]):
            raise
        return False
    return True


def _origin_of(message: str, rows: dict[str, LvRow], names: Names) -> str | None:
    """The active dm device of a create_snap's origin (None when it is not active)."""
    words = message.split()
    if words[0] != "create_snap":
        return None
    for row in rows.values():
        if row.thin_id == int(words[2]) and row.active and not row.hidden:
            return names.dm_lv_name(row.name)
    return None
