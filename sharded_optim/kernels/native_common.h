/* What the CPU kernels share (native_cpu.c: fp32 state; native_int8.c, native_bf16.c: 8-bit and bf16 state): the
 * scalars, the update of one element with the same IEEE operations, in the same order, as the compiled kernels of
 * adam_family.py (Inductor's generated code: its lerp is base + coeff*(end - start), its maximum and minimum
 * propagate NaN), and the rounding hash of the low-precision states.  Built with -ffp-contract=off as Inductor is,
 * so nothing is fused into an FMA.
 */
#ifndef SHARDED_OPTIM_NATIVE_COMMON_H
#define SHARDED_OPTIM_NATIVE_COMMON_H
#include <math.h>
#include <stdint.h>
#include <string.h>

enum { GSCALE, L2, DECAY, W1, B2, W2, STEP, DSCALE, EPS, LO, HI, B3, W3, CG };

/* variants: the state sets of adam_family.VARIANTS this kernel implements (no exp: diffGrad's friction stays
 * with the compiled kernel, whose vectorised exp is not the C library's) */
enum { ADAM_MV, ADAM_MVX, BOUND_MV, BOUND_MVX, BOUND_MVS, BOUND_MVXS, ADAMAX_MU };

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

/* What one element's update leaves behind, for the statistics: the new values and the step size's pieces. */
typedef struct {
    float p, m, v;       /* new parameter, first moment, second moment (u for AdaMax) */
    float vmax_before;   /* AMSGrad: the running max before this step */
    float root;          /* sqrt(vh) * dscale (AdaMax: u) */
    float eta;           /* the statistics' step size: step / (root + eps) (AdaMax step / u), bounded as the update */
    int clipped, clamped;   /* AdaMod: s capped eta; AdaBound: the clamp changed eta */
} Element;

/* The update of element i (p, m, v, x (vmax or u), s: the segment's buffers); with want_stats, also what the
 * statistics read (kernels/stats.py _post recomputes it from the stored state; here it is at hand). */
static inline __attribute__((always_inline))
void element(int variant, const Scalars* k, float* restrict p, const float* restrict g,
                           float* restrict m, float* restrict v, float* restrict x, float* restrict s, int64_t i,
                           int want_stats, Element* e) {
    float pi = p[i], mi = m[i];
    float gi = g[i] * k->gscale + k->l2 * pi;          /* transformed gradient (p before decay) */
    float pd = pi - k->decay * pi;                      /* decoupled decay */
    float base = k->big ? gi : mi;
    float mn = base + k->coeff * (gi - mi);             /* m.lerp_(g, w1) */
    m[i] = mn;
    e->m = mn;
    if (variant == ADAMAX_MU) {
        float u = max_nan(x[i] * k->b2, fabsf(gi) + k->eps);
        x[i] = u;
        p[i] = e->p = pd - k->step * (mn / u);
        if (want_stats) { e->v = e->root = u; e->eta = k->step / u; }
        return;
    }
    float vn = v[i] * k->b2 + (k->w2 * gi) * gi;        /* addcmul's rounding order */
    v[i] = vn;
    float vh = vn;
    if (variant == ADAM_MVX || variant == BOUND_MVX || variant == BOUND_MVXS) {
        e->vmax_before = x[i];
        vh = max_nan(x[i], vn);
        x[i] = vh;
    }
    e->v = vn;
    float root = sqrtf(vh) * k->dscale;
    float d = root + k->eps;
    e->root = root;
    if (variant == ADAM_MV || variant == ADAM_MVX) {
        p[i] = e->p = pd - (k->step * (mn / d) + k->cg * (gi / d));
        if (want_stats) e->eta = k->step / d;
        return;
    }
    float eta = k->step / d;
    e->clipped = e->clamped = 0;
    if (variant == BOUND_MVS || variant == BOUND_MVXS) {
        float sn = s[i] * k->b3 + k->w3 * eta;
        s[i] = sn;
        e->clipped = sn < eta;
        eta = min_nan(eta, sn);
    } else {
        e->clamped = (eta < k->lo) | (eta > k->hi);
    }
    eta = min_nan(max_nan(eta, k->lo), k->hi);          /* torch.clamp(eta, lo, hi) */
    e->eta = eta;
    p[i] = e->p = pd - eta * mn;
}

/* The kernel's scalars from sc[] (laid out as sharded_optim.rules; test_native_cpu checks the indices). */
static inline Scalars scalars_of(const float* sc) {
    Scalars k = {sc[GSCALE], sc[L2], sc[DECAY], sc[W1], sc[B2], sc[W2], sc[STEP], sc[DSCALE], sc[EPS], sc[LO],
                 sc[HI], sc[B3], sc[W3], sc[CG], 0.0f, 0};
    k.big = fabsf(k.w1) >= 0.5f;
    k.coeff = k.big ? -(1.0f - k.w1) : k.w1;
    return k;
}

/* The low-precision kernels' (native_int8.c, native_bf16.c) pieces. */
#define MAX_STATE 4

/* the states of each variant in kernel argument order, as slots of element(): m 0, v 1, x 2, s 3; -1 ends */
static const int SLOT[][MAX_STATE] = {
    [ADAM_MV] = {0, 1, -1, -1}, [ADAM_MVX] = {0, 1, 2, -1}, [BOUND_MV] = {0, 1, -1, -1},
    [BOUND_MVX] = {0, 1, 2, -1}, [BOUND_MVS] = {0, 1, 3, -1}, [BOUND_MVXS] = {0, 1, 2, 3}, [ADAMAX_MU] = {0, 2, -1, -1},
};

/* whether ``variant`` keeps a state in ``slot`` (constant-folded in each instantiation) */
static inline int uses(int variant, int slot) {
    for (int j = 0; j < MAX_STATE; ++j) if (SLOT[variant][j] == slot) return 1;
    return 0;
}

static inline uint32_t bits_of(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float float_of(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t max_u32(uint32_t a, uint32_t b) { return a > b ? a : b; }

/* low_precision.random_bits on 16-bit halves: ``a``, ``b`` the value's low and high half, ``c`` the salt's low half,
 * ``d`` its high half xor the position's mix.  Every step there is taken mod 2**16 (a 16-bit value times a
 * multiplier below 2**15, plus a 16-bit value, then masked), so 16-bit arithmetic gives the same bits and the
 * vectoriser packs twice the lanes. */
static inline uint16_t hash16(uint16_t a, uint16_t b, uint16_t c, uint16_t d) {
    uint16_t h = (uint16_t)(a * 0x6B43 + c);
    h ^= h >> 8;
    h = (uint16_t)((h ^ b) * 0x4E6D + d);
    h ^= h >> 7;
    h = (uint16_t)((h ^ c) * 0x5A35 + a);
    h ^= h >> 9;
    h = (uint16_t)((h ^ d) * 0x7A4B + b);
    h ^= h >> 8;
    h = (uint16_t)(h * 0x6B43);
    return (uint16_t)(h ^ (h >> 7));
}

/* the position's mix of low_precision.random_bits, xored into the salt's high half */
static inline uint16_t position_mix(uint32_t position) { return (uint16_t)(position * 0x3C6F); }

/* low_precision.rounding_salt's step part: the salt of element i is bits(g[i]) ^ step_salt(step) */
static inline uint32_t step_salt(int64_t step) { return (uint32_t)(step & 0xFFFF) * 0x2545u; }
#endif
