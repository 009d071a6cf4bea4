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
                       "dpkg", "grep", "sed"})

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
    "gcc": Program("gcc"),
    # the lab VM's init script (uml.init_script) and a one-shot VM's console
    "poweroff": Program("systemd-sysv", optional="the lab VM's init ends with it; without it "
                                                 "PID 1 exits and the lab VM stops all the same"),
    "stty": Program("coreutils"),
    # the make targets and the tests
    "make": Program("make"),
    "python3": Program("python3"),
    "runuser": Program("util-linux"),  # provision.sh builds the venv as the checkout's owner
    "apt-get": Program("apt", optional="provision.sh's own installer: on every Debian system"),
    "apt-cache": Program("apt", optional="provision.sh's own installer: on every Debian system"),
    "sudo": Program("sudo", optional="only when `make` runs as another user than root"),
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
    "cut": Program("coreutils"),
    "date": Program("coreutils"),
    "dirname": Program("coreutils"),
    "env": Program("coreutils"),
    "id": Program("coreutils"),
    "ln": Program("coreutils"),
    "readlink": Program("coreutils"),
    "rm": Program("coreutils"),
    "seq": Program("coreutils"),
    "stat": Program("coreutils"),
    "tee": Program("coreutils"),
    "touch": Program("coreutils"),
    "grep": Program("grep"),
    "sed": Program("sed"),
    "cmp": Program("diffutils"),
    "diff": Program("diffutils"),
    "hostname": Program("hostname"),
    "dpkg": Program("dpkg"),
    "dpkg-query": Program("dpkg"),
}
