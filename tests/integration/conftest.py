"""Integration tests: real loop devices, LVM thin pools, filesystems. Root and dm-thin needed."""

from __future__ import annotations

import pytest

from hvlab.fixtures.plugin import requires


@pytest.fixture(autouse=True)
def _real_devices(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("integration") is not None:
        requires("root", "loop")
