/* The CPU update with 8-bit blockwise state (kernels/int8_state.py has the code and why): per block of 256 elements,
 * decode every state into float32, run the fp32 update of one element (native_common.h), then re-encode every state
 * under a new power-of-two block scale with stochastic rounding.
 *
 * Why by hand: the compiled kernel (Inductor) ran at 0.22-0.36x the fp32 kernel's speed on 2 cores.  Its code
 * makes several passes over a chunk: the update, writing the new states to fp32 temporaries with one block maximum;
 * a loop for each further maximum; the encoding from the temporaries; single-threaded loops for the scales.  The
 * work is compute-bound (a hash and an encoding per state and element).  Here a block's decoded and updated state
 * stays in L1 (4 x 1 KiB), the maxima come out of the update's loop, and every loop is a plain vectorisable one.
 *
 * Bitwise contract: the same integer operations as int8_state.py (decode, block scale, 16-bit hash, encode) and the
 * same IEEE operations for the update and for the one float product of the encoding (the signed states' chance of
 * rounding up from zero); tests/test_native_low_precision.py checks it against the compiled kernel, bit for bit (a
 * NaN state's code aside: which NaN pattern an operation returns is the compiler's choice).  Integer arithmetic is
 * unsigned here where Inductor's int32 would wrap, so nothing is undefined in C.
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

/* What the encoding of a block needs: its scale's grid index ``top``, the last level's distance ``last`` below it
 * and that level's grid index ``floor_idx`` (int8_state._last). */
typedef struct { int32_t kmax, top, last, floor_idx; } Grid;

static inline Grid grid_of(uint32_t scale_bits, int is_signed) {
    Grid q;
    q.kmax = is_signed ? 127 : 255;
    q.top = (int32_t)(scale_bits >> SHIFT);
    const int32_t room = q.top - MIN_NORMAL;
    q.last = room < q.kmax - 1 ? room : q.kmax - 1;
    q.floor_idx = q.top - q.last;
    return q;
}

/* int8_state.quantize_blocks of a signed state's block (int8 codes): stochastic rounding with 16 random bits per
 * element from the new value, the salt halves ``cs``, ``ds`` (gradient bits and step) and the state's position;
 * between 0 and the last level, up with probability |x| / last (one float product, as the compiled kernel). */
static inline void encode_signed(const float* restrict w, const uint16_t* restrict cs, const uint16_t* restrict ds,
                                 uint16_t dpos, Grid q, int8_t* restrict out) {
    const int32_t floor_bits = (int32_t)((uint32_t)q.floor_idx << SHIFT);
    const float floor_value = float_of((uint32_t)floor_bits);
    #pragma omp simd
    for (int i = 0; i < BLOCK; ++i) {
        const uint32_t xb = bits_of(w[i]);
        const float mag = fabsf(w[i]);
        const uint32_t mb = bits_of(mag);
        const uint32_t r = hash16((uint16_t)xb, (uint16_t)(xb >> 16), cs[i], (uint16_t)(ds[i] ^ dpos));
        const float u = ((float)(int32_t)r + 0.5f) * (1.0f / 65536);
        const int32_t up = u * floor_value < mag, below = (int32_t)mb < floor_bits;
        const int32_t small = up ? q.last : q.kmax, c = below ? small : levels_below(mb, r, q.top);
        const int32_t j = q.kmax - c, negative = w[i] < 0.0f;
        out[i] = (int8_t)(negative ? -j : j);
    }
}

/* levels_below in 16-bit lanes, for a value with pattern halves ``lo``, ``b`` (hi = b without the sign bit) and the
 * hash's salt halves ``c``, ``d``: (mb + (r << 4)) >> 20 == (hi + q / 4096) >> 4 for q = (lo >> 4) + r (the
 * dropped low 4 bits of lo cannot carry past a multiple of 16), and q / 4096 is the top 4 bits of q's 16-bit sum
 * plus 16 when that sum wrapped.  Equal to the 32-bit form bit for bit (tests). */
static inline uint16_t levels_below16(uint16_t lo, uint16_t b, uint16_t c, uint16_t d, uint16_t top) {
    const uint16_t r = hash16(lo, b, c, d);
    const uint16_t sum = (uint16_t)((lo >> 4) + r);
    const uint16_t carry = (uint16_t)((sum >> 12) + (sum < r ? 16 : 0));
    return (uint16_t)(top - (uint16_t)((uint16_t)((b & 0x7FFF) + carry) >> 4));
}

/* The same for a non-negative state (uint8 codes; never rounded to zero unless exactly 0), all in 16-bit lanes:
 * mb < floor_bits compares grid indices, hi >> 4 against floor_idx (floor_bits has no lower bits). */
static inline void encode_unsigned(const float* restrict w, const uint16_t* restrict cs, const uint16_t* restrict ds,
                                   uint16_t dpos, Grid q, uint8_t* restrict out) {
    const uint16_t top = (uint16_t)q.top, last = (uint16_t)q.last, kmax = (uint16_t)q.kmax;
    const uint16_t floor_idx = (uint16_t)q.floor_idx;
    #pragma omp simd
    for (int i = 0; i < BLOCK; ++i) {
        const uint32_t xb = bits_of(w[i]);
        const uint16_t lo = (uint16_t)xb, b = (uint16_t)(xb >> 16), hi = (uint16_t)(b & 0x7FFF);
        const uint16_t levels = levels_below16(lo, b, cs[i], (uint16_t)(ds[i] ^ dpos), top);
        const uint16_t small = (hi | lo) ? last : kmax;
        const uint16_t c = (hi >> 4) < floor_idx ? small : levels;
        out[i] = (uint8_t)(kmax - c);
    }
}

/* encode_signed for a block with no element below the last level (its least |w| at or above the floor) and a finite
 * greatest |w|: every code is then the distance formula with w's sign applied, so it runs in 16-bit lanes too
 * (twice the lanes of encode_signed; the same codes, bit for bit: tests).  Most blocks of a first moment qualify;
 * one holding a zero, or a value 2^-16 of its largest, takes encode_signed. */
static inline void encode_signed_above(const float* restrict w, const uint16_t* restrict cs,
                                       const uint16_t* restrict ds, uint16_t dpos, Grid q, int8_t* restrict out) {
    const uint16_t top = (uint16_t)q.top, kmax = (uint16_t)q.kmax;
    #pragma omp simd
    for (int i = 0; i < BLOCK; ++i) {
        const uint32_t xb = bits_of(w[i]);
        const uint16_t lo = (uint16_t)xb, b = (uint16_t)(xb >> 16);
        const uint16_t j = (uint16_t)(kmax - levels_below16(lo, b, cs[i], (uint16_t)(ds[i] ^ dpos), top));
        out[i] = (int8_t)(uint8_t)(b & 0x8000 ? (uint16_t)-j : j);
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
        for (int j = 0; j < n; ++j)
            decode((const char*)codes[j] + b * BLOCK, SLOT[variant][j] == 0, bits_of(scales[j][b]),
                   wide[SLOT[variant][j]]);
        uint32_t top_m = 0, top_v = 0, top_x = 0, top_s = 0;   /* greatest |state| patterns, per slot */
        uint32_t bot_m = UINT32_MAX;                           /* the least |m| pattern */
        #pragma omp simd reduction(max: top_m, top_v, top_x, top_s) reduction(min: bot_m)
        for (int i = 0; i < BLOCK; ++i) {
            Element e;
            element(variant, &kc, pb, gb, wide[0], wide[1], wide[2], wide[3], i, 0, &e);
            const uint32_t mag_m = bits_of(wide[0][i]) & 0x7FFFFFFFu;
            top_m = max_u32(top_m, mag_m);
            bot_m = mag_m < bot_m ? mag_m : bot_m;
            if (uses(variant, 1)) top_v = max_u32(top_v, bits_of(wide[1][i]) & 0x7FFFFFFFu);
            if (uses(variant, 2)) top_x = max_u32(top_x, bits_of(wide[2][i]) & 0x7FFFFFFFu);
            if (uses(variant, 3)) top_s = max_u32(top_s, bits_of(wide[3][i]) & 0x7FFFFFFFu);
        }
        uint16_t cs[BLOCK], ds[BLOCK];   /* the salt's halves (low_precision.rounding_salt), shared by the states */
        #pragma omp simd
        for (int i = 0; i < BLOCK; ++i) {
            const uint32_t salt = bits_of(gb[i]) ^ step_mix;
            cs[i] = (uint16_t)salt;
            ds[i] = (uint16_t)(salt >> 16);
        }
        const uint32_t top[MAX_STATE] = {top_m, top_v, top_x, top_s};
        for (int j = 0; j < n; ++j) {   /* only the exp_avg (m, slot 0) is signed among these variants */
            const int slot = SLOT[variant][j];
            const uint32_t scale_bits = block_scale(top[slot]);
            scales[j][b] = float_of(scale_bits);
            char* out = (char*)codes[j] + b * BLOCK;
            const Grid q = grid_of(scale_bits, slot == 0);
            if (slot == 0 && top_m < EXPONENT && bot_m >= (uint32_t)q.floor_idx << SHIFT)
                encode_signed_above(wide[slot], cs, ds, position_mix((uint32_t)j), q, (int8_t*)out);
            else if (slot == 0)
                encode_signed(wide[slot], cs, ds, position_mix((uint32_t)j), q, (int8_t*)out);
            else
                encode_unsigned(wide[slot], cs, ds, position_mix((uint32_t)j), q, (uint8_t*)out);
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
