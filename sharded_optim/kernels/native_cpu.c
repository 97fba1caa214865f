/* The CPU multi-tensor update: the fused Adam-family step over a table of gradient segments, read in place.
 *
 * Why: on one rank the parameters and the state are flat, but autograd hands every parameter a fresh gradient of
 * its own.  The compiled (Inductor) kernel needs one flat gradient, so each step copied every gradient first, or
 * paid one kernel call per parameter.  This kernel reads each gradient where autograd left it through a pointer
 * table (torch's multi-tensor-apply idea), in one call per run.
 *
 * Bitwise contract: every element is computed with the same IEEE operations, in the same order, as the compiled
 * kernels of adam_family.py (Inductor's generated code: its lerp is base + coeff*(end - start), its maximum and
 * minimum propagate NaN).  Built with -ffp-contract=off as Inductor is, so nothing is fused into an FMA; the
 * vectorised and scalar forms of these operations round identically.  tests/test_native_cpu.py checks the
 * contract against the compiled kernels, bit for bit.
 *
 * Scalars: sc[] is laid out as sharded_optim.rules (GSCALE ... CG); test_native_cpu checks the indices.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "native_common.h"

#define STATS_BLOCK 256    /* elements per statistics block: float32 partial sums, |eta| patterns kept in L1 */
#define STATS_LANES 16     /* float32 partial sums per block (each adds STATS_BLOCK / STATS_LANES terms) */
#define CHUNK 16384   /* elements per work item: small enough to balance threads, large enough to stream */
#define ROW 4         /* table columns: state offset, length, gradient address, parameter address */
#define LANES 32      /* independent float64 accumulators of the sum of squares (a fixed order: deterministic) */

/* One segment [0, n) of the update. */
static inline __attribute__((always_inline))
void segment(int variant, const Scalars* ks, float* restrict p, const float* restrict g,
                           float* restrict m, float* restrict v, float* restrict x, float* restrict s, int64_t n) {
    const Scalars kc = *ks;   /* a local copy: the loop keeps the scalars in registers */
    for (int64_t i = 0; i < n; ++i) {
        Element e;
        element(variant, &kc, p, g, m, v, x, s, i, 0, &e);
    }
}

/* The statistics sums, in the order of kernels/stats.py PRE_FIELDS then POST_FIELDS (without diffGrad's friction):
 * elementwise work in float32 as there.  Element b0 + i of a block adds its terms to lane i % STATS_LANES: each
 * lane sums its k = STATS_BLOCK / STATS_LANES terms of the block in float32, in element order, the products with
 * explicit fmaf (one instruction and one rounding per term: the update's own arithmetic stays unfused, as
 * -ffp-contract=off keeps it; these sums are ours), then into a float64 lane; the lanes are added in lane order at
 * the end of the segment.  Error <= gamma_k * sum|x| (gamma_k = k u / (1 - k u), u = 2^-24) against the exact sum
 * of the unrounded terms, and one u * sum|x| more against the rounded terms the separate passes of stats.py add.
 * The order is the source's, so the sums do not depend on the vector width the compiler picks; counts are exact.
 * Why lanes: with one float32 sum per block and `omp simd reduction`, the compiler may not reassociate, so every
 * block ended in 16 in-order scalar adds per sum (a third of the statistics pass).  With every term converted to
 * float64 instead, the statistics pass took 1.5x the plain update's time. */
enum { NUMEL, GRAD_SUMSQ, NONFINITE_GRAD, ZERO_GRAD, MOM_GRAD_DOT, MOM_SUMSQ, PARAM_SUMSQ, UPDATE_SUMSQ,
       EPS_DOMINATED, AMSGRAD_MAX_ACTIVE, ADAMOD_CLIPPED, ADABOUND_CLAMPED, EFF_LR_SUM, EFF_LR_LE_0,
       NUM_EDGES = 12, NUM_SUMS = EFF_LR_LE_0 + NUM_EDGES };
enum { FSUMS = 6 };   /* the float sums: gradient^2, m*g, m^2, p^2, update^2, step size */
enum { ICOUNTS = 6 }; /* the counts: non-finite, zero, eps-dominated, AMSGrad max active, AdaMod clipped, clamped */

typedef struct {
    float f[FSUMS][STATS_LANES];       /* this block's float32 lane sums */
    int32_t c[ICOUNTS][STATS_LANES];   /* the segment's counts */
    int32_t lo[STATS_LANES], hi[STATS_LANES];   /* this block's least and greatest |eta| pattern */
} Lanes;

/* The update of element i with its statistics terms added to lane l. */
static inline __attribute__((always_inline))
void stats_term(int variant, const Scalars* kc, float* restrict p, const float* restrict g, float* restrict m,
                float* restrict v, float* restrict x, float* restrict s, int64_t i, int l, Lanes* restrict a,
                int32_t* restrict mag) {
    float gg = g[i], mp = m[i];
    int ok = isfinite(gg);
    float gf = ok ? gg : 0.0f;
    a->f[0][l] = fmaf(gg, gg, a->f[0][l]);
    a->c[0][l] += !ok;
    a->c[1][l] += fabsf(gg) <= 0.0f;
    a->f[1][l] = fmaf(mp, gf, a->f[1][l]);
    a->f[2][l] = fmaf(mp, mp, a->f[2][l]);
    Element e;
    element(variant, kc, p, g, m, v, x, s, i, 1, &e);
    a->f[3][l] = fmaf(e.p, e.p, a->f[3][l]);
    float delta = e.eta * e.m;
    a->f[4][l] = fmaf(delta, delta, a->f[4][l]);
    a->f[5][l] += e.eta;
    if (variant == ADAMAX_MU) a->c[2][l] += fabsf(e.root) <= 2 * kc->eps;
    else a->c[2][l] += fabsf(e.root) < kc->eps;
    if (variant == ADAM_MVX || variant == BOUND_MVX || variant == BOUND_MVXS) a->c[3][l] += e.vmax_before > e.v;
    if (variant == BOUND_MVS || variant == BOUND_MVXS) a->c[4][l] += e.clipped;
    if (variant == BOUND_MV || variant == BOUND_MVX) a->c[5][l] += e.clamped;
    union { float f; int32_t i; } bits = {fabsf(e.eta)};
    mag[i] = bits.i;
    a->lo[l] = bits.i < a->lo[l] ? bits.i : a->lo[l];
    a->hi[l] = bits.i > a->hi[l] ? bits.i : a->hi[l];
}

/* One segment of the update with the statistics of a statistics step in the same pass: before the update, the
 * gradient (with the sign ``gsign`` = +-1 the update applies: only sum(m * g) depends on it, and it is negated
 * exactly at the end) and the previous first moment; after, the new state and the step sizes.  Non-finite gradient
 * elements are counted and left out of the momentum sums. */
static inline __attribute__((always_inline))
void segment_stats(int variant, const Scalars* ks, float* restrict p, const float* restrict g,
                                 float* restrict m, float* restrict v, float* restrict x, float* restrict s,
                                 int64_t n, float gsign, const float* edges, double* out) {
    const Scalars kc = *ks;
    double sums[FSUMS][STATS_LANES] = {{0}};
    int32_t le[NUM_EDGES] = {0};
    int32_t eb[NUM_EDGES];
    for (int j = 0; j < NUM_EDGES; ++j) { union { float f; int32_t i; } u = {edges[j]}; eb[j] = u.i; }
    Lanes a;
    memset(a.c, 0, sizeof a.c);
    int32_t mag[STATS_BLOCK];   /* |eta| of one block: the histogram's compares run in a loop of their own */
    for (int64_t b0 = 0; b0 < n; b0 += STATS_BLOCK) {
        const int64_t nb = n - b0 < STATS_BLOCK ? n - b0 : STATS_BLOCK, full = nb - nb % STATS_LANES;
        float* restrict pb = p + b0; float* restrict mb = m + b0; const float* restrict gb = g + b0;
        float* restrict vb = v ? v + b0 : NULL; float* restrict xb = x ? x + b0 : NULL;
        float* restrict sb = s ? s + b0 : NULL;
        memset(a.f, 0, sizeof a.f);
        for (int l = 0; l < STATS_LANES; ++l) { a.lo[l] = INT32_MAX; a.hi[l] = INT32_MIN; }
        for (int64_t i0 = 0; i0 < full; i0 += STATS_LANES) {
            #pragma omp simd
            for (int l = 0; l < STATS_LANES; ++l)
                stats_term(variant, &kc, pb, gb, mb, vb, xb, sb, i0 + l, l, &a, mag);
        }
        for (int64_t i = full; i < nb; ++i)
            stats_term(variant, &kc, pb, gb, mb, vb, xb, sb, i, (int)(i - full), &a, mag);
        int32_t lo = INT32_MAX, hi = INT32_MIN;
        for (int l = 0; l < STATS_LANES; ++l) {
            for (int f = 0; f < FSUMS; ++f) sums[f][l] += a.f[f][l];
            lo = a.lo[l] < lo ? a.lo[l] : lo;
            hi = a.hi[l] > hi ? a.hi[l] : hi;
        }
        /* Cumulative counts |eta| <= edge, compared as int32 bit patterns (monotone for non-negative floats; a NaN's
         * pattern is above every edge, so it is never counted).  An edge below the block's least pattern counts
         * nothing, one at or above its greatest counts the whole block; only the edges in between (typically two or
         * three decades) are compared element by element. */
        for (int j = 0; j < NUM_EDGES; ++j) {
            const int32_t ej = eb[j];
            if (ej < lo) continue;
            if (ej >= hi) { le[j] += (int32_t)nb; continue; }
            int32_t c = 0;
            #pragma omp simd reduction(+: c)
            for (int64_t i = 0; i < nb; ++i) c += mag[i] <= ej;
            le[j] += c;
        }
    }
    static const int FIELD[FSUMS] = {GRAD_SUMSQ, MOM_GRAD_DOT, MOM_SUMSQ, PARAM_SUMSQ, UPDATE_SUMSQ, EFF_LR_SUM};
    static const int COUNT[ICOUNTS] = {NONFINITE_GRAD, ZERO_GRAD, EPS_DOMINATED, AMSGRAD_MAX_ACTIVE, ADAMOD_CLIPPED,
                                       ADABOUND_CLAMPED};
    out[NUMEL] = (double)n;
    for (int f = 0; f < FSUMS; ++f) {
        double t = 0.0;
        for (int l = 0; l < STATS_LANES; ++l) t += sums[f][l];
        out[FIELD[f]] = FIELD[f] == MOM_GRAD_DOT ? gsign * t : t;
    }
    for (int f = 0; f < ICOUNTS; ++f) {
        int32_t t = 0;
        for (int l = 0; l < STATS_LANES; ++l) t += a.c[f][l];
        out[COUNT[f]] = t;
    }
    for (int j = 0; j < NUM_EDGES; ++j) out[EFF_LR_LE_0 + j] = le[j];
}

/* One instantiation per variant, so the variant tests fold away and each loop vectorises on its own. */
#define SEGMENT_OF(V) \
    static void seg_##V(const Scalars* k, float* restrict p, const float* restrict g, float* restrict m, \
                        float* restrict v, float* restrict x, float* restrict s, int64_t n) \
    { segment(V, k, p, g, m, v, x, s, n); } \
    static void stats_##V(const Scalars* k, float* restrict p, const float* restrict g, float* restrict m, \
                          float* restrict v, float* restrict x, float* restrict s, int64_t n, float gsign, \
                          const float* edges, double* out) \
    { segment_stats(V, k, p, g, m, v, x, s, n, gsign, edges, out); }
SEGMENT_OF(ADAM_MV) SEGMENT_OF(ADAM_MVX) SEGMENT_OF(BOUND_MV) SEGMENT_OF(BOUND_MVX) SEGMENT_OF(BOUND_MVS)
SEGMENT_OF(BOUND_MVXS) SEGMENT_OF(ADAMAX_MU)

typedef void (*SegmentFn)(const Scalars*, float*, const float*, float*, float*, float*, float*, int64_t);
static const SegmentFn SEGMENTS[] = {seg_ADAM_MV, seg_ADAM_MVX, seg_BOUND_MV, seg_BOUND_MVX, seg_BOUND_MVS,
                                     seg_BOUND_MVXS, seg_ADAMAX_MU};
typedef void (*StatsFn)(const Scalars*, float*, const float*, float*, float*, float*, float*, int64_t, float,
                        const float*, double*);
static const StatsFn STATS[] = {stats_ADAM_MV, stats_ADAM_MVX, stats_BOUND_MV, stats_BOUND_MVX, stats_BOUND_MVS,
                                stats_BOUND_MVXS, stats_ADAMAX_MU};

/* Work items: segment i is cut into ceil(len/CHUNK) items; first[i] is the index of its first item. */
static int64_t* item_starts(int64_t nseg, const int64_t* table) {
    int64_t* first = malloc(sizeof(int64_t) * (nseg + 1));
    if (!first) return NULL;
    first[0] = 0;
    for (int64_t i = 0; i < nseg; ++i) first[i + 1] = first[i] + (table[ROW * i + 1] + CHUNK - 1) / CHUNK;
    return first;
}

static int64_t segment_of(const int64_t* first, int64_t nseg, int64_t item) {   /* binary search */
    int64_t lo = 0, hi = nseg - 1;
    while (lo < hi) {
        int64_t mid = (lo + hi + 1) / 2;
        if (first[mid] <= item) lo = mid; else hi = mid - 1;
    }
    return lo;
}

/* table: nseg rows of (offset, length, address of the float32 gradient, address of the float32 parameter values: a
 * region of a flat buffer, or a tensor of their own); a row's state starts at offset - base of the state buffers
 * (a run's rows are a slice of its step's table, not a rewritten copy), which hold nstate elements.  x and s may be
 * NULL when the variant has no such state.  With ``out`` (NUM_SUMS doubles), a statistics step: the sums of
 * segment_stats over every segment, per work item, added in item order (independent of the thread count).
 * Returns 0; -1 for an unknown variant or no memory; -2 when a row's state lies outside [0, nstate). */
int sharded_optim_update(int variant, int64_t nseg, const int64_t* table, int64_t base, int64_t nstate, float* m,
                         float* v, float* x, float* s, const float* sc, int nthreads, float gsign,
                         const float* edges, double* out) {
    if (variant < ADAM_MV || variant > ADAMAX_MU) return -1;
    for (int64_t i = 0; i < nseg; ++i) {
        const int64_t at = table[ROW * i] - base, n = table[ROW * i + 1];
        if (at < 0 || n < 0 || at > nstate - n) return -2;
    }
    const Scalars k = scalars_of(sc);
    int64_t* first = item_starts(nseg, table);
    if (!first) return -1;
    const int64_t items = first[nseg];
    double* partial = NULL;
    if (out) {
        partial = calloc((size_t)(items ? items : 1) * NUM_SUMS, sizeof(double));
        if (!partial) { free(first); return -1; }
    }
    const SegmentFn fn = SEGMENTS[variant];
    const StatsFn stats_fn = STATS[variant];
    #pragma omp parallel for schedule(static) num_threads(nthreads) if(items > 1)
    for (int64_t it = 0; it < items; ++it) {
        const int64_t i = segment_of(first, nseg, it);
        const int64_t* row = table + ROW * i;
        const int64_t lo = (it - first[i]) * CHUNK, n = row[1] - lo < CHUNK ? row[1] - lo : CHUNK;
        const int64_t at = row[0] - base + lo;
        const float* g = (const float*)(intptr_t)row[2] + lo;
        float* p = (float*)(intptr_t)row[3] + lo;
        float *mi = m + at, *vi = v ? v + at : NULL, *xi = x ? x + at : NULL, *si = s ? s + at : NULL;
        if (partial) stats_fn(&k, p, g, mi, vi, xi, si, n, gsign, edges, partial + it * NUM_SUMS);
        else fn(&k, p, g, mi, vi, xi, si, n);
    }
    if (out) {
        for (int j = 0; j < NUM_SUMS; ++j) out[j] = 0.0;
        for (int64_t it = 0; it < items; ++it)
            for (int j = 0; j < NUM_SUMS; ++j) out[j] += partial[it * NUM_SUMS + j];
        free(partial);
    }
    free(first);
    return 0;
}

/* Sum of squares of every segment's float32 gradient (the update's table), in float64: LANES accumulators per work
 * item, the items' partials added in item order, so the result depends on the segments only, never on the thread
 * count. */
int sharded_optim_sumsq(int64_t nseg, const int64_t* table, double* out, int nthreads) {
    int64_t* first = item_starts(nseg, table);
    if (!first) return -1;
    const int64_t items = first[nseg];
    double* partial = malloc(sizeof(double) * (items ? items : 1));
    if (!partial) { free(first); return -1; }
    #pragma omp parallel for schedule(static) num_threads(nthreads) if(items > 1)
    for (int64_t it = 0; it < items; ++it) {
        const int64_t i = segment_of(first, nseg, it);
        const int64_t* row = table + ROW * i;
        const int64_t lo = (it - first[i]) * CHUNK, n = row[1] - lo < CHUNK ? row[1] - lo : CHUNK;
        const float* g = (const float*)(intptr_t)row[2] + lo;
        double acc[LANES] = {0};
        int64_t j = 0;
        for (; j + LANES <= n; j += LANES)
            for (int l = 0; l < LANES; ++l) acc[l] += (double)g[j + l] * (double)g[j + l];
        for (; j < n; ++j) acc[0] += (double)g[j] * (double)g[j];
        double t = 0.0;
        for (int l = 0; l < LANES; ++l) t += acc[l];
        partial[it] = t;
    }
    double total = 0.0;
    for (int64_t it = 0; it < items; ++it) total += partial[it];
    *out = total;
    free(partial);
    free(first);
    return 0;
}
