"""Every program the project or its tests run is installed by provision.sh (or is Essential in
Debian), and in CI it is there: a missing install step fails here, not on a fresh machine."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from pathlib import Path

from hvlab.sys.programs import ESSENTIAL, PROGRAMS
from hvlab.vm import uml
from hvlab_fixtures.plugin import requires

REPO = Path(__file__).resolve().parents[2]
# Calls whose first argument is an argv (the subprocess layer, subprocess itself, the lab VM's
# runners, the off-host namespace wrapper, the tests' helpers).
RUNNERS = {"run", "Popen", "check_call", "check_output", "call", "sysrun", "inside", "note",
           "run_in", "run_ephemeral"}
# argv heads that are not a package's program, and why.
NOT_INSTALLED = {
    "hvlab": "this project's own command, in the venv",
    "dm-ioctl": "the program log's name for an ioctl hvlab makes itself (sys/dmioctl.py)",
    "tool": "test_sys_pure's program that does not exist, on purpose",
}


def _argv_heads() -> dict[str, set[str]]:
    """The program of every literal argv in the tree, with the files that run it."""
    found: dict[str, set[str]] = {}
    for top in ("harness", "fixtures", "tests", "docs"):
        for path in (REPO / top).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.Call) or not node.args:
                    continue
                name = getattr(node.func, "attr", getattr(node.func, "id", ""))
                # _in(ns, [argv]): the namespace wrapper takes the argv second.
                args = node.args[1:2] if name == "_in" else node.args[:1]
                if name not in RUNNERS | {"_in"}:
                    continue
                for arg in args:
                    if (isinstance(arg, ast.List) and arg.elts
                            and isinstance(arg.elts[0], ast.Constant)
                            and isinstance(arg.elts[0].value, str)):
                        head = Path(arg.elts[0].value).name
                        found.setdefault(head, set()).add(str(path.relative_to(REPO)))
    return found


def _provisioned() -> set[str]:
    """The words of provision.sh's package arrays (NAME_PACKAGES=( ... ), comments cut)."""
    out: set[str] = set()
    inside = False
    for raw in (REPO / "provision.sh").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if re.fullmatch(r"[A-Z_]*PACKAGES=\((.*)", line):
            inside = True
            line = line.split("(", 1)[1]
        if inside:
            inside = not line.endswith(")")
            out.update(line.rstrip(")").split())
    return out


# Shell words that are not commands: keywords and builtins.
SHELL_WORDS = {"for", "do", "done", "if", "then", "else", "elif", "fi", "case", "esac", "while",
               "until", "in", "export", "cd", "echo", "true", "false", "test", "return",
               "local", "set", "shift", "unset", "printf", "read", "exit", "eval", "exec",
               "wait", "trap", "command", "type", "break", "continue", "source", "time", "["}


def _shell_commands(text: str, *, recipes_only: bool = False) -> set[str]:
    """The first word of every simple command in a shell script (or a Makefile's recipes),
    past assignments and wrappers (env, sudo). A heuristic: the caller keeps only the words
    that name a program."""
    funcs = set(re.findall(r"^\s*([a-z_][a-z0-9_]*)\s*\(\)\s*\{", text, flags=re.M))
    out: set[str] = set()
    logical, buf = [], ""
    for raw in text.splitlines():
        if recipes_only and not raw.startswith("\t"):
            buf = ""
            continue
        line = "" if raw.lstrip().startswith("#") else raw.split(" #", 1)[0]
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    for line in logical:
        for seg in re.split(r";|&&|\|\||\||\$\(|\(|`", line.strip().lstrip("@-")):
            words = seg.split()
            while words and words[0] in ("then", "do", "else", "if", "elif", "while", "until",
                                         "!", "time"):
                words = words[1:]  # a keyword before a command
            while words and (re.match(r"^[A-Za-z_]\w*=", words[0]) or words[0] in ("env", "sudo")
                             or (words[0].startswith("-") and out & {"env", "sudo"})):
                if words[0] in ("env", "sudo"):
                    out.add(words[0])
                words = words[1:]
            if words and words[0] not in SHELL_WORDS | funcs:
                out.add(words[0].strip("'\""))
    return out


def test_the_scripts_run_only_registered_programs() -> None:
    """The lab VM's init script, provision.sh, CI's scripts and the Makefile's recipes: every
    word there that names a program on this machine is a registered one."""
    texts = {"init script": (uml.init_script(uml.VmPaths(Path("/x")), ["true"], {}), False),
             "provision.sh": ((REPO / "provision.sh").read_text(), False),
             ".ci/run": ((REPO / ".ci/run").read_text(), False),
             ".ci/fresh-check": ((REPO / ".ci/fresh-check").read_text(), False),
             "Makefile": ((REPO / "Makefile").read_text(), True)}
    found: dict[str, set[str]] = {}
    for where, (text, recipes) in texts.items():
        for word in _shell_commands(text, recipes_only=recipes):
            if "/" not in word and (word in PROGRAMS or shutil.which(word)):
                found.setdefault(word, set()).add(where)
    assert {"modprobe", "mount", "poweroff", "apt-get", "git", "make"} <= set(found), found
    unknown = {w: sorted(f) for w, f in found.items() if w not in PROGRAMS}
    assert not unknown, f"run by a script but not in hvlab/sys/programs.py: {unknown}"


def test_the_scan_sees_the_programs_it_should() -> None:
    heads = _argv_heads()
    for known in ("lvm", "dmsetup", "losetup", "mount", "thin_delta", "nbdkit", "vagrant"):
        assert known in heads, sorted(heads)


def test_every_program_run_is_registered() -> None:
    heads = _argv_heads()
    for not_installed in NOT_INSTALLED:
        heads.pop(not_installed, None)
    unknown = {h: sorted(f) for h, f in heads.items() if h not in PROGRAMS}
    assert not unknown, f"run but not in hvlab/sys/programs.py: {unknown}"


def test_every_package_is_installed_by_provision_or_essential() -> None:
    provisioned = _provisioned()
    assert {"lvm2", "user-mode-linux", "gcc", "vagrant"} <= provisioned, provisioned
    stray = {name: p.package for name, p in PROGRAMS.items()
             if p.package not in provisioned and p.package not in ESSENTIAL and not p.optional}
    assert not stray, f"provision.sh does not install: {stray}"


def test_essential_packages_are_essential() -> None:
    requires("dpkg-query")
    res = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${Essential}\n",
                          *sorted(ESSENTIAL)], capture_output=True, text=True, check=False)
    flags = dict(line.split() for line in res.stdout.splitlines() if len(line.split()) == 2)
    assert all(flags.get(p) == "yes" for p in ESSENTIAL), flags


def test_every_required_program_is_installed() -> None:
    """The real check: on this machine, after `make deps`, each one is on PATH (in CI a
    missing one fails the run; elsewhere it skips, naming them)."""
    required = [name for name, p in PROGRAMS.items() if not p.optional]
    missing = [name for name in required if shutil.which(name) is None]
    requires(*missing)
