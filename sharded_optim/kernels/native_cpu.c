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

enum { GSCALE, L2, DECAY, W1, B2, W2, STEP, DSCALE, EPS, LO, HI, B3, W3, CG };

/* variants: the state sets of adam_family.VARIANTS this kernel implements (no exp: diffGrad's friction stays
 * with the compiled kernel, whose vectorised exp is not the C library's) */
enum { ADAM_MV, ADAM_MVX, BOUND_MV, BOUND_MVX, BOUND_MVS, BOUND_MVXS, ADAMAX_MU };

#define CHUNK 16384   /* elements per work item: small enough to balance threads, large enough to stream */
#define ROW 4         /* table columns: state offset, length, gradient address, parameter address */
#define LANES 8       /* independent float64 accumulators of the sum of squares (a fixed order: deterministic) */

static inline float max_nan(float a, float b) {   /* torch.maximum: NaN if either is */
    float r = a > b ? a : b;
    r = (a != a) ? a : r;
    return (b != b) ? b : r;
}

static inline float min_nan(float a, float b) {   /* torch.minimum */
    float r = a < b ? a : b;
    r = (a != a) ? a : r;
    return (b != b) ? b : r;
}

typedef struct {
    float gscale, l2, decay, w1, b2, w2, step, dscale, eps, lo, hi, b3, w3, cg;
    float coeff;   /* lerp's coefficient: w1, or w1 - 1 computed as -(1 - w1) when |w1| >= 0.5 */
    int big;       /* |w1| >= 0.5: lerp starts from the end point */
} Scalars;

/* One segment [0, n) of the update: p, m, v, x (vmax or u), s are the flat buffers at the segment's offset. */
static inline void segment(int variant, const Scalars* ks, float* restrict p, const float* restrict g,
                           float* restrict m, float* restrict v, float* restrict x, float* restrict s, int64_t n) {
    const Scalars kc = *ks, *k = &kc;   /* a local copy: the loop keeps the scalars in registers */
    for (int64_t i = 0; i < n; ++i) {
        float pi = p[i], mi = m[i];
        float gi = g[i] * k->gscale + k->l2 * pi;          /* transformed gradient (p before decay) */
        float pd = pi - k->decay * pi;                      /* decoupled decay */
        float base = k->big ? gi : mi;
        float mn = base + k->coeff * (gi - mi);             /* m.lerp_(g, w1) */
        m[i] = mn;
        if (variant == ADAMAX_MU) {
            float u = max_nan(x[i] * k->b2, fabsf(gi) + k->eps);
            x[i] = u;
            p[i] = pd - k->step * (mn / u);
            continue;
        }
        float vn = v[i] * k->b2 + (k->w2 * gi) * gi;        /* addcmul's rounding order */
        v[i] = vn;
        float vh = vn;
        if (variant == ADAM_MVX || variant == BOUND_MVX || variant == BOUND_MVXS) {
            vh = max_nan(x[i], vn);
            x[i] = vh;
        }
        float d = sqrtf(vh) * k->dscale + k->eps;
        if (variant == ADAM_MV || variant == ADAM_MVX) {
            p[i] = pd - (k->step * (mn / d) + k->cg * (gi / d));
            continue;
        }
        float eta = k->step / d;
        if (variant == BOUND_MVS || variant == BOUND_MVXS) {
            float sn = s[i] * k->b3 + k->w3 * eta;
            s[i] = sn;
            eta = min_nan(eta, sn);
        }
        eta = min_nan(max_nan(eta, k->lo), k->hi);          /* torch.clamp(eta, lo, hi) */
        p[i] = pd - eta * mn;
    }
}

/* One instantiation per variant, so the variant tests fold away and each loop vectorises on its own. */
#define SEGMENT_OF(V) static void seg_##V(const Scalars* k, float* restrict p, const float* restrict g, \
    float* restrict m, float* restrict v, float* restrict x, float* restrict s, int64_t n) \
    { segment(V, k, p, g, m, v, x, s, n); }
SEGMENT_OF(ADAM_MV) SEGMENT_OF(ADAM_MVX) SEGMENT_OF(BOUND_MV) SEGMENT_OF(BOUND_MVX) SEGMENT_OF(BOUND_MVS)
SEGMENT_OF(BOUND_MVXS) SEGMENT_OF(ADAMAX_MU)

typedef void (*SegmentFn)(const Scalars*, float*, const float*, float*, float*, float*, float*, int64_t);
static const SegmentFn SEGMENTS[] = {seg_ADAM_MV, seg_ADAM_MVX, seg_BOUND_MV, seg_BOUND_MVX, seg_BOUND_MVS,
                                     seg_BOUND_MVXS, seg_ADAMAX_MU};

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

/* table: nseg rows of (offset into the flat state, length, address of the float32 gradient, address of the float32
 * parameter values: a region of a flat buffer, or a tensor of their own).  x and s may be NULL when the variant has
 * no such state.  Returns 0, or -1 for an unknown variant or no memory. */
int sharded_optim_update(int variant, int64_t nseg, const int64_t* table, float* m, float* v, float* x, float* s,
                         const float* sc, int nthreads) {
    if (variant < ADAM_MV || variant > ADAMAX_MU) return -1;
    Scalars k = {sc[GSCALE], sc[L2], sc[DECAY], sc[W1], sc[B2], sc[W2], sc[STEP], sc[DSCALE], sc[EPS], sc[LO],
                 sc[HI], sc[B3], sc[W3], sc[CG], 0.0f, 0};
    k.big = fabsf(k.w1) >= 0.5f;
    k.coeff = k.big ? -(1.0f - k.w1) : k.w1;
    int64_t* first = item_starts(nseg, table);
    if (!first) return -1;
    const SegmentFn fn = SEGMENTS[variant];
    const int64_t items = first[nseg];
    #pragma omp parallel for schedule(static) num_threads(nthreads) if(items > 1)
    for (int64_t it = 0; it < items; ++it) {
        const int64_t i = segment_of(first, nseg, it);
        const int64_t* row = table + ROW * i;
        const int64_t lo = (it - first[i]) * CHUNK, n = row[1] - lo < CHUNK ? row[1] - lo : CHUNK;
        const int64_t at = row[0] + lo;
        const float* g = (const float*)(intptr_t)row[2] + lo;
        float* p = (float*)(intptr_t)row[3] + lo;
        fn(&k, p, g, m + at, v ? v + at : NULL, x ? x + at : NULL, s ? s + at : NULL, n);
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
