/* Throughput of the AVX-512 instructions the fused 4-bit kernels are built from, in core
 * cycles per instruction (10 independent chains, so latency does not count), on this CPU.
 * It tells which decode a kernel should use here and how close a kernel is to its port bound
 * (ARCHITECTURE.md, "Where the M = 1 kernel stands"). Not part of the build or the tests:
 *
 *     gcc -O2 -march=native benches/probe_simd_throughput.c -o /tmp/probe && /tmp/probe
 *
 * (needs AVX-512 BW / VBMI / VNNI / BF16). The clock is measured first from a chain of
 * dependent 64-bit `imul` (3 cycles each on Intel and AMD cores); a shared VM moves it. */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

static double now(void) {
    struct timespec a;
    clock_gettime(CLOCK_MONOTONIC, &a);
    return a.tv_sec + a.tv_nsec * 1e-9;
}

#define N 50000000L
#define ALL(OP) OP(v0) OP(v1) OP(v2) OP(v3) OP(v4) OP(v5) OP(v6) OP(v7) OP(v8) OP(v9)
#define KEEP __asm__ volatile("" ::"v"(v0), "v"(v1), "v"(v2), "v"(v3), "v"(v4), "v"(v5), "v"(v6), "v"(v7), "v"(v8), "v"(v9))
#define RUN(name, OP)                                                                    \
    do {                                                                                 \
        double a = now();                                                                \
        for (long i = 0; i < N; i++) { ALL(OP) KEEP; }                                   \
        printf("%-10s %.2f cycles\n", name, (now() - a) * ghz * 1e9 / N / 10);           \
    } while (0)

static long sink = 3;

static double clock_ghz(void) {
    long reps = 300000000L;
    double a = now();
    __asm__ volatile("mov %1, %%rcx\n1:\n imul %0, %0\n dec %%rcx\n jnz 1b\n" : "+r"(sink) : "r"(reps) : "rcx");
    return 3.0 * reps / (now() - a) / 1e9;
}

int main(void) {
    double ghz = clock_ghz();
    printf("clock      %.2f GHz\n", ghz);

    __m512i t = _mm512_set1_epi32(0x01020304);
    __m512 tf = _mm512_set1_ps(1.0f);
    __m512i v0 = t, v1 = t, v2 = t, v3 = t, v4 = t, v5 = t, v6 = t, v7 = t, v8 = t, v9 = t;
#define PERMPS(x) x = _mm512_castps_si512(_mm512_permutexvar_ps(x, tf));
#define PERMW(x) x = _mm512_permutexvar_epi16(x, t);
#define PERMB(x) x = _mm512_permutexvar_epi8(x, t);
#define PSHUFB(x) x = _mm512_shuffle_epi8(t, x);
#define ZXBD(x) x = _mm512_cvtepu8_epi32(_mm512_castsi512_si128(x));
#define ZXBW(x) x = _mm512_cvtepu8_epi16(_mm512_castsi512_si256(x));
#define SRLD(x) x = _mm512_srli_epi32(x, 4);
#define FMA(x) x = _mm512_castps_si512(_mm512_fmadd_ps(_mm512_castsi512_ps(x), tf, tf));
#define DPBF16(x) x = _mm512_castps_si512(_mm512_dpbf16_ps(_mm512_castsi512_ps(x), (__m512bh)t, (__m512bh)t));
#define DPBUSD(x) x = _mm512_dpbusd_epi32(x, t, t);
    RUN("vpermps", PERMPS);
    RUN("vpermw", PERMW);
    RUN("vpermb", PERMB);
    RUN("vpshufb", PSHUFB);
    RUN("vpmovzxbd", ZXBD);
    RUN("vpmovzxbw", ZXBW);
    RUN("vpsrld", SRLD);
    RUN("vfmadd", FMA);
    RUN("vdpbf16ps", DPBF16);
    RUN("vpdpbusd", DPBUSD);
    /* A second reading: when it differs much from the first, the host moved the clock. */
    printf("clock      %.2f GHz (after)\n", clock_ghz());
    return 0;
}
