"""The lab VM's ptrace shim, on this host's real ptrace: the size decision, and that a
SETREGSET of another size than the host's lands whole (what UML on an AMX host needs)."""

from __future__ import annotations

import ctypes
import json
import os
import platform
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hvlab.vm import xstate

PTRACE_TRACEME, PTRACE_GETREGSET, PTRACE_SETREGSET = 0, 0x4204, 0x4205
NT_X86_XSTATE = 0x202
XMM0 = 160  # offset of xmm0 in the legacy FXSAVE area
LEGACY_AND_HEADER = 576  # smaller than any host with AVX: the shim must widen it
XSTATE_BV = 512  # the XSAVE header's bitmap of the components in use


class Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


pytestmark = pytest.mark.skipif(platform.machine() != "x86_64",
                                reason="NT_X86_XSTATE is x86's (the shim is not used elsewhere)")


@pytest.mark.parametrize(("uml", "host", "action"), [
    (2696, 2696, "pass"),    # AVX-512 host without AMX: Debian's UML fits as it is
    (2696, 11008, "widen"),  # AMX host (tile data): the case that panicked
    (2696, 832, "pass"),     # AVX host without AVX-512: the kernel trims a larger buffer
    (2696, 0, "pass"),       # the host's size unknown: leave the call alone
])
def test_size_decision(uml: int, host: int, action: str) -> None:
    assert xstate.decide(uml, host) == action


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    return ctypes.CDLL(str(xstate.build(tmp_path_factory.mktemp("shim"))), mode=os.RTLD_LOCAL)


def test_the_c_rule_is_the_python_rule(shim: ctypes.CDLL) -> None:
    shim.hvlab_xstate_decide.restype = ctypes.c_char_p
    shim.hvlab_xstate_decide.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
    for uml in (576, 832, 2696, 11008, 20000):
        for host in (0, 832, 2696, 11008):
            assert shim.hvlab_xstate_decide(uml, host).decode() == xstate.decide(uml, host)


@pytest.fixture
def tracee() -> Iterator[int]:
    """A child stopped under our ptrace."""
    libc = ctypes.CDLL(None, use_errno=True)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        libc.ptrace(PTRACE_TRACEME, 0, None, None)
        os.kill(os.getpid(), signal.SIGSTOP)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSTOPPED(status)
    yield pid
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def _call(fn: Any, request: int, pid: int, buf: bytearray, length: int) -> tuple[int, int, int]:
    iov = Iovec(ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf)), length)
    ctypes.set_errno(0)
    rc = fn(request, pid, ctypes.c_void_p(NT_X86_XSTATE), ctypes.byref(iov))
    return rc, ctypes.get_errno(), iov.len


def test_setregset_of_any_size_lands_whole(shim: ctypes.CDLL, tracee: int, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    host = xstate.host_bytes(Path(shim._name))
    assert host >= LEGACY_AND_HEADER + 256  # every machine of ours has AVX
    before = bytearray(host + 64)
    assert _call(libc.ptrace, PTRACE_GETREGSET, tracee, before, host + 64) == (0, 0, host)

    # The kernel's own rule, which the shim exists for: exactly its size, or EFAULT.
    state = bytearray(before[:host])
    state[XMM0:XMM0 + 16] = bytes(range(1, 17))
    rc, err, _ = _call(libc.ptrace, PTRACE_SETREGSET, tracee, state, LEGACY_AND_HEADER)
    assert (rc, err) == (-1, 14)

    # Widened: xmm0 takes our bytes; what lies past them is the task's own state, untouched.
    report = tmp_path / "xstate.json"
    monkeypatch.setenv("HVLAB_XSTATE_REPORT", str(report))
    assert _call(shim.ptrace, PTRACE_SETREGSET, tracee, state, LEGACY_AND_HEADER)[:2] == (0, 0)
    after = bytearray(host)
    _call(libc.ptrace, PTRACE_GETREGSET, tracee, after, host)
    assert after[XMM0:XMM0 + 16] == bytes(range(1, 17))
    assert after[LEGACY_AND_HEADER:host] == before[LEGACY_AND_HEADER:host]
    assert json.loads(report.read_text()) == {"uml_bytes": LEGACY_AND_HEADER,
                                              "host_bytes": host, "action": "widen"}

    # The host's own size passes through, and so does a larger buffer: the kernel itself
    # takes the first `host` bytes of it (with or without the shim).
    state[XMM0:XMM0 + 16] = bytes(range(101, 117))
    assert _call(shim.ptrace, PTRACE_SETREGSET, tracee, state, host)[:2] == (0, 0)
    for fn, first in ((libc.ptrace, 201), (shim.ptrace, 221)):
        big = state + bytearray(64)
        big[XMM0:XMM0 + 16] = bytes(range(first, first + 16))
        assert _call(fn, PTRACE_SETREGSET, tracee, big, host + 64)[:2] == (0, 0)
        _call(libc.ptrace, PTRACE_GETREGSET, tracee, after, host)
        assert after[XMM0:XMM0 + 16] == bytes(range(first, first + 16))


def test_a_task_using_only_the_first_components_gets_zeros_past_them(
        shim: ctypes.CDLL, tracee: int) -> None:
    """What UML passes on an AMX host: every component in use lies in its bytes, so the shim
    fills the rest with zeros (no read back), which the kernel takes as initial state."""
    libc = ctypes.CDLL(None, use_errno=True)
    host = xstate.host_bytes(Path(shim._name))
    state = bytearray(host)
    assert _call(libc.ptrace, PTRACE_GETREGSET, tracee, state, host)[:2] == (0, 0)
    state[XSTATE_BV:XSTATE_BV + 8] = (0b11).to_bytes(8, "little")  # x87 and SSE only
    state[XMM0:XMM0 + 16] = bytes(range(31, 47))
    state[LEGACY_AND_HEADER:LEGACY_AND_HEADER + 256] = b"\xff" * 256  # AVX upper: not in use
    assert _call(shim.ptrace, PTRACE_SETREGSET, tracee, state, LEGACY_AND_HEADER)[:2] == (0, 0)
    after = bytearray(host)
    _call(libc.ptrace, PTRACE_GETREGSET, tracee, after, host)
    assert after[XMM0:XMM0 + 16] == bytes(range(31, 47))
    assert after[LEGACY_AND_HEADER:LEGACY_AND_HEADER + 256] == bytes(256)  # initial state


def test_the_host_size_probe_is_the_kernel_s_regset_size(shim: ctypes.CDLL,
                                                         tracee: int) -> None:
    shim.hvlab_xstate_host_size.restype = ctypes.c_long
    size = shim.hvlab_xstate_host_size()
    libc = ctypes.CDLL(None, use_errno=True)
    assert _call(libc.ptrace, PTRACE_GETREGSET, tracee, bytearray(1 << 16), 1 << 16)[2] == size
