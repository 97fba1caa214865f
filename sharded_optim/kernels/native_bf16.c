/* The CPU update with bfloat16 state (kernels/low_precision.py has the rounding and why): per tile of 256 elements,
 * widen every state to float32 (exact), run the fp32 update of one element (native_common.h), then store every state
 * back in bfloat16: stochastically rounded (the moving averages m, v, s, u) or to nearest (AMSGrad's running max x).
 *
 * Why by hand: the compiled kernel ran at 0.27-0.47x the fp32 kernel's speed on 2 cores, compute-bound on the
 * rounding hash; here the hash and the rounding run in 16-bit lanes and each tile's state stays in L1.
 *
 * Bitwise contract: widening is a shift; stochastic rounding is low_precision.round_stochastic (16 random bits added
 * under the bfloat16 mantissa of a finite value's pattern, then truncated; a non-finite value is stored as it is),
 * nearest is torch's float-to-bfloat16 conversion (round half to even).  tests/test_native_bf16.py checks every bit
 * against the compiled kernel, except the pattern stored for a NaN (which NaN a conversion returns is each
 * implementation's choice).
 */
#include <stdint.h>

#include "native_common.h"

#define TILE 256           /* elements per tile: 4 states x 1 KiB of float32 in L1 */
#define ITEM_TILES 64      /* tiles per work item (16384 elements, as native_cpu.c's CHUNK) */

/* All in 16-bit lanes, on the value's halves lo, hi: adding 16 bits to the 32-bit pattern and keeping the upper half
 * is hi plus the carry out of lo, and the carry of lo + r is (lo + r) mod 2**16 < r. */
static inline int finite_half(uint16_t hi) { return (hi & 0x7F80) != 0x7F80; }

/* a non-finite value in bfloat16: an infinity's upper half; a NaN's with the quiet bit set, so that a payload in the
 * lower half alone cannot turn into an infinity */
static inline uint16_t nonfinite_half(uint16_t hi, uint16_t lo) {
    return (uint16_t)(hi | (((hi & 0x7F) | lo) ? 0x40 : 0));
}

/* low_precision.round_stochastic to bfloat16 bits: a finite pattern plus 16 random bits (hashed from the pattern, or
 * from 0 for a non-finite value, the salt's halves ``cs``, ``ds`` and the position), truncated */
static inline void store_stochastic(const float* restrict w, const uint16_t* restrict cs, const uint16_t* restrict ds,
                                    uint16_t dpos, int64_t n, uint16_t* restrict out) {
    #pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
        const uint32_t u = bits_of(w[i]);
        const uint16_t lo = (uint16_t)u, hi = (uint16_t)(u >> 16);
        const int finite = finite_half(hi);
        const uint16_t a = finite ? lo : 0, b = finite ? hi : 0;
        const uint16_t r = hash16(a, b, cs[i], (uint16_t)(ds[i] ^ dpos));
        const uint16_t rounded = (uint16_t)(hi + ((uint16_t)(lo + r) < r));
        out[i] = finite ? rounded : nonfinite_half(hi, lo);
    }
}

/* torch's float-to-bfloat16 conversion: round half to even, u + 0x7FFF + (hi & 1) keeping the upper half, so hi plus
 * a carry when lo + (hi & 1) > 0x8000 (a carry into the exponent makes the next power of two, or infinity, as it
 * should) */
static inline void store_nearest(const float* restrict w, int64_t n, uint16_t* restrict out) {
    #pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
        const uint32_t u = bits_of(w[i]);
        const uint16_t lo = (uint16_t)u, hi = (uint16_t)(u >> 16);
        const uint16_t rounded = (uint16_t)(hi + (lo + (hi & 1) > 0x8000));
        out[i] = finite_half(hi) ? rounded : nonfinite_half(hi, lo);
    }
}

/* Elements [lo, hi) of one variant's update, tile by tile (instantiated per variant). */
static inline __attribute__((always_inline))
void tiles(int variant, const Scalars* ks, float* restrict p, const float* restrict g, uint16_t* const* states,
           uint32_t salt, int64_t lo, int64_t hi) {
    const Scalars kc = *ks;
    float wide[MAX_STATE][TILE];
    int n_state = 0;
    while (n_state < MAX_STATE && SLOT[variant][n_state] >= 0) ++n_state;
    for (int64_t t0 = lo; t0 < hi; t0 += TILE) {
        const int64_t n = hi - t0 < TILE ? hi - t0 : TILE;
        for (int j = 0; j < n_state; ++j) {
            const uint16_t* restrict s = states[j] + t0;
            float* restrict w = wide[SLOT[variant][j]];
            #pragma omp simd
            for (int64_t i = 0; i < n; ++i) w[i] = float_of((uint32_t)s[i] << 16);
        }
        #pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
            Element e;
            element(variant, &kc, p + t0, g + t0, wide[0], wide[1], wide[2], wide[3], i, 0, &e);
        }
        uint16_t cs[TILE], ds[TILE];   /* the salt's halves (low_precision.rounding_salt), shared by the states */
        #pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
            const uint32_t s = bits_of(g[t0 + i]) ^ salt;
            cs[i] = (uint16_t)s;
            ds[i] = (uint16_t)(s >> 16);
        }
        for (int j = 0; j < n_state; ++j) {
            const int slot = SLOT[variant][j];
            if (slot == 2 && variant != ADAMAX_MU)   /* AMSGrad's running max: nearest (no small increments) */
                store_nearest(wide[slot], n, states[j] + t0);
            else
                store_stochastic(wide[slot], cs, ds, position_mix((uint32_t)j), n, states[j] + t0);
        }
    }
}

#define TILES_OF(V) \
    static void tiles_##V(const Scalars* k, float* p, const float* g, uint16_t* const* states, uint32_t salt, \
                          int64_t lo, int64_t hi) \
    { tiles(V, k, p, g, states, salt, lo, hi); }
TILES_OF(ADAM_MV) TILES_OF(ADAM_MVX) TILES_OF(BOUND_MV) TILES_OF(BOUND_MVX) TILES_OF(BOUND_MVS) TILES_OF(BOUND_MVXS)
TILES_OF(ADAMAX_MU)

typedef void (*TilesFn)(const Scalars*, float*, const float*, uint16_t* const*, uint32_t, int64_t, int64_t);
static const TilesFn TILES[] = {tiles_ADAM_MV, tiles_ADAM_MVX, tiles_BOUND_MV, tiles_BOUND_MVX, tiles_BOUND_MVS,
                                tiles_BOUND_MVXS, tiles_ADAMAX_MU};

/* The update of ``n`` elements: flat float32 parameter and gradient, the variant's bfloat16 states (as uint16) in
 * kernel argument order, the scalars ``sc`` and the step counter (its low 16 bits enter the rounding).  Each
 * element's result depends on nothing else, so neither the thread count nor the tiling changes a bit.  Returns 0,
 * or -1 for an unknown variant. */
int sharded_optim_update_bf16(int variant, int64_t n, float* p, const float* g, uint16_t* const* states,
                              const float* sc, int64_t step, int nthreads) {
    if (variant < ADAM_MV || variant > ADAMAX_MU) return -1;
    const Scalars k = scalars_of(sc);
    const TilesFn fn = TILES[variant];
    const int64_t per_item = (int64_t)ITEM_TILES * TILE, items = (n + per_item - 1) / per_item;
    #pragma omp parallel for schedule(static) num_threads(nthreads) if(items > 1)
    for (int64_t it = 0; it < items; ++it) {
        const int64_t lo = it * per_item, hi = lo + per_item < n ? lo + per_item : n;
        fn(&k, p, g, states, step_salt(step), lo, hi);
    }
    return 0;
}
