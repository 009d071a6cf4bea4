"""Why a lab VM did not come up, read from console logs that real failed boots wrote."""

from __future__ import annotations

from hvlab.vm import bootlog

PREAMBLE = """Core dump limits :
\tsoft - 0
\thard - NONE
Checking that ptrace can change system call numbers...OK
Checking syscall emulation patch for ptrace...OK
Checking environment variables for a tempdir...none found
Checking if /dev/shm is on tmpfs...OK
Adding 167395328 bytes to physical memory to account for exec-shield gap
SELinux: CONFIG_SECURITY_SELINUX_CHECKREQPROT_VALUE is non-zero.  This is deprecated.
mmapper_init - find_iomem failed
Failed to initialize ubd device 0 :Couldn't determine size of device's file
"""
# linux.uml on a host with AMX, without the ptrace shim (Debian 12, 6.1um).
AMX = PREAMBLE + """userspace - ptrace set fp regs failed, errno = 14
Kernel panic - not syncing: Attempted to kill init! exitcode=0x0000000b
CPU: 0 PID: 1 Comm: init.sh Not tainted 6.1.176 #1
Stack:
 [<606931e5>] panic+0x197/0x376
"""
# HVLAB_VM_MEM=8M
SMALL = PREAMBLE + "Too few physical memory! Needed=234881024, given=227753984\n"


def test_the_error_that_led_to_the_panic_with_the_panic() -> None:
    assert bootlog.reason(AMX) == ("userspace - ptrace set fp regs failed, errno = 14 (then: "
                                   "Kernel panic - not syncing: Attempted to kill init! "
                                   "exitcode=0x0000000b)")
    assert "XSAVE" in bootlog.hint(bootlog.reason(AMX))


def test_the_last_trouble_without_a_panic() -> None:
    assert bootlog.reason(SMALL).startswith("Too few physical memory!")
    assert "HVLAB_VM_MEM" in bootlog.hint(bootlog.reason(SMALL))


def test_every_boot_s_noise_is_no_cause() -> None:
    assert bootlog.reason(PREAMBLE + "Powering off.\n") == (
        "the kernel printed no error (only the usual boot lines)")
    assert bootlog.reason("") == "the kernel printed nothing (an empty console log)"


def test_a_failed_self_check_is_kept() -> None:
    log = PREAMBLE + "Checking PROT_EXEC mmap in /dev/shm...Operation not permitted\n"
    cause = bootlog.reason(log)
    assert cause.startswith("Checking PROT_EXEC mmap") and "tmpfs" in bootlog.hint(cause)


def test_the_line_names_the_log() -> None:
    line = bootlog.failure(AMX, "/var/lib/hvlab-vm/lab-vm/console.log")
    assert line.startswith("the lab VM did not come up: userspace - ptrace set fp regs failed")
    assert line.endswith("console log: /var/lib/hvlab-vm/lab-vm/console.log")
    assert "\n" not in line
