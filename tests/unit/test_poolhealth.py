"""A pool's health from dm-thin's status line (pure parsing; the real failure is in
tests/integration/test_pool_meta_fault.py)."""

from __future__ import annotations

import pytest

from hvlab.lab.paths import Names
from hvlab.lab.poolhealth import Health, parse

LIVE = "1 110/1024 300/58880 - {mode} discard_passdown error_if_no_space {check} 768"


@pytest.mark.parametrize(("params", "mode", "failed"), [
    (LIVE.format(mode="rw", check="-"), "rw", False),
    (LIVE.format(mode="out_of_data_space", check="-"), "out_of_data_space", False),
    (LIVE.format(mode="ro", check="-"), "ro", True),
    (LIVE.format(mode="rw", check="needs_check"), "rw", True),
    ("Fail", "Fail", True),
])
def test_the_kernel_word_decides(params: str, mode: str, failed: bool) -> None:
    h = parse(params.split())
    assert h is not None and h.mode == mode and h.failed is failed


def test_nothing_said_is_no_pool() -> None:
    assert parse([]) is None


def test_the_line_names_the_pool_and_its_mode() -> None:
    line = Health("ro", True).describe(Names("lab1"))
    assert "thin pool hvlab_lab1/pool" in line and "(mode ro, needs_check)" in line
    assert "(mode Fail)" in Health("Fail", True).describe(Names("lab1"))
