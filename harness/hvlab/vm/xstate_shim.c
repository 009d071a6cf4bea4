/* hvlab: let Debian 12's user-mode-linux (6.1) switch FP state on hosts whose XSAVE area is
 * larger than the buffer UML was built with (hosts with AMX).
 *
 * UML saves and restores each guest task's FP/vector state with PTRACE_GETREGSET and
 * PTRACE_SETREGSET NT_X86_XSTATE, using a buffer of a size fixed at build time (2696 bytes:
 * x87 through AVX-512 and PKRU). The host kernel trims a larger buffer to its own size, but
 * answers a smaller SETREGSET with EFAULT: on a host whose user XSAVE size is larger (11008
 * bytes with AMX tile data) UML panics at its first user process. Upstream UML later sized
 * the buffer from the host at boot; this does the same at the ptrace boundary, for UML's
 * process only (LD_PRELOAD):
 *
 *   UML's buffer is the host's size or larger -> the call passes through unchanged
 *   UML's buffer is smaller (widen)            -> UML's bytes, then zeros to the host's size
 *                                                 (the kernel gives every component the task
 *                                                 does not use its initial state); a task that
 *                                                 uses a component past UML's bytes keeps its
 *                                                 own: read back, UML's bytes laid over it
 *
 * What UML does not know of (AMX tiles) stays as the task had it: it is not switched between
 * UML's tasks, and no process can use AMX without asking the host kernel for it (arch_prctl
 * ARCH_REQ_XCOMP_PERM), which a UML guest cannot do. HVLAB_XSTATE_REPORT=FILE: the sizes and
 * the decision, written once, at the first SETREGSET that is widened.
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
#include <cpuid.h>
#include <stdint.h>

#define PROBE_START 65536     /* far above any XSAVE area so far */
#define PROBE_MAX (16 << 20)  /* a regset this large would be a kernel bug, not a CPU */

typedef long (*ptrace_fn)(int, pid_t, void *, void *);

static ptrace_fn real_ptrace;
static size_t host_size;  /* the host kernel's NT_X86_XSTATE size, learnt once */
static __thread unsigned char *scratch;
static __thread size_t scratch_size;
static int reported;

static ptrace_fn next_ptrace(void)
{
    if (!real_ptrace)
        real_ptrace = (ptrace_fn)dlsym(RTLD_NEXT, "ptrace");
    return real_ptrace;
}

static unsigned char *buffer(size_t size)
{
    if (scratch_size < size) {
        free(scratch);
        scratch = aligned_alloc(64, size);
        scratch_size = scratch ? size : 0;
    }
    return scratch;
}

/* GETREGSET of a stopped tracee into a buffer larger than the regset: the kernel sets iov_len
 * to the regset's real size. A buffer filled to the brim may be too small: ask again, larger.
 * Returns the size, or 0 with errno set. */
static size_t regset_size(pid_t pid)
{
    for (size_t want = PROBE_START; want <= PROBE_MAX; want *= 2) {
        struct iovec iov = { buffer(want), want };

        if (!iov.iov_base) {
            errno = ENOMEM;
            return 0;
        }
        if (next_ptrace()(PTRACE_GETREGSET, pid, (void *)NT_X86_XSTATE, &iov) < 0)
            return 0;
        if (iov.iov_len < want)
            return iov.iov_len;
    }
    errno = EOVERFLOW;
    return 0;
}

/* What to do with a SETREGSET of `len` bytes when the host's regset is `host` bytes (0:
 * unknown). Mirrored in hvlab/vm/xstate.py (decide), which `hvlab doctor` reports with. */
const char *hvlab_xstate_decide(size_t len, size_t host)
{
    return host && len < host ? "widen" : "pass";
}

static void report(size_t len)
{
    const char *path = getenv("HVLAB_XSTATE_REPORT");
    char line[160];
    int fd, n;

    if (reported || !path || !*path)
        return;
    reported = 1;
    n = snprintf(line, sizeof line, "{\"uml_bytes\": %zu, \"host_bytes\": %zu, "
                 "\"action\": \"widen\"}\n", len, host_size);
    fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0644);
    if (fd >= 0) {
        if (write(fd, line, (size_t)n) < 0) { /* a report never fails a switch */ }
        close(fd);
    }
}

#define XSTATE_BV 512  /* the XSAVE header's component bitmap, in the standard format */

/* The XSAVE components (bits) that lie wholly within the first `len` bytes of the standard
 * format (CPUID leaf 0xD gives each one's offset and size; x87 and SSE are the legacy area). */
static uint64_t covered_by(size_t len)
{
    static size_t for_len;
    static uint64_t mask;
    unsigned a, b, c, d;

    if (for_len == len)
        return mask;
    mask = len >= XSTATE_BV ? 3 : 0;
    for (unsigned i = 2; i < 63; i++) {
        if (__get_cpuid_count(0xd, i, &a, &b, &c, &d) && a && (size_t)b + a <= len)
            mask |= (uint64_t)1 << i;
    }
    for_len = len;
    return mask;
}

static long set_xstate(pid_t pid, struct iovec *iov)
{
    size_t len = iov->iov_len;
    struct iovec full;

    if (!host_size)
        host_size = regset_size(pid);
#ifdef HVLAB_TEST_SWITCH_ONLY
    /* Built so by tests/vm/test_fpstate_check.py alone: switch only the first N bytes, so the
     * upper vector state leaks from task to task, and the FP test must see it. */
    if (len > HVLAB_TEST_SWITCH_ONLY)
        len = HVLAB_TEST_SWITCH_ONLY;
#else
    if (strcmp(hvlab_xstate_decide(len, host_size), "pass") == 0)
        return next_ptrace()(PTRACE_SETREGSET, pid, (void *)NT_X86_XSTATE, iov);
#endif
    report(len);
    full.iov_base = buffer(host_size);
    full.iov_len = host_size;
    if (!full.iov_base) {
        errno = ENOMEM;
        return -1;
    }
    uint64_t present = 0;
    if (len >= XSTATE_BV + sizeof present)
        memcpy(&present, (char *)iov->iov_base + XSTATE_BV, sizeof present);
    if (len >= XSTATE_BV + sizeof present && !(present & ~covered_by(len))) {
        /* Every component the task has in use lies in UML's bytes: the kernel puts the
         * others in their initial state whatever follows, so zeros do (no read needed). */
        memcpy(full.iov_base, iov->iov_base, len);
        memset((char *)full.iov_base + len, 0, host_size - len);
        return next_ptrace()(PTRACE_SETREGSET, pid, (void *)NT_X86_XSTATE, &full);
    }
    /* A component past UML's bytes is in use: keep the task's own, read back. */
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
 * stopped under ptrace. Returns the size, or -errno (never waits on a child it cannot trace). */
long hvlab_xstate_host_size(void)
{
    ptrace_fn trace = next_ptrace();
    int status;
    long size;
    pid_t child;

    if (!trace)
        return -ENOSYS;
    child = fork();
    if (child < 0)
        return -errno;
    if (child == 0) {
        if (trace(PTRACE_TRACEME, 0, NULL, NULL) != 0)
            _exit(127);
        raise(SIGSTOP);
        _exit(0);
    }
    if (waitpid(child, &status, WUNTRACED | __WALL) != child)
        size = -errno;
    else if (!WIFSTOPPED(status))
        size = -EPERM; /* it could not be traced (Yama, seccomp, a tracer of its own) */
    else {
        size_t n = regset_size(child);

        size = n ? (long)n : -errno;
    }
    kill(child, SIGKILL);
    waitpid(child, &status, __WALL);
    return size;
}
