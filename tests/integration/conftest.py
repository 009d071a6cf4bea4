"""Integration tests: real loop devices, LVM thin pools, filesystems. Root and dm-thin needed."""

from __future__ import annotations

import pytest

from hvlab_fixtures.plugin import requires


@pytest.fixture(autouse=True)
def _real_devices(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("integration") is not None:
        requires("root", "loop")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--shard", default="", metavar="I/N",
                     help="run every Nth test from the Ith (N lab VMs side by side: `make test`)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    spec = config.getoption("--shard")
    if not spec:
        return
    i, sep, n = spec.partition("/")
    if not (sep and i.isdigit() and n.isdigit() and 1 <= int(i) <= int(n)):
        raise pytest.UsageError(f"--shard {spec!r}: expected I/N with 1 <= I <= N, e.g. 1/2")
    # Round robin, not blocks: a parametrized test's cases cost alike and sit side by side.
    keep = [t for k, t in enumerate(items) if k % int(n) == int(i) - 1]
    config.hook.pytest_deselected(items=[t for t in items if t not in keep])
    items[:] = keep
