"""Pure parts of the sys layer: sizes, the private LVM config, names."""

from __future__ import annotations

from pathlib import Path

import pytest

from hvlab.errors import CommandError
from hvlab.lab.paths import Names
from hvlab.sys import lvm
from hvlab.sys.run import run


@pytest.mark.parametrize(("text", "value"), [
    ("512", 512), ("1K", 1024), ("64M", 64 << 20), ("1.5G", 3 << 29), ("2GiB", 2 << 30),
    ("1t", 1 << 40), ("512b", 512), ("4KB", 4096), (" 8G ", 8 << 30), (".5K", 512),
    ("9" * 40 + "T", int("9" * 40) << 40),
])
def test_parse_size(text: str, value: int) -> None:
    assert lvm.parse_size(text) == value


@pytest.mark.parametrize("text", ["", "M", "-1M", "12Q", "abc", "inf", "-inf", "nan", "1e400",
                                  "1e3", "Infinity", "1_000", "4G\n", "4 G", "0x10", "4ib",
                                  "1" * 5000])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        lvm.parse_size(text)


def test_lvm_config_sees_only_lab_loops(tmp_path: Path) -> None:
    text = lvm.render_config(tmp_path, ["/dev/loop3", "/dev/loop7"])
    assert 'filter = [ "a|^/dev/loop3$|", "a|^/dev/loop7$|", "r|.*|" ]' in text
    assert 'global_filter = [ "a|^/dev/loop3$|", "a|^/dev/loop7$|", "r|.*|" ]' in text
    assert f'backup_dir = "{tmp_path}/backup"' in text
    assert "monitoring = 0" in text and "archive = 0" in text


def test_lvm_reserves_no_memory_in_the_lab_vm_only(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HVLAB_IN_VM", raising=False)
    assert "reserved_memory" not in lvm.render_config(tmp_path, [])
    monkeypatch.setenv("HVLAB_IN_VM", "1")
    assert "activation {\n    reserved_memory = 0\n" in lvm.render_config(tmp_path, [])


def test_lvm_config_with_no_devices_rejects_everything(tmp_path: Path) -> None:
    assert 'filter = [ "r|.*|" ]' in lvm.render_config(tmp_path, [])


def test_names_carry_the_lab_prefix() -> None:
    n = Names("lab1")
    assert n.vg == "hvlab_lab1"
    assert n.ctl("vm01", "disk0").startswith(n.dm_prefixes[1])
    assert n.dm_lv_name("vm01_disk0").startswith(n.dm_prefixes[0])
    # Prefixes of two labs never overlap (names have no separators of their own).
    other = Names("lab10")
    assert not any(p.startswith(q) for p in other.dm_prefixes for q in n.dm_prefixes)


def test_run_raises_typed_error_with_argv_and_stderr() -> None:
    with pytest.raises(CommandError) as info:
        run(["sh", "-c", "echo boom >&2; exit 3"])
    err = info.value
    assert err.argv[0] == "sh" and err.returncode == 3 and "boom" in err.stderr


def test_run_missing_command() -> None:
    with pytest.raises(CommandError) as info:
        run(["/nonexistent/tool"])
    assert info.value.returncode == 127
