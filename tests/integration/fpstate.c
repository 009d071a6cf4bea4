/* Does the kernel keep each task's vector registers? (the lab VM's FP state switch)
 *
 *   fpstate THREADS PROCESSES ROUNDS
 *
 * Every thread of every process fills all vector registers (zmm0-31 with AVX-512, else
 * ymm0-15 with AVX2, else xmm0-15) with a pattern of its own, gives up the CPU in the same asm
 * block (sched_yield, and nanosleep every 8th round), then reads them back and compares. A
 * kernel that does not save and restore the state per task hands one thread another's
 * registers, and the compare fails. Prints one line; exit 0 when every round matched.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

enum { NREG_MAX = 32, WIDTH_MAX = 64 };

static int threads, processes, rounds;
static pthread_barrier_t start;
static const char *kind;
static int nreg, width;

static const struct timespec nap = { 0, 50000 };

#define R8(op, a, b, c, d, e, f, g, h) op(a) op(b) op(c) op(d) op(e) op(f) op(g) op(h)
#define LOADZ(n) "vmovdqu64 " #n "*64(%[in]), %%zmm" #n "\n\t"
#define SAVEZ(n) "vmovdqu64 %%zmm" #n ", " #n "*64(%[out])\n\t"
#define LOADY(n) "vmovdqu " #n "*32(%[in]), %%ymm" #n "\n\t"
#define SAVEY(n) "vmovdqu %%ymm" #n ", " #n "*32(%[out])\n\t"
#define LOADX(n) "movdqu " #n "*16(%[in]), %%xmm" #n "\n\t"
#define SAVEX(n) "movdqu %%xmm" #n ", " #n "*16(%[out])\n\t"
#define ALL16(op) R8(op, 0, 1, 2, 3, 4, 5, 6, 7) R8(op, 8, 9, 10, 11, 12, 13, 14, 15)
#define ALL32(op) ALL16(op) R8(op, 16, 17, 18, 19, 20, 21, 22, 23) \
    R8(op, 24, 25, 26, 27, 28, 29, 30, 31)
/* The syscall sits between the loads and the stores: nothing of ours runs in between. */
#define SWITCH "movq %[nr], %%rax\n\tmovq %[ts], %%rdi\n\txorl %%esi, %%esi\n\tsyscall\n\t"
#define CLOBBER_SYS "rax", "rcx", "rdx", "rdi", "rsi", "r11", "memory"

__attribute__((target("avx512f"))) static void round_avx512(const void *in, void *out, long nr)
{
    __asm__ volatile(ALL32(LOADZ) SWITCH ALL32(SAVEZ)
                     : : [in] "r"(in), [out] "r"(out), [nr] "r"(nr), [ts] "r"(&nap)
                     : CLOBBER_SYS, "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6",
                       "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14",
                       "xmm15", "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22",
                       "xmm23", "xmm24", "xmm25", "xmm26", "xmm27", "xmm28", "xmm29", "xmm30",
                       "xmm31");
}

__attribute__((target("avx2"))) static void round_avx2(const void *in, void *out, long nr)
{
    __asm__ volatile(ALL16(LOADY) SWITCH ALL16(SAVEY)
                     : : [in] "r"(in), [out] "r"(out), [nr] "r"(nr), [ts] "r"(&nap)
                     : CLOBBER_SYS, "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6",
                       "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14",
                       "xmm15");
}

static void round_sse(const void *in, void *out, long nr)
{
    __asm__ volatile(ALL16(LOADX) SWITCH ALL16(SAVEX)
                     : : [in] "r"(in), [out] "r"(out), [nr] "r"(nr), [ts] "r"(&nap)
                     : CLOBBER_SYS, "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6",
                       "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14",
                       "xmm15");
}

static void (*one_round)(const void *, void *, long);

static void fill(unsigned char *p, unsigned id, unsigned r)
{
    uint32_t x = id * 2654435761u ^ (r + 1) * 40503u;

    for (int i = 0; i < nreg * width; i++) {
        x ^= x << 13; x ^= x >> 17; x ^= x << 5;
        p[i] = (unsigned char)x;
    }
}

static void *worker(void *arg)
{
    unsigned id = (unsigned)(uintptr_t)arg;
    _Alignas(64) unsigned char in[NREG_MAX * WIDTH_MAX], out[NREG_MAX * WIDTH_MAX];
    long bad = 0;

    pthread_barrier_wait(&start);
    for (int r = 0; r < rounds; r++) {
        fill(in, id, (unsigned)r);
        memset(out, 0, sizeof out);
        one_round(in, out, r % 8 == 7 ? SYS_nanosleep : SYS_sched_yield);
        for (int reg = 0; reg < nreg; reg++) {
            if (memcmp(in + reg * width, out + reg * width, (size_t)width) != 0) {
                if (bad++ < 3)
                    printf("fpstate: MISMATCH task %u round %d register %d\n", id, r, reg);
            }
        }
    }
    return (void *)bad;
}

static long run_process(int p)
{
    pthread_t tid[64];
    long bad = 0;
    void *res;

    pthread_barrier_init(&start, NULL, (unsigned)threads);
    for (int t = 0; t < threads; t++)
        pthread_create(&tid[t], NULL, worker, (void *)(uintptr_t)(p * 64 + t + 1));
    for (int t = 0; t < threads; t++) {
        pthread_join(tid[t], &res);
        bad += (long)res;
    }
    return bad;
}

int main(int argc, char **argv)
{
    struct rusage ru;
    long bad = 0;
    int status;

    if (argc != 4 || (threads = atoi(argv[1])) < 1 || threads > 64
        || (processes = atoi(argv[2])) < 1 || (rounds = atoi(argv[3])) < 1) {
        fprintf(stderr, "usage: fpstate THREADS(1-64) PROCESSES ROUNDS\n");
        return 2;
    }
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) {
        kind = "avx512", nreg = 32, width = 64, one_round = round_avx512;
    } else if (__builtin_cpu_supports("avx2")) {
        kind = "avx2", nreg = 16, width = 32, one_round = round_avx2;
    } else {
        kind = "sse", nreg = 16, width = 16, one_round = round_sse;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (int p = 1; p < processes; p++) {
        if (fork() == 0)
            _exit(run_process(p) ? 1 : 0);
    }
    bad = run_process(0);
    while (wait(&status) > 0)
        bad += !WIFEXITED(status) || WEXITSTATUS(status) != 0;
    getrusage(RUSAGE_CHILDREN, &ru);
    long switches = ru.ru_nvcsw + ru.ru_nivcsw;
    getrusage(RUSAGE_SELF, &ru);
    switches += ru.ru_nvcsw + ru.ru_nivcsw;
    printf("fpstate: %s, %d registers of %d bytes, %d threads x %d processes x %d rounds, "
           "%ld context switches: %s\n", kind, nreg, width, threads, processes, rounds,
           switches, bad ? "MISMATCH" : "every register kept");
    return bad ? 1 : 0;
}
