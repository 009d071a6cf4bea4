/* hvlab: let Debian 12's user-mode-linux (6.1) switch FP state on hosts whose XSAVE area is
 * larger (or smaller) than the buffer UML was built with.
 *
 * UML saves and restores each guest task's FP/vector state with PTRACE_GETREGSET and
 * PTRACE_SETREGSET NT_X86_XSTATE, using a buffer of a size fixed at build time (2696 bytes:
 * x87 through AVX-512 and PKRU). The host kernel's SETREGSET accepts only a buffer of exactly
 * its own user XSAVE size (11008 bytes with AMX tile data) and answers EFAULT otherwise, so UML
 * panics at its first user process. Upstream UML later sized the buffer from the host at boot;
 * this does the same at the ptrace boundary, for UML's process only (LD_PRELOAD):
 *
 *   sizes agree       -> the call passes through unchanged
 *   UML's is smaller  -> read the task's full state, lay UML's bytes over its start, write the
 *                        full state back (what UML does not know of, AMX tiles, stays as it was)
 *   UML's is larger   -> write only the host's size (a GETREGSET is already trimmed by the kernel)
 *
 * Only the tile state is then not switched between UML's tasks, and no process can use AMX
 * without asking the host kernel for it (arch_prctl ARCH_REQ_XCOMP_PERM), which a UML guest
 * cannot do. HVLAB_XSTATE_REPORT=FILE: the sizes and the decision, written once, at the first
 * SETREGSET that is not passed through unchanged.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#define PROBE_BYTES 65536 /* far above any XSAVE area so far; the kernel trims to its size */

typedef long (*ptrace_fn)(int, pid_t, void *, void *);

static ptrace_fn real_ptrace;
static size_t host_size;       /* the host kernel's NT_X86_XSTATE size, learnt once */
static __thread unsigned char *scratch;
static int reported;

static ptrace_fn next_ptrace(void)
{
    if (!real_ptrace)
        real_ptrace = (ptrace_fn)dlsym(RTLD_NEXT, "ptrace");
    return real_ptrace;
}

static unsigned char *buffer(void)
{
    if (!scratch)
        scratch = aligned_alloc(64, PROBE_BYTES);
    return scratch;
}

/* The kernel's own answer: GETREGSET of a stopped tracee with a large buffer sets iov_len to
 * the regset's size. Returns 0 and leaves errno when it cannot be asked. */
static size_t learn_host_size(pid_t pid)
{
    struct iovec iov = { buffer(), PROBE_BYTES };

    if (!host_size && iov.iov_base && next_ptrace()(PTRACE_GETREGSET, pid,
                                                    (void *)NT_X86_XSTATE, &iov) == 0)
        host_size = iov.iov_len;
    return host_size;
}

/* What to do with a SETREGSET of `len` bytes when the host wants `host`. Mirrored in
 * hvlab/vm/xstate.py (decide), which `hvlab doctor` reports with. */
const char *hvlab_xstate_decide(size_t len, size_t host)
{
    if (!host || len == host)
        return "pass";
    return len < host ? "widen" : "trim";
}

static void report(size_t len, const char *what)
{
    const char *path = getenv("HVLAB_XSTATE_REPORT");
    char line[160];
    int fd, n;

    if (reported || !path || !*path)
        return;
    reported = 1;
    n = snprintf(line, sizeof line, "{\"uml_bytes\": %zu, \"host_bytes\": %zu, "
                 "\"action\": \"%s\"}\n", len, host_size, what);
    fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd >= 0) {
        if (write(fd, line, (size_t)n) < 0) { /* a report never fails a switch */ }
        close(fd);
    }
}

static long set_xstate(pid_t pid, struct iovec *iov)
{
    struct iovec full = { buffer(), 0 };
    size_t len = iov->iov_len;
    const char *what;

    if (!learn_host_size(pid) || !full.iov_base || host_size > PROBE_BYTES)
        return next_ptrace()(PTRACE_SETREGSET, pid, (void *)NT_X86_XSTATE, iov);
    what = hvlab_xstate_decide(len, host_size);
#ifdef HVLAB_TEST_SWITCH_ONLY
    /* Built so by tests/vm/test_fpstate_check.py alone: switch only the first N bytes, so the
     * upper vector state leaks from task to task, and the FP test must see it. */
    what = "widen";
    if (len > HVLAB_TEST_SWITCH_ONLY)
        len = HVLAB_TEST_SWITCH_ONLY;
#endif
    if (strcmp(what, "pass") == 0)
        return next_ptrace()(PTRACE_SETREGSET, pid, (void *)NT_X86_XSTATE, iov);
    report(len, what);
    if (strcmp(what, "trim") == 0) {
        full.iov_base = iov->iov_base;
        full.iov_len = host_size;
        return next_ptrace()(PTRACE_SETREGSET, pid, (void *)NT_X86_XSTATE, &full);
    }
    full.iov_len = PROBE_BYTES;
    if (next_ptrace()(PTRACE_GETREGSET, pid, (void *)NT_X86_XSTATE, &full) < 0)
        return -1;
    if (full.iov_len != host_size) {
        errno = EFAULT; /* the host changed its mind: never write a state we cannot vouch for */
        return -1;
    }
    memcpy(full.iov_base, iov->iov_base, len);
    return next_ptrace()(PTRACE_SETREGSET, pid, (void *)NT_X86_XSTATE, &full);
}

long ptrace(enum __ptrace_request request, ...)
{
    va_list ap;
    pid_t pid;
    void *addr, *data;

    va_start(ap, request);
    pid = va_arg(ap, pid_t);
    addr = va_arg(ap, void *);
    data = va_arg(ap, void *);
    va_end(ap);
    if (!next_ptrace()) {
        errno = ENOSYS;
        return -1;
    }
    if (request == PTRACE_SETREGSET && (unsigned long)addr == NT_X86_XSTATE && data)
        return set_xstate(pid, data);
    return real_ptrace(request, pid, addr, data);
}

/* For `hvlab doctor` and the tests: the host kernel's NT_X86_XSTATE size, asked of a child
 * stopped under ptrace. Returns the size, or -errno. */
long hvlab_xstate_host_size(void)
{
    struct iovec iov;
    int status;
    long size;
    pid_t child = fork();

    if (child < 0)
        return -errno;
    if (child == 0) {
        next_ptrace()(PTRACE_TRACEME, 0, NULL, NULL);
        raise(SIGSTOP);
        _exit(0);
    }
    if (waitpid(child, &status, 0) != child) {
        size = -errno;
    } else {
        iov.iov_base = buffer();
        iov.iov_len = PROBE_BYTES;
        size = next_ptrace()(PTRACE_GETREGSET, child, (void *)NT_X86_XSTATE, &iov) == 0
            ? (long)iov.iov_len : -errno;
    }
    kill(child, SIGKILL);
    waitpid(child, &status, 0);
    return size;
}
