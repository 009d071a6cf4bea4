"""Every external program hvlab or its tests run, and the Debian package that brings it.

provision.sh installs each package named here (tests/unit/test_programs.py checks both ways,
and in CI that each required program is on PATH). A program that may be missing says why.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Program:
    package: str
    optional: str = ""  # why hvlab works without it; "" = required


# Debian's Essential packages: on every Debian system, never installed by provision.sh.
ESSENTIAL = frozenset({"coreutils", "util-linux", "dash", "bash", "diffutils", "hostname",
                       "dpkg"})

PROGRAMS: dict[str, Program] = {
    # storage: LVM, device-mapper, thin tools, loops, filesystems
    "lvm": Program("lvm2"),
    "dmsetup": Program("lvm2"),  # the dmsetup package, a dependency of lvm2
    "thin_check": Program("thin-provisioning-tools"),
    "thin_delta": Program("thin-provisioning-tools"),
    "thin_dump": Program("thin-provisioning-tools"),
    "modprobe": Program("kmod"),
    "losetup": Program("mount"),
    "mount": Program("mount"),
    "umount": Program("mount"),
    "blkid": Program("util-linux"),
    "blockdev": Program("util-linux"),
    "fsfreeze": Program("util-linux"),
    "fstrim": Program("util-linux"),
    "nsenter": Program("util-linux"),
    "setsid": Program("util-linux"),
    "mkfs.ext4": Program("e2fsprogs"),
    "fsck.ext4": Program("e2fsprogs"),
    "filefrag": Program("e2fsprogs"),
    "mkfs.xfs": Program("xfsprogs"),
    "xfs_repair": Program("xfsprogs"),
    "ip": Program("iproute2"),
    # off-host reading
    "nbdkit": Program("nbdkit"),
    # the lab VM (kernels without device-mapper), and its ptrace shim's compiler
    "linux.uml": Program("user-mode-linux", optional="only where the kernel lacks dm-thin"),
    "uml_mconsole": Program("uml-utilities", optional="only where the kernel lacks dm-thin"),
    "cc": Program("gcc"),
    # the make targets and the tests
    "make": Program("make"),
    "git": Program("git"),
    "vagrant": Program("vagrant"),
    # base system
    "sh": Program("dash"),
    "bash": Program("bash"),
    "cat": Program("coreutils"),
    "dd": Program("coreutils"),
    "mkdir": Program("coreutils"),
    "sha256sum": Program("coreutils"),
    "sleep": Program("coreutils"),
    "sync": Program("coreutils"),
    "tail": Program("coreutils"),
    "cmp": Program("diffutils"),
    "diff": Program("diffutils"),
    "hostname": Program("hostname"),
    "dpkg-query": Program("dpkg"),
}
