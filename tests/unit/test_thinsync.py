"""LVM's queued thin-pool messages read from its text metadata (lab.thinsync)."""

from __future__ import annotations

import errno

import pytest

from hvlab.errors import HvlabError
from hvlab.lab import thinsync
from hvlab.sys import dmioctl
from hvlab.sys.lvm import LvRow


def test_queued_messages_parse() -> None:
    text = ('\t\t\t\ttransaction_id = 7\n\t\t\t\tmessage1 {\n\t\t\t\t\tdelete = 5\n\t\t\t\t}\n'
            '\t\t\t\tmessage2 {\n\t\t\t\t\tcreate = "vm01_disk0_C"\n\t\t\t\t}\n')
    assert thinsync.queued(text) == [("delete", "5"), ("create", "vm01_disk0_C")]
    assert thinsync.queued("transaction_id = 7\n") == []


def test_the_pool_messages_for_a_queue() -> None:
    rows = {"b": LvRow("b", thin_id=1), "c": LvRow("c", thin_id=4, origin="b"),
            "t": LvRow("t", thin_id=6)}
    todo = [("delete", "5"), ("create", "c"), ("create", "t")]
    assert thinsync.pool_messages(todo, rows) == ["delete 5", "create_snap 4 1",
                                                  "create_thin 6"]
    with pytest.raises(HvlabError, match="gone"):
        thinsync.pool_messages([("create", "gone")], rows)


def test_only_the_answer_for_a_committed_message_counts_as_sent(
        monkeypatch: pytest.MonkeyPatch) -> None:
    answers = {"delete 5": errno.ENODATA, "create_thin 6": errno.EEXIST,
               "create_snap 7 1": errno.EEXIST, "delete 8": errno.EEXIST}

    def message(name: str, text: str) -> str:
        if text in answers:
            raise dmioctl.DmError("message", name, answers[text])
        return ""

    monkeypatch.setattr(dmioctl, "message", message)
    assert thinsync._send("pool-tpool", "create_thin 9") is True
    assert [thinsync._send("pool-tpool", t) for t in list(answers)[:3]] == [False] * 3
    with pytest.raises(dmioctl.DmError):
        thinsync._send("pool-tpool", "delete 8")  # EEXIST is not what a done delete says
