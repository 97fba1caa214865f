/* The CPU update with 8-bit blockwise state (kernels/int8_state.py has the code and why): per block of 256 elements,
 * decode every state into float32, run the fp32 update of one element (native_common.h), then re-encode every state
 * under a new power-of-two block scale with stochastic rounding.
 *
 * Why by hand: the compiled kernel (Inductor) ran at 0.23-0.36x the fp32 kernel's speed on 2 cores.  Its code
 * makes several passes over a chunk: the update, writing the new states to fp32 temporaries with one block maximum;
 * a loop for each further maximum; the encoding from the temporaries; single-threaded loops for the scales.  The
 * work is compute-bound (a hash and an encoding per state and element).  Here a block's decoded and updated state
 * stays in L1 (4 x 1 KiB), the maxima come out of the update's loop, and every loop is a plain vectorisable one.
 *
 * Bitwise contract: the same integer operations as int8_state.py (decode, block scale, 16-bit hash, encode) and the
 * same IEEE operations for the update and for the one float product of the encoding (the signed states' chance of
 * rounding up from zero); tests/test_native_low_precision.py checks it against the compiled kernel, bit for bit (a NaN
 * state's code aside: which NaN pattern an operation returns is the compiler's choice).  Integer
 * arithmetic is unsigned here where Inductor's int32 would wrap, so nothing is undefined in C.
 */
#include <stdint.h>

#include "native_common.h"

#define BLOCK 256          /* int8_state.BLOCK: elements per scale */
#define SHIFT 20           /* int8_state.SHIFT: 23 - 3 mantissa bits dropped */
#define MIN_NORMAL 8       /* int8_state._MIN_NORMAL: (1 << 23) >> SHIFT */
#define ONE_BITS 0x3F800000u
#define EXPONENT 0x7F800000u
#define ITEM_BLOCKS 64     /* blocks per work item (16384 elements, as native_cpu.c's CHUNK) */
/* int8_state._decode of one block: codes (int8 if ``is_signed``, else uint8) under the scale's bits */
static inline void decode(const void* codes, int is_signed, uint32_t scale_bits, float* restrict out) {
    const int32_t kmax = is_signed ? 127 : 255, top = (int32_t)(scale_bits >> SHIFT);
    const int8_t* restrict sc8 = codes;
    const uint8_t* restrict uc8 = codes;
    #pragma omp simd
    for (int i = 0; i < BLOCK; ++i) {
        const int32_t c = is_signed ? sc8[i] : uc8[i];
        const int32_t k = kmax - (c < 0 ? -c : c);
        const float value = k >= kmax ? 0.0f : float_of((uint32_t)(top - k) << SHIFT);
        out[i] = c < 0 ? -value : value;
    }
}

/* int8_state.block_scales from the greatest |w| bit pattern of a block (``top_bits``, the sign bit cleared: for
 * non-negative floats the int order is the float order, and a NaN's pattern is above infinity's): the power of two
 * at or above the largest magnitude; 1 for an all-zero block and for a block holding a NaN (torch.amax propagates
 * it, and NaN > 0 is false). */
static inline uint32_t block_scale(uint32_t top_bits) {
    return top_bits == 0 || top_bits > EXPONENT ? ONE_BITS : (top_bits + 0x7FFFFFu) & EXPONENT;
}

/* The distance (in levels) of w's magnitude ``mb`` (bits) below the scale ``top``, rounded down after adding 16
 * random bits under the kept mantissa: stochastic rounding between the two neighbouring levels. */
static inline int32_t levels_below(uint32_t mb, uint32_t r, int32_t top) {
    return top - (int32_t)((mb + (r << (SHIFT - 16))) >> SHIFT);
}

/* int8_state.quantize_blocks of one block with stochastic rounding: 16 random bits per element from the new value,
 * the salt (gradient bits and step) and the state's position.  Signed states (int8 codes, kmax 127) round between 0
 * and the last level up with probability |x| / last; non-negative ones (uint8, kmax 255) never round to zero unless
 * exactly 0.  Two loops, not one with a branch: a branch in the loop stops the vectoriser. */
static inline void encode(const float* restrict w, const float* restrict g, uint32_t step_mix, uint32_t position,
                          int is_signed, uint32_t scale_bits, void* codes) {
    const int32_t kmax = is_signed ? 127 : 255;
    const int32_t top = (int32_t)(scale_bits >> SHIFT);
    const int32_t room = top - MIN_NORMAL, last = room < kmax - 1 ? room : kmax - 1;
    const int32_t floor_bits = (int32_t)((uint32_t)(top - last) << SHIFT);
    const float floor_value = float_of((uint32_t)floor_bits);
    if (is_signed) {
        int8_t* restrict out = codes;
        #pragma omp simd
        for (int i = 0; i < BLOCK; ++i) {
            const float mag = fabsf(w[i]);
            const uint32_t mb = bits_of(mag), r = random_bits(bits_of(w[i]), bits_of(g[i]) ^ step_mix, position);
            const float u = ((float)(int32_t)r + 0.5f) * (1.0f / 65536);
            const int32_t up = u * floor_value < mag, below = (int32_t)mb < floor_bits;
            const int32_t small = up ? last : kmax, c = below ? small : levels_below(mb, r, top);
            const int32_t j = kmax - c, negative = w[i] < 0.0f;
            out[i] = (int8_t)(negative ? -j : j);
        }
    } else {
        uint8_t* restrict out = codes;
        #pragma omp simd
        for (int i = 0; i < BLOCK; ++i) {
            const float mag = fabsf(w[i]);
            const uint32_t mb = bits_of(mag), r = random_bits(bits_of(w[i]), bits_of(g[i]) ^ step_mix, position);
            const int32_t c = (int32_t)mb < floor_bits ? (mag > 0.0f ? last : kmax) : levels_below(mb, r, top);
            out[i] = (uint8_t)(kmax - c);
        }
    }
}

/* The blocks [b0, b1) of one variant's update (instantiated per variant: the variant tests fold away). */
static inline __attribute__((always_inline)) void blocks(int variant, const Scalars* ks, float* restrict p,
                                                         const float* restrict g, void* const* codes,
                                                         float* const* scales, uint32_t step_mix, int64_t b0,
                                                         int64_t b1) {
    const Scalars kc = *ks;
    float wide[MAX_STATE][BLOCK];
    int n = 0;
    while (n < MAX_STATE && SLOT[variant][n] >= 0) ++n;
    for (int64_t b = b0; b < b1; ++b) {
        float* restrict pb = p + b * BLOCK;
        const float* restrict gb = g + b * BLOCK;
        for (int j = 0; j < n; ++j)   /* only the exp_avg (m, slot 0) is signed among these variants */
            decode((const char*)codes[j] + b * BLOCK, SLOT[variant][j] == 0, bits_of(scales[j][b]),
                   wide[SLOT[variant][j]]);
        uint32_t top_m = 0, top_v = 0, top_x = 0, top_s = 0;   /* greatest |state| patterns, per slot */
        #pragma omp simd reduction(max: top_m, top_v, top_x, top_s)
        for (int i = 0; i < BLOCK; ++i) {
            Element e;
            element(variant, &kc, pb, gb, wide[0], wide[1], wide[2], wide[3], i, 0, &e);
            top_m = max_u32(top_m, bits_of(wide[0][i]) & 0x7FFFFFFFu);
            if (uses(variant, 1)) top_v = max_u32(top_v, bits_of(wide[1][i]) & 0x7FFFFFFFu);
            if (uses(variant, 2)) top_x = max_u32(top_x, bits_of(wide[2][i]) & 0x7FFFFFFFu);
            if (uses(variant, 3)) top_s = max_u32(top_s, bits_of(wide[3][i]) & 0x7FFFFFFFu);
        }
        const uint32_t top[MAX_STATE] = {top_m, top_v, top_x, top_s};
        for (int j = 0; j < n; ++j) {
            const int slot = SLOT[variant][j];
            const uint32_t scale_bits = block_scale(top[slot]);
            scales[j][b] = float_of(scale_bits);
            encode(wide[slot], gb, step_mix, (uint32_t)j, slot == 0, scale_bits, (char*)codes[j] + b * BLOCK);
        }
    }
}

#define BLOCKS_OF(V) \
    static void blocks_##V(const Scalars* k, float* p, const float* g, void* const* codes, float* const* scales, \
                           uint32_t step_mix, int64_t b0, int64_t b1) \
    { blocks(V, k, p, g, codes, scales, step_mix, b0, b1); }
BLOCKS_OF(ADAM_MV) BLOCKS_OF(ADAM_MVX) BLOCKS_OF(BOUND_MV) BLOCKS_OF(BOUND_MVX) BLOCKS_OF(BOUND_MVS)
BLOCKS_OF(BOUND_MVXS) BLOCKS_OF(ADAMAX_MU)

typedef void (*BlocksFn)(const Scalars*, float*, const float*, void* const*, float* const*, uint32_t, int64_t,
                         int64_t);
static const BlocksFn BLOCKS[] = {blocks_ADAM_MV, blocks_ADAM_MVX, blocks_BOUND_MV, blocks_BOUND_MVX,
                                  blocks_BOUND_MVS, blocks_BOUND_MVXS, blocks_ADAMAX_MU};

/* The update of ``nblocks`` blocks of 256 elements: flat float32 parameter and gradient, the variant's codes (int8
 * for exp_avg, uint8 otherwise) and float32 block scales in kernel argument order, the scalars ``sc`` and the step
 * counter (its low 16 bits enter the rounding).  Work items of ITEM_BLOCKS blocks; each element's result depends on
 * nothing else, so neither the thread count nor the item size changes a bit.  Returns 0, or -1 for an unknown
 * variant. */
int sharded_optim_update_int8(int variant, int64_t nblocks, float* p, const float* g, void* const* codes,
                              float* const* scales, const float* sc, int64_t step, int nthreads) {
    if (variant < ADAM_MV || variant > ADAMAX_MU) return -1;
    const Scalars k = scalars_of(sc);
    const BlocksFn fn = BLOCKS[variant];
    const int64_t items = (nblocks + ITEM_BLOCKS - 1) / ITEM_BLOCKS;
    #pragma omp parallel for schedule(static) num_threads(nthreads) if(items > 1)
    for (int64_t it = 0; it < items; ++it) {
        const int64_t b0 = it * ITEM_BLOCKS, b1 = b0 + ITEM_BLOCKS < nblocks ? b0 + ITEM_BLOCKS : nblocks;
        fn(&k, p, g, codes, scales, step_salt(step), b0, b1);
    }
    return 0;
}
