"""guest.pid names the emulator only while that process runs: after a power cut the lab VM
counts pids from the start, and a recorded pid can be a thread of a guest started since
(seen in `make soak CUTS=5 SEED=13`: vm02's guest was taken for running, never started).
Real processes, no mocks."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from hvlab.guest import supervise

# A process whose command line reads like the emulator's, with a second thread.
PROGRAM = "import threading, time; threading.Thread(target=time.sleep, args=(60,)).start()"


@pytest.fixture
def fake_emulator() -> Iterator[psutil.Process]:
    proc = subprocess.Popen([sys.executable, "-c", PROGRAM, supervise.MODULE])
    p = psutil.Process(proc.pid)
    deadline = time.monotonic() + 10
    while p.num_threads() < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    yield p
    proc.kill()
    proc.wait()


def _write(run_dir: Path, text: str) -> Path:
    (run_dir / "guest.pid").write_text(text)
    return run_dir


def test_the_recorded_process_counts(tmp_path: Path, fake_emulator: psutil.Process) -> None:
    line = f"{fake_emulator.pid} {fake_emulator.create_time()!r}\n"
    assert supervise.running(_write(tmp_path, line)) == fake_emulator.pid
    # the format written before the start time was added: the pid alone
    assert supervise.running(_write(tmp_path, f"{fake_emulator.pid}\n")) == fake_emulator.pid


def test_a_thread_id_is_not_a_guest(tmp_path: Path, fake_emulator: psutil.Process) -> None:
    (tid,) = [t.id for t in fake_emulator.threads() if t.id != fake_emulator.pid]
    assert psutil.Process(tid).cmdline() == fake_emulator.cmdline()  # what fooled the check
    assert supervise.running(_write(tmp_path, f"{tid}\n")) is None


def test_a_recycled_pid_is_not_a_guest(tmp_path: Path, fake_emulator: psutil.Process) -> None:
    earlier = fake_emulator.create_time() - 30
    assert supervise.running(_write(tmp_path, f"{fake_emulator.pid} {earlier!r}\n")) is None


@pytest.mark.parametrize("text", ["", "x\n", "999999999 1.0\n"])
def test_a_bad_or_dead_pid_file_is_not_a_guest(tmp_path: Path, text: str) -> None:
    assert supervise.running(_write(tmp_path, text)) is None
    assert supervise.running(tmp_path / "absent") is None
