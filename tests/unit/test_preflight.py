"""The backup's preflight on the thin pool: pure decisions on LVM's JSON report rows (the rows
below are what `lvs --reportformat json --units b --nosuffix` printed in the lab VM)."""

from __future__ import annotations

import pytest

from hvlab.errors import BadInput
from hvlab.flow import preflight as pf
from hvlab.sys.lvm import LvRow

VG, POOL = "hvlab_t", "pool"


def pool_row(**over: str) -> LvRow:
    row = {"lv_name": "pool", "vg_name": VG, "lv_attr": "twi-aot---", "lv_size": "478150656",
           "data_percent": "1.93", "metadata_percent": "10.94", "lv_health_status": "",
           "lv_metadata_size": "4194304", "chunk_size": "65536"}
    return LvRow.from_report({**row, **over})


def disk_row(name: str = "vm01_disk0", pct: str = "13.77", size: str = "67108864") -> LvRow:
    return LvRow.from_report({"lv_name": name, "vg_name": VG, "lv_size": size,
                              "data_percent": pct, "metadata_percent": "",
                              "lv_health_status": "", "lv_metadata_size": "",
                              "chunk_size": "0"})


def by_name(rows: list[LvRow]) -> dict[str, LvRow]:
    return {r.name: r for r in rows}


def refused(rows: list[LvRow], limit: int = 80,
            disks: tuple[str, ...] = ("vm01_disk0",)) -> str:
    with pytest.raises(BadInput) as info:
        pf.check(by_name(rows), VG, POOL, list(disks), limit)
    msg = str(info.value)
    assert "\n" not in msg and f"{VG}/{POOL}" in msg
    return msg


def test_a_healthy_pool_with_room_passes() -> None:
    pf.check(by_name([pool_row(), disk_row()]), VG, POOL, ["vm01_disk0"], 80)


def test_metadata_at_or_above_the_limit_is_refused_naming_figure_and_limit() -> None:
    msg = refused([pool_row(metadata_percent="80.00"), disk_row()])
    assert "80.00%" in msg and "limit of 80%" in msg and "--metadata-limit" in msg
    msg = refused([pool_row(), disk_row()], limit=10)
    assert "10.94%" in msg and "limit of 10%" in msg
    pf.check(by_name([pool_row(metadata_percent="79.99"), disk_row()]), VG, POOL,
             ["vm01_disk0"], 80)


@pytest.mark.parametrize("health", ["out_of_data", "metadata_read_only", "failed",
                                    "needs_check"])
def test_a_pool_lvm_reports_unhealthy_is_refused_whatever_the_limit(health: str) -> None:
    msg = refused([pool_row(lv_health_status=health, data_percent="", metadata_percent=""),
                   disk_row()], limit=100)
    assert health in msg
    assert ("lvextend" if health == "out_of_data" else "hvlab recover") in msg


def test_full_data_space_is_refused() -> None:
    msg = refused([pool_row(data_percent="100.00"), disk_row()], limit=100)
    assert "100.00% full" in msg


def test_a_pool_without_figures_is_refused_not_a_traceback() -> None:
    assert "metadata_percent" in refused([pool_row(metadata_percent=""), disk_row()])
    assert "missing" in refused([disk_row()])


def test_the_worst_case_estimate_may_not_cross_100_percent() -> None:
    # 1 GiB disk fully mapped at 64 KiB chunks: 16384 mappings -> 131 leaves, 2 parents, a root.
    assert pf.tree_blocks(16384) == 134
    assert pf.worst_case_blocks([16384]) == 4 * pf.DEVICE_BLOCKS + 2 * 134
    full_disk = disk_row(pct="100.00", size=str(1 << 30))
    # 75 % of 1024 blocks used leaves 256: the 276 blocks of the worst case do not fit.
    msg = refused([pool_row(metadata_percent="75.00"), full_disk], disks=("vm01_disk0",))
    assert "768 of 1024 blocks" in msg and "up to 276 more" in msg and "past 100%" in msg
    # The same disk nearly empty (82 mappings) needs 10 blocks: it fits.
    pf.check(by_name([pool_row(metadata_percent="75.00"), disk_row(pct="0.50")]), VG, POOL,
             ["vm01_disk0"], 80)


def test_estimate_counts_every_disk_of_the_job() -> None:
    rows = [pool_row(metadata_percent="50.00"),
            *[disk_row(f"vm01_disk{i}", pct="100.00", size=str(1 << 30)) for i in range(2)]]
    pf.check(by_name(rows), VG, POOL, ["vm01_disk0"], 80)  # 276 of 512 free: fits
    msg = refused(rows, disks=("vm01_disk0", "vm01_disk1"))  # 552: does not
    assert "2 disks" in msg and "up to 552 more" in msg


def test_mapped_chunks_rounds_up_and_ignores_what_is_not_a_number() -> None:
    assert pf.mapped_chunks(disk_row(pct="13.77"), 65536) == 142  # 141.0048 chunks
    assert pf.mapped_chunks(disk_row(pct=""), 65536) == 0
    assert pf.mapped_chunks(None, 65536) == 0


@pytest.mark.parametrize("bad", [0, 101, -5, True, 50.5, "80", None, float("nan")])
def test_limit_is_a_whole_percentage_from_1_to_100(bad: object) -> None:
    with pytest.raises(BadInput, match="--metadata-limit"):
        pf.check_limit(bad)
    assert pf.check_limit(1) == 1 and pf.check_limit(100) == 100
