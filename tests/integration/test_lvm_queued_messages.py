"""A power cut inside an LVM change to the pool, between LVM's first commit and the kernel's:
LVM's metadata is one transaction ahead with the change queued as a message, the kernel's
pool one behind without it (seen once by tests/vm/test_power_loss, cut in step 14's lvremove:
"pool transaction id: LVM 63, kernel 62"). LVM activates such a pool and leaves the queue for
its next change, so until then `lvs` and the pool disagree. `hvlab up` sends the queue.

The state is made the way lvm2's own tests make theirs (thin-errors.sh): LVM's metadata
edited and put back with `vgcfgrestore --force`, the kernel's pool moved by its messages."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from hvlab.lab import poolstatus, substrate, teardown, thinsync
from hvlab.sys import dmioctl
from hvlab_fixtures.plugin import LabHandle, one_vm_lab

pytestmark = pytest.mark.integration


def _tids(h: LabHandle) -> tuple[int | None, int | None]:
    return h.lab.lvs()[h.names.pool].transaction_id, poolstatus.transaction_id(h.names)


def _metadata(h: LabHandle, tmp_path: Path) -> str:
    path = tmp_path / "vg.txt"
    h.names.lvm()("vgcfgbackup", "-q", "-f", str(path), h.names.vg)
    return path.read_text()


def _restore(h: LabHandle, tmp_path: Path, text: str) -> None:
    path = tmp_path / "edited.txt"
    path.write_text(text)
    h.names.lvm()("vgcfgrestore", "-q", "--force", "--yes", "-f", str(path), h.names.vg)


def _queue(text: str, bump: int, *messages: str) -> str:
    """The pool's segment with `messages` queued and its transaction id moved by bump."""
    at = text.index('type = "thin-pool"')
    m = re.compile(r"(\n(\t+)transaction_id = )(\d+)\n").search(text, at)
    assert m, text
    indent = m.group(2)
    queued = "\n" + "".join(f"{indent}message{i} {{\n{indent}\t{msg}\n{indent}}}\n"
                            for i, msg in enumerate(messages, 1))
    return (text[:m.start()] + f"{m.group(1)}{int(m.group(3)) + bump}" + queued
            + text[m.end():])


def _without_lv(text: str, lv: str) -> str:
    out, n = re.subn(rf"\n\t\t{re.escape(lv)} \{{\n.*?\n\t\t\}}\n", "\n", text, flags=re.S)
    assert n == 1, f"no block of {lv} in LVM's metadata"
    return out


def _restart(h: LabHandle) -> list[str]:
    """`hvlab stop` and `hvlab up`: what up said."""
    teardown.stop(h.defn.name)
    said: list[str] = []
    substrate.up(h.defn, start_guests=False, progress=said.append)
    return said


def _sent(said: list[str], messages: list[str]) -> None:
    sent = [s for s in said if "queued" in s]
    assert len(sent) == 1 and all(m in sent[0] for m in messages), said


def _agree_and_go_on(h: LabHandle, tmp_path: Path) -> None:
    """LVM and the kernel agree; LVM's next change counts its queue as sent and drops it."""
    lvm_tid, kernel_tid = _tids(h)
    assert lvm_tid == kernel_tid, (lvm_tid, kernel_tid)
    lvm_ids, kernel_ids = h.thin_ids()
    assert lvm_ids == kernel_ids
    vg, lv = h.names.vg, h.names.lv("vm01", "disk0")
    h.names.lvm()("lvcreate", "-q", "-s", "-n", "after", f"{vg}/{lv}", "--addtag", h.names.tag)
    h.names.lvm()("lvremove", "-q", "-y", f"{vg}/after")
    assert not thinsync.queued(_metadata(h, tmp_path))
    lvm_tid, kernel_tid = _tids(h)
    lvm_ids, kernel_ids = h.thin_ids()
    assert lvm_tid == kernel_tid and lvm_ids == kernel_ids


def _thin_lv(h: LabHandle, name: str) -> int:
    """A new thin LV of the lab's pool with 1 MiB written: its thin id."""
    vg = h.names.vg
    h.names.lvm()("lvcreate", "-q", "-V", "32M", "-T", f"{vg}/{h.names.pool}", "-n", name,
                  "--addtag", h.names.tag)
    with open(h.names.lv_path(name), "r+b") as f:
        f.write(b"x" * (1 << 20))
    thin_id = h.lab.lvs()[name].thin_id
    assert thin_id is not None
    return thin_id


def test_a_queued_delete_is_sent_at_up(lab_factory: Callable[..., LabHandle],
                                       tmp_path: Path) -> None:
    """Cut in `lvremove`: LVM no longer has the LV, the pool still has its device."""
    h = lab_factory(one_vm_lab(), start_guests=False)
    vg = h.names.vg
    gone = _thin_lv(h, "gone")
    h.names.lvm()("lvchange", "-q", "-an", f"{vg}/gone")
    text = _without_lv(_queue(_metadata(h, tmp_path), 1, f"delete = {gone}"), "gone")
    _restore(h, tmp_path, text)
    lvm_tid, kernel_tid = _tids(h)
    assert lvm_tid is not None and kernel_tid is not None and lvm_tid == kernel_tid + 1
    lvm_ids, kernel_ids = h.thin_ids()
    assert gone in kernel_ids - lvm_ids  # what `lvs` does not show
    said = _restart(h)
    _agree_and_go_on(h, tmp_path)
    _sent(said, [f"delete {gone}", f"set_transaction_id {kernel_tid} {lvm_tid}"])


def test_a_queued_snapshot_is_sent_at_up(lab_factory: Callable[..., LabHandle],
                                         tmp_path: Path) -> None:
    """Cut in `lvcreate -s`: LVM has the snapshot, the pool has no device for it."""
    h = lab_factory(one_vm_lab(), start_guests=False)
    vg, lv = h.names.vg, h.names.lv("vm01", "disk0")
    h.names.lvm()("lvcreate", "-q", "-s", "-n", "snap", f"{vg}/{lv}", "--addtag", h.names.tag)
    rows = h.lab.lvs()
    snap, origin = rows["snap"].thin_id, rows[lv].thin_id
    lvm_tid, _ = _tids(h)
    assert lvm_tid is not None
    # The kernel as it was before the snapshot: no device, the transaction before.
    tpool = poolstatus.tpool_name(h.names)
    dmioctl.message(tpool, f"delete {snap}")
    dmioctl.message(tpool, f"set_transaction_id {lvm_tid} {lvm_tid - 1}")
    _restore(h, tmp_path, _queue(_metadata(h, tmp_path), 0, 'create = "snap"'))
    assert _tids(h) == (lvm_tid, lvm_tid - 1)
    said = _restart(h)
    _agree_and_go_on(h, tmp_path)
    _sent(said, [f"create_snap {snap} {origin}", f"set_transaction_id {lvm_tid - 1} {lvm_tid}"])
    h.names.lvm()("lvremove", "-q", "-y", f"{vg}/snap")


def test_messages_the_pool_committed_before_the_cut_count_as_sent(
        lab_factory: Callable[..., LabHandle], tmp_path: Path) -> None:
    """Cut between libdm's own messages: the pool committed the delete and the snapshot (it
    commits after each message) but not the new transaction id. Sent again they answer
    ENODATA and EEXIST; up counts them as sent and moves the transaction id."""
    h = lab_factory(one_vm_lab(), start_guests=False)
    vg, lv = h.names.vg, h.names.lv("vm01", "disk0")
    gone = _thin_lv(h, "gone")
    h.names.lvm()("lvchange", "-q", "-an", f"{vg}/gone")
    h.names.lvm()("lvcreate", "-q", "-s", "-n", "snap", f"{vg}/{lv}", "--addtag", h.names.tag)
    rows = h.lab.lvs()
    snap, origin = rows["snap"].thin_id, rows[lv].thin_id
    tid, _ = _tids(h)
    assert tid is not None
    dmioctl.message(poolstatus.tpool_name(h.names), f"delete {gone}")
    text = _queue(_metadata(h, tmp_path), 1, f"delete = {gone}", 'create = "snap"')
    _restore(h, tmp_path, _without_lv(text, "gone"))
    assert _tids(h) == (tid + 1, tid)
    said = _restart(h)
    _agree_and_go_on(h, tmp_path)
    _sent(said, [f"set_transaction_id {tid} {tid + 1}",
                 f"already committed delete {gone}; create_snap {snap} {origin}"])
    h.names.lvm()("lvremove", "-q", "-y", f"{vg}/snap")
