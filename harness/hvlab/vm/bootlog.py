"""Why a lab VM did not come up, in one line, from its kernel's own words."""

from __future__ import annotations

import re

# Lines every boot of Debian's UML prints at loglevel 4: not a cause. (A self-check that did
# not end in OK is kept: "Checking PROT_EXEC mmap in /dev/shm...Operation not permitted".)
NOISE = ("mmapper_init - find_iomem failed", "Failed to initialize ubd device",
         "SELinux:", "Core dump limits", "soft - ", "hard - ",
         "Adding ", "kmsg_dump", "Powering off", "reboot: System halted")
PASSED_CHECK = re.compile(r"^Checking .*(\.\.\.OK|\.\.\.none found)$")
PANIC = "Kernel panic - not syncing:"
TROUBLE = re.compile(r"(?i)\b(fail(ed|s)?|error|errno|cannot|can't|unable|too few|"
                     r"not found|refused|denied|panic|bug:|oops)\b")
# What to do, by what the kernel said (first match wins).
HINTS = (
    ("ptrace set fp regs failed",
     "this host's XSAVE area does not fit UML's FP buffer: `hvlab doctor` shows both sizes "
     "(the ptrace shim fixes it unless HVLAB_XSTATE_SHIM=0)"),
    ("Too few physical memory", "give the lab VM more memory (HVLAB_VM_MEM, e.g. 2G)"),
    ("Unable to mount root", "the lab VM mounts this host's / through hostfs: reinstall "
                             "user-mode-linux (`make deps`)"),
    ("PROT_EXEC mmap", "UML needs /dev/shm on tmpfs, mountable with exec"),
)


def _lines(text: str) -> list[str]:
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if (not line or line.startswith("[<") or any(line.startswith(n) for n in NOISE)
                or PASSED_CHECK.match(line)):
            continue
        out.append(line)
    return out


def reason(text: str) -> str:
    """The cause as the kernel put it: the error line that led to a panic (with the panic),
    else the last line that reads like trouble, else the last line."""
    lines = _lines(text)
    if not lines:
        return ("the kernel printed no error (only the usual boot lines)" if text.strip()
                else "the kernel printed nothing (an empty console log)")
    panics = [i for i, line in enumerate(lines) if PANIC in line]
    if panics:
        i = panics[0]
        before = [line for line in lines[:i] if TROUBLE.search(line)]
        if before:
            return f"{before[-1]} (then: {lines[i]})"
        return lines[i]
    trouble = [line for line in lines if TROUBLE.search(line)]
    return (trouble or lines)[-1]


def hint(cause: str) -> str:
    for needle, what in HINTS:
        if needle in cause:
            return what
    return "`hvlab doctor` checks what the lab VM needs"


def failure(cause_text: str, log: str) -> str:
    """The one line a user sees."""
    cause = reason(cause_text)
    return f"the lab VM did not come up: {cause}; {hint(cause)}; console log: {log}"
