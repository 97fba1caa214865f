/* Where the CPU 8-bit update's time goes (docs/BENCHMARKS.md, issue 19): the whole kernel, and its update and encode
 * phases apart, per element on one core, over 1M elements of AdamW (adam_mv: exp_avg int8, exp_avg_sq uint8).
 *
 *   cc -O3 -march=native -ffp-contract=off -fno-math-errno -fopenmp -std=c11 -I sharded_optim/kernels \
 *      bench/int8_phases.c -o /tmp/int8_phases -lm && /tmp/int8_phases
 *
 * The flags are the library's (sharded_optim/kernels/native_cpu.py FLAGS).  Prints three lines (the first warms up).
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "native_int8.c"

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(void) {
    const int64_t n = 1 << 20, nb = n / BLOCK, reps = 10;
    float *p = malloc(n * 4), *g = malloc(n * 4), *sm = malloc(nb * 4), *sv = malloc(nb * 4);
    int8_t* m = calloc(n, 1);
    uint8_t* v = calloc(n, 1);
    for (int64_t i = 0; i < n; ++i) { p[i] = rand() / (float)RAND_MAX; g[i] = rand() / (float)RAND_MAX - 0.5f; }
    for (int64_t b = 0; b < nb; ++b) sm[b] = sv[b] = 1.0f;
    /* GSCALE L2 DECAY W1 B2 W2 STEP DSCALE EPS LO HI B3 W3 CG */
    const float sc[] = {1, 0, 0, 0.1f, 0.999f, 0.001f, 1e-3f, 1, 1e-8f, 0, 10, 0.99f, 0.01f, 0};
    void* codes[] = {m, v};
    float* scales[] = {sm, sv};
    const Scalars k = scalars_of(sc);
    static float wide[MAX_STATE][BLOCK];
    for (int round = 0; round < 3; ++round) {
        const double t0 = now();
        for (int r = 0; r < reps; ++r) sharded_optim_update_int8(ADAM_MV, nb, p, g, codes, scales, sc, r, 1);
        const double t1 = now();
        for (int r = 0; r < reps; ++r)
            for (int64_t b = 0; b < nb; ++b)
                for (int i = 0; i < BLOCK; ++i) {
                    Element e;
                    element(ADAM_MV, &k, p + b * BLOCK, g + b * BLOCK, wide[0], wide[1], wide[2], wide[3], i, 0, &e);
                }
        const double t2 = now();
        static uint16_t cs[BLOCK], ds[BLOCK];   /* the salt's halves, as the kernel takes them once per block */
        for (int i = 0; i < BLOCK; ++i) { cs[i] = (uint16_t)(i * 40503u); ds[i] = (uint16_t)(i * 9973u); }
        for (int r = 0; r < reps; ++r)
            for (int64_t b = 0; b < nb; ++b) {
                encode_signed_above(wide[0], cs, ds, position_mix(0), grid_of(ONE_BITS, 1), m + b * BLOCK);
                encode_unsigned(wide[1], cs, ds, position_mix(1), grid_of(ONE_BITS, 0), v + b * BLOCK);
            }
        const double t3 = now();
        const double per = 1e9 / (double)(reps * n);
        printf("ns per element: whole kernel %.3f, update %.3f, encode (2 states) %.3f\n", (t1 - t0) * per,
               (t2 - t1) * per, (t3 - t2) * per);
    }
    return 0;
}
