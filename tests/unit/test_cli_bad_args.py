"""Every `hvlab` command and option with values wrong in type, range, charset and length,
where the check needs no lab: through the real command line, exactly one line on stderr
naming the bad value (and what is allowed), exit 2, no traceback, nothing created. These are
refused before any lab VM is booted (on the host) or any device touched (natively); the cases
that need a lab are in tests/integration/test_bad_input.py.

Safety net, as in test_cli_bad_lab: the lab VM directory lies under a regular file (no VM can
be booted) and a regular file stands where the lab's folder would be made.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hvlab_fixtures.clirun import hvlab
from hvlab_fixtures.plugin import requires

LONG = "x" * 5000
R = "r20260101000000abcd"

# (args, the message's part that must be in the one line)
CASES: list[tuple[list[str], str]] = [
    # the command line itself
    (["frob"], "No such command 'frob'"),
    (["up", "--frob"], "No such option '--frob'"),
    (["up", "--no-guests=1"], "does not take a value"),
    (["guest", "frob"], "No such command 'frob'"),
    (["guest", "start"], "Missing argument 'VM_NAME'"),
    (["backup", "vm01", "--dest"], "'--dest' requires an argument"),
    (["restore", "x"], "Missing option '--as'"),
    (["explain"], "Missing argument 'RUN [RUN ...]'"),
    (["explain", "--compare", R], "--compare needs two runs or more"),
    (["explain", R, R], "explain takes one run (2 given)"),
    (["backup", "vm01", "--model", "2008"], "unknown Hyper-V model '2008'"),
    (["backup", "vm01", "--model", "2012", "--incremental"], "--incremental with --model 2012"),
    (["backup", "vm01", "--model", "2012", "--pause-after", "12"], "from 1 to 11"),
    (["backup", "--resume", R, "--model", "2016"], "fixed when a run starts"),
    (["vm", "run"], "Missing argument"),
    # lab names, on every command that takes one: empty, charset, length, newline, reserved
    *[([*cmd, "-n", bad], f"invalid lab name {shown}")
      for cmd in (["down"], ["stop"], ["devices"], ["status"], ["runs"], ["recover"],
                  ["guest", "status"], ["backup", "vm01"], ["explain", R],
                  ["verify", R], ["restore", R, "--as", "r1"], ["up"])
      for bad, shown in (("", "''"), ("Bad_Name", "'Bad_Name'"))],
    (["down", "-n", "t1\n"], "invalid lab name 't1\\n'"),
    (["status", "-n", LONG], "invalid lab name 'xxxx"),
    (["runs", "-n", "backups"], "reserved for the backups folder"),
    (["devices", "-n", "\u00e9t\u00e9"], "invalid lab name"),
    # VM names: charset, length, reserved, empty
    (["backup", "VM01"], "invalid VM name 'VM01'"),
    (["backup", ""], "invalid VM name ''"),
    (["backup", "vm01\n"], "invalid VM name 'vm01\\n'"),
    (["backup", LONG], "invalid VM name 'xxxx"),
    (["backup", "vm01", "pool"], "invalid VM name 'pool'"),
    (["guest", "start", "Vm1"], "invalid VM name 'Vm1'"),
    (["guest", "stop", "snapshot1"], "invalid VM name 'snapshot1'"),
    (["guest", "workload", "vm-1", "--pause"], "invalid VM name 'vm-1'"),
    (["restore", R, "--as", "Bad_Name"], "invalid VM name 'Bad_Name'"),
    (["restore", R, "--as", ""], "invalid VM name ''"),
    (["restore", R, "--as", LONG], "invalid VM name 'xxxx"),
    (["restore", R, "--as", "r1", "--vm", "VM"], "invalid VM name 'VM'"),
    # backup: which of VMs / --resume / --abort, steps, run ids, fault points
    (["backup"], "give VMs to back up"),
    (["backup", "vm01", "--resume", R], "give VMs to back up"),
    (["backup", "--resume", R, "--abort", R], "give VMs to back up"),
    (["backup", "--resume", "../../etc"], "invalid run id '../../etc'"),
    (["backup", "--abort", "."], "invalid run id '.'"),
    (["backup", "--resume", LONG], "invalid run id 'xxxx"),
    (["backup", "--abort", "r1\n"], "invalid run id 'r1\\n'"),
    (["backup", "vm01", "--pause-after", "x"], "'x' is not a valid integer"),
    (["backup", "vm01", "--pause-after", "1.5"], "'1.5' is not a valid integer"),
    (["backup", "vm01", "--pause-after", "-1"], "got -1"),
    (["backup", "vm01", "--pause-after", "0"], "got 0"),
    (["backup", "vm01", "--pause-after", "5"], "cannot pause after step 5"),
    (["backup", "vm01", "--pause-after", "14"], "got 14"),
    (["backup", "vm01", "--pause-after", "9" * 30], "got 999"),
    (["backup", "vm01", "--app-aware", "maybe"], "'maybe' is not one of"),
    (["backup", "vm01", "--app-aware", ""], "'' is not one of"),
    (["backup", "vm01", "--inject", "step-99:kill"], "unknown fault point 'step-99'"),
    (["backup", "vm01", "--inject", "step-05:explode"], "unknown fault action 'explode'"),
    (["backup", "vm01", "--dest", "/proc/x"], "the lab VM does not share"),
    (["backup", "vm01", "--dest", "/etc/hostname"], "already exists as a file"),
    (["backup", "vm01", "--dest", "/etc/hostname/b"], "is not a folder"),
    (["backup", "vm01", "--dest", "/etc"], "already exists"),
    # explain, verify, restore
    (["explain", ".."], "invalid run id '..'"),
    (["explain", ""], "invalid run id ''"),
    (["explain", LONG], "invalid run id 'xxxx"),
    (["explain", R, "--png", "/dev/shm/x.png"], "the lab VM does not share"),
    (["verify", ""], "not ''"),
    (["restore", "", "--as", "r1"], "not ''"),
    (["verify", "/run/x"], "the lab VM does not share"),
    # guest workload: rate range, type, non-finite
    (["guest", "workload", "vm01", "--ops-per-s", "0"], "not in the range 0<x<=10000"),
    (["guest", "workload", "vm01", "--ops-per-s", "-5"], "not in the range"),
    (["guest", "workload", "vm01", "--ops-per-s", "20000"], "not in the range"),
    (["guest", "workload", "vm01", "--ops-per-s", "inf"], "not in the range"),
    (["guest", "workload", "vm01", "--ops-per-s", "1e400"], "not in the range"),
    (["guest", "workload", "vm01", "--ops-per-s", "nan"], "nan is not a number in (0, 10000]"),
    (["guest", "workload", "vm01", "--ops-per-s", "ten"], "'ten' is not a valid float"),
    # the lab VM's memory
    (["vm", "up", "--mem", "lots"], "'lots': allowed 256M to 64G"),
    (["vm", "up", "--mem", "100M"], "'100M': allowed 256M to 64G"),
    (["vm", "up", "--mem", "65G"], "allowed 256M to 64G"),
    (["vm", "up", "--mem", "2G\n"], "allowed 256M to 64G"),
    (["vm", "up", "--mem", "1e3M"], "allowed 256M to 64G"),
    (["vm", "up", "--mem", ""], "allowed 256M to 64G"),
]


@pytest.fixture
def safety_net(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private HVLAB_HOME with a file where the default lab's folder would be made, and the
    lab VM's folder under a file; returns HVLAB_HOME."""
    requires("root")  # natively, lab commands refuse non-root
    home = tmp_path / "home"
    home.mkdir()
    (home / "hvlab").write_bytes(b"")
    (tmp_path / "no-vm-here").write_bytes(b"")
    monkeypatch.setenv("HVLAB_HOME", str(home))
    monkeypatch.setenv("HVLAB_VM_DIR", str(tmp_path / "no-vm-here" / "vm"))
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.delenv("HVLAB_LAB", raising=False)
    monkeypatch.chdir(tmp_path)
    return home


def test_every_bad_argument_is_one_line_exit_2_nothing_made(safety_net: Path) -> None:
    wrong = [f"{[a[:20] for a in args]}: {w}" for args, message in CASES
             if (w := hvlab(*args, timeout=60).refusal(message))]
    assert not wrong, f"{len(wrong)} of {len(CASES)}:\n" + "\n".join(wrong)
    assert sorted(p.name for p in safety_net.iterdir()) == ["hvlab"]  # nothing made
    assert (safety_net.parent / "no-vm-here").is_file()


@pytest.mark.parametrize("env_lab", ["Bad", "t1\n", "backups", "x" * 13])
def test_a_bad_hvlab_lab_is_refused_too(safety_net: Path, monkeypatch: pytest.MonkeyPatch,
                                        env_lab: str) -> None:
    monkeypatch.setenv("HVLAB_LAB", env_lab)
    for args in (["runs"], ["down"], ["backup", "vm01"]):
        w = hvlab(*args, timeout=60).refusal("invalid lab name")
        assert w is None, f"{args}: {w}"
    assert sorted(p.name for p in safety_net.iterdir()) == ["hvlab"]


GOOD_VM = '[[vm]]\nname = "vm01"\n[[vm.disk]]\nname = "disk0"\nsize = "64M"\n'
# lab-file values the TOML types allow and the fields do not (the field-by-field table is in
# test_definition.py; these go through `hvlab up`)
LAB_FILES: list[tuple[str, str]] = [
    ("", "at least one [[vm]] is required"),
    ('[lab]\nname = "bad"\n', "at least one [[vm]] is required"),
    ('[[lab]]\nname = "bad"\n' + GOOD_VM, "[lab] must be a table"),
    ('[lab]\nname = {x = 1}\n' + GOOD_VM, "invalid lab name {'x': 1}"),
    ('[lab]\nname = 1979-05-27\n' + GOOD_VM, "invalid lab name datetime.date(1979, 5, 27)"),
    ('[lab]\nname = "bad"\nbacking_files = 1e3\n' + GOOD_VM, "invalid backing_files 1000.0"),
    ('[lab]\nname = "bad"\n' + GOOD_VM.replace('"64M"', "1979-05-27T07:32:00Z"),
     "invalid size datetime.datetime(1979"),
    ('[lab]\nname = "bad"\n' + GOOD_VM.replace('"64M"', "[" * 5000 + "]" * 5000),
     "malformed lab file"),
    ('[lab]\nname = "bad"\n' + GOOD_VM.replace('"vm01"', '"' + "v" * 100000 + '"'),
     "invalid VM name 'vvvv"),
    ('[lab]\nname = "bad"\nname = "bad"\n' + GOOD_VM, "malformed lab file"),
    ('[lab]\nname = "bad"\n' + GOOD_VM + "[vm.workload]\nseed = 99999999999999999999\n",
     "invalid workload seed 99999999999999999999 for VM vm01: allowed an integer 0 to 2^63-1"),
    ('[lab]\nname = "bad"\n' + GOOD_VM + "[vm.workload]\nseed = " + "9" * 5000 + "\n",
     "malformed lab file"),
    ('[lab]\nname = "bad"\n' + GOOD_VM + "[vm.workload]\nops_per_s = 1e99999\n",
     "invalid workload ops_per_s inf"),
]


def test_lab_file_values_of_the_wrong_toml_type(safety_net: Path) -> None:
    wrong = []
    for i, (text, message) in enumerate(LAB_FILES):
        lab = safety_net.parent / f"lab{i}.toml"
        lab.write_text(text)
        res = hvlab("up", "--lab", str(lab), "--no-guests", timeout=60)
        if (w := res.refusal(message)) or len(res.err) > 600:
            wrong.append(f"#{i} {text[:40]!r}: {w or 'a line of ' + str(len(res.err))}")
    assert not wrong, "\n".join(wrong)
    assert sorted(p.name for p in safety_net.iterdir()) == ["hvlab"]
