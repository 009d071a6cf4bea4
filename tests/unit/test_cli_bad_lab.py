"""`hvlab up` with a bad lab file or flag, through the real command line: exactly one line on
stderr, exit 2, nothing created. Bad input is refused before any device is touched, so this
runs where the tests run (on the host the check happens before the lab VM is asked for).

Safety net, should a bad value ever pass: the lab VM directory lies under a regular file (no
VM can be booted) and a regular file stands where the lab directory would be made (no lab can
be built), so a regression fails the test instead of building a lab.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hvlab_fixtures.plugin import requires

GOOD_VM = '[[vm]]\nname = "vm01"\n[[vm.disk]]\nname = "disk0"\nsize = "64M"\n'


def _lab(name: str = "bad", backing: str = "1G", vm: str = "vm01", disk: str = "disk0",
         size: str = "64M") -> str:
    return (f'[lab]\nname = "{name}"\nbacking_size = "{backing}"\n'
            f'[[vm]]\nname = "{vm}"\n[[vm.disk]]\nname = "{disk}"\nsize = "{size}"\n')


# (id, lab file content, extra CLI args, the lab name a regression would create, message)
CASES: list[tuple[str, bytes | None, list[str], str, str]] = [
    ("disk-size-inf", _lab(size="inf").encode(), [], "bad", "invalid size 'inf'"),
    ("disk-size-1e400", _lab(size="1e400").encode(), [], "bad", "invalid size '1e400'"),
    ("backing-inf", _lab(backing="inf").encode(), [], "bad", "invalid size 'inf'"),
    ("backing-1e400", _lab(backing="1e400").encode(), [], "bad", "invalid size '1e400'"),
    ("binary", bytes(range(256)) * 4, [], "hvlab", "not UTF-8"),
    ("latin1-byte", _lab().replace("vm01", "vm\xe9").encode("latin-1"), [], "bad",
     "not UTF-8"),
    ("nul-bytes", b"\x00" * 32, [], "hvlab", "malformed lab file"),
    ("lab-name-newline", _lab(name="t1\\n").encode(), [], "t1\n", "invalid lab name 't1\\n'"),
    ("vm-name-newline", _lab(vm="vm1\\n").encode(), [], "bad", "invalid VM name 'vm1\\n'"),
    ("vm-pool-disk-tmeta", _lab(vm="pool", disk="tmeta").encode(), [], "bad",
     "invalid VM name 'pool'"),
    ("vm-pvmove", _lab(vm="pvmove").encode(), [], "bad", "invalid VM name 'pvmove'"),
    ("vm-snapshot1", _lab(vm="snapshot1").encode(), [], "bad", "invalid VM name 'snapshot1'"),
    ("disk-tmeta", _lab(disk="tmeta").encode(), [], "bad", "invalid disk name 'tmeta'"),
    ("disk-rimage", _lab(disk="rimage").encode(), [], "bad", "invalid disk name 'rimage'"),
    ("disk-unaligned", _lab(size="64.1M").encode(), [], "bad", "not a multiple of 512"),
    ("malformed-toml", b"[lab\nname = 1\n", [], "hvlab", "malformed lab file"),
    ("too-large", b"#" * (2 << 20), [], "hvlab", "too large"),
    ("flag-backing-inf", _lab().encode(), ["--backing-size", "inf"], "bad", "invalid size"),
    ("flag-name-newline", _lab().encode(), ["-n", "t1\n"], "t1\n", "invalid lab name"),
    ("lab-file-is-a-directory", None, [], "hvlab", "not a regular file"),
]


@pytest.mark.parametrize(("content", "args", "would_make", "message"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_up_with_a_bad_lab_file_is_one_line_exit_2_nothing_made(
        tmp_path: Path, content: bytes | None, args: list[str], would_make: str,
        message: str) -> None:
    requires("root")  # natively, lab commands refuse non-root before reading the lab file
    home = tmp_path / "home"
    home.mkdir()
    (home / would_make).write_bytes(b"")  # the safety net: see the module's docstring
    blocker = tmp_path / "no-vm-here"
    blocker.write_bytes(b"")
    if content is None:
        lab_file = tmp_path / "lab-dir"
        lab_file.mkdir()
    else:
        lab_file = tmp_path / "lab.toml"
        lab_file.write_bytes(content)
    env = {**os.environ, "HVLAB_HOME": str(home), "HVLAB_VM_DIR": str(blocker / "vm"),
           "NO_COLOR": "1"}
    env.pop("HVLAB_LAB", None)
    res = subprocess.run([sys.executable, "-m", "hvlab.cli", "up", "--lab", str(lab_file),
                          "--no-guests", *args], capture_output=True, text=True, env=env,
                         timeout=120, stdin=subprocess.DEVNULL)
    lines = res.stderr.splitlines()
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1 and res.stdout == "", (res.stdout, res.stderr)
    assert lines[0].startswith("hvlab: ") and message in lines[0], lines[0]
    assert sorted(p.name for p in home.iterdir()) == [would_make]  # nothing made
    assert (home / would_make).is_file() and blocker.is_file()
