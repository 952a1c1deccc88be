/* Types and exact scalar helpers shared by every translation unit of the kbit-cpu library.
 *
 * Nothing here depends on the instruction set: the per-ISA kernel objects (kernels.c built
 * several times) and the portable API layer (api.c, codebook.c) all include it.
 *
 * Numerics follow kbit's format contract (docs/formats.md): float32 arithmetic with
 * round-to-nearest-even, no fused multiply-add where it would change a rounded result (the
 * library is built with -ffp-contract=off and never with -ffast-math), and conversions to
 * float16 / bfloat16 that round to nearest even exactly like torch's.
 */
#ifndef KB_INTERNAL_H
#define KB_INTERNAL_H

#include <stdint.h>
#include <string.h>

#include "kbit_cpu.h"

#define KB_INLINE static inline __attribute__((always_inline))

/* ------------------------------------------------------------------------ bit casts */
KB_INLINE uint32_t kb_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

KB_INLINE float kb_float(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* ------------------------------------------------------------ 16-bit float formats */
KB_INLINE float kb_bf16_to_f32(uint16_t h) { return kb_float((uint32_t)h << 16); }

/* Round to nearest even; NaN stays a (quiet) NaN of the same sign. */
KB_INLINE uint16_t kb_f32_to_bf16(float f) {
    uint32_t u = kb_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

KB_INLINE float kb_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t rest = h & 0x7fffu;
    if (rest >= 0x7c00u) return kb_float(sign | 0x7f800000u | ((rest & 0x3ffu) << 13)); /* inf, NaN */
    if (rest >= 0x0400u) return kb_float(sign | ((rest << 13) + ((127u - 15u) << 23))); /* normal */
    /* subnormal or zero: rest * 2^-24 is exact in float32 */
    return kb_float(sign | kb_bits((float)rest * 5.9604644775390625e-08f));
}

/* float32 -> float16, round to nearest even, overflow to inf (IEEE, as F16C and torch). */
KB_INLINE uint16_t kb_f32_to_f16(float f) {
    uint32_t u = kb_bits(f);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t mag = u & 0x7fffffffu;
    uint32_t out;
    if (mag > 0x7f800000u) {
        out = 0x7e00u | ((mag >> 13) & 0x3ffu); /* NaN stays NaN (quiet) */
    } else if (mag >= 0x47800000u) {          /* >= 65536 (or inf): inf */
        out = 0x7c00u;
    } else if (mag < 0x38800000u) {           /* below 2^-14: float16 subnormal or zero */
        /* Adding 0.5 (2^-1) puts the float16 subnormal unit (2^-24) at float32's last
         * mantissa bit, so the float32 adder performs the round-to-nearest-even. */
        float shifted = kb_float(mag) + 0.5f;
        out = kb_bits(shifted) - kb_bits(0.5f);
    } else {                                  /* normal: rebias, round the 13 dropped bits */
        uint32_t odd = (mag >> 13) & 1u;
        out = (mag + ((uint32_t)(15 - 127) << 23) + 0xfffu + odd) >> 13;
    }
    return (uint16_t)(out | sign);
}

/* --------------------------------------------------------------------- codebooks */
/* Number of buckets of the exact nearest-code search: one per value of a float's top 16
 * bits (sign, exponent and 7 mantissa bits). */
#define KB_BUCKETS 65536
/* Largest refinement step count the bucket search uses; a table needing more (none of the
 * format's tables does) is searched by bisection instead. */
#define KB_MAX_STEPS 8

/* Most buckets per sign of a codebook's compact index (see kb_codebook.compact): enough for
 * every table of the format whose bounds are spread over at most 36 binades (the dynamic
 * maps need 22 or 23, an FP8 map 36). */
#define KB_COMPACT_MAX 4608

/* A code table prepared for exact nearest-code search (ties to the lower index).
 *
 * The table's distinct values, sorted, are separated by ``nbounds`` float32 decision bounds
 * computed exactly as the reference backend does; a float32 value x takes the code
 * ``index[c]`` where c is the number of bounds strictly below x (NaN: c = nbounds). The
 * count is found by a table lookup on x's top 16 bits (``start``: the count at the
 * bucket's lowest value) followed by ``steps`` compare-and-increment steps, which is exact
 * because no bucket spans more than ``steps`` bounds. */
typedef struct kb_codebook {
    float bounds[KB_MAX_CODES + KB_MAX_STEPS + 1]; /* nbounds bounds, then +inf */
    int32_t index[KB_MAX_CODES];                   /* count -> code index */
    float sorted[KB_MAX_CODES];                    /* distinct values ascending */
    int32_t sorted_index[KB_MAX_CODES];            /* lowest code index holding sorted[j] */
    /* The bisection over the 256 bounds slots as level tables, for vector permutes: the
     * first 4 levels as a heap (tree[1..15]), then levels 4..7 (16, 32, 64, 128 nodes) at
     * tree[16..31], [32..63], [64..127], [128..255]. Node j of the level with step s
     * (s = 128 >> level) is bounds[j * 2 * s + s - 1]. */
    float tree[KB_MAX_CODES];
    /* The same for tables of at most 16 values (4-bit): a heap over 16 slots, tree16[1..15]. */
    float tree16[16];
    int32_t nbounds;
    int32_t steps;    /* -1: search by bisection */
    int32_t identity; /* index[c] == c for every c */
    int32_t ncodes;
    uint8_t start[KB_BUCKETS + 4]; /* +4: 32-bit gathers read 3 bytes past the last bucket */
    /* The compact index: one 32-bit entry per bucket of magnitudes (a float's bits 30..16:
     * exponent and 7 mantissa bits) per sign, for tables with at most one bound in any
     * bucket, which the format's tables all are. Buckets run over the magnitude keys
     * [compact_lo - 1, compact_hi + 1], compact_lo and compact_hi being the smallest and
     * largest key of any bound: the first bucket takes every smaller magnitude and the
     * last every larger one (NaN included), both free of bounds. Negative values use the
     * second half (offset compact_size), chosen by x < 0 so that -0 and a NaN of either
     * sign search as +0 and +NaN do. An entry holds the code below the bucket's bound
     * (bits 0..7), the code above it (bits 8..15) and the bound's "residual" (bits 16..31):
     * its low 16 bits, complemented for negative buckets, so that a value x of the bucket
     * lies above the bound exactly when x's residual (formed alike) is larger. A bucket
     * without a bound holds residual 0xffff, which no value exceeds. One lookup and one
     * integer compare then give the code, NaN's and the index mapping included.
     * compact_size is 0 when the table does not qualify (the other methods serve it). */
    int32_t compact_lo, compact_hi, compact_size;
    uint32_t compact[2 * KB_COMPACT_MAX];
} kb_codebook;

/* --------------------------------------------------------------- optimizer step */
/* Per-element state layouts of the optimizer kernels. */
enum { KB_STATE_F32 = 0, KB_STATE_U8_BLOCKWISE = 1, KB_STATE_U8_TENSOR = 2 };

/* The passes of an optimizer step: a measuring pass (norms, whole-tensor scales) writes
 * nothing; the writing pass follows it, or runs alone. */
enum { KB_PASS_MEASURE = 0, KB_PASS_WRITE = 1 };

/* What a measuring optimizer pass returns (one per thread, combined by api.c). */
typedef struct kb_partials {
    double param_sq, update_sq;  /* ||p||^2 and ||update||^2 (trust ratio) */
    int32_t max1_bits, max2_bits; /* whole-tensor 8-bit: magnitude bits of the new states' max */
} kb_partials;

/* ---------------------------------------------------------------- kernel table */
/* The per-instruction-set kernels. Each works on a range of the data on the calling thread;
 * api.c splits the work between threads and calls through the table of the best
 * instruction set this CPU supports. */
typedef struct kb_kernels {
    const char *name;
    /* absmax per block b in [b0, b1) of n elements, codes of the normalised values */
    void (*quantize8_blocks)(const void *x, int dtype, int64_t n, int64_t bs, int64_t b0, int64_t b1,
                             const kb_codebook *cb, float *absmax, uint8_t *codes);
    /* max |x| over [i0, i1), NaN when any element is NaN */
    float (*absmax_range)(const void *x, int dtype, int64_t i0, int64_t i1);
    /* codes of x[i] * scale for i in [i0, i1) */
    void (*quantize8_scaled)(const void *x, int dtype, int64_t i0, int64_t i1, float scale,
                             const kb_codebook *cb, uint8_t *codes);
    /* code[codes[i]] * absmax[i / bs] for i in [i0, i1) */
    void (*dequantize8)(const uint8_t *codes, int64_t i0, int64_t i1, int64_t bs, const float *code,
                        const float *absmax, void *out, int dtype);
    /* 4-bit: absmax and packed codes of blocks [b0, b1) */
    void (*quantize4_blocks)(const void *x, int dtype, int64_t n, int64_t bs, int64_t b0, int64_t b1,
                             const kb_codebook *cb, float *absmax, uint8_t *packed);
    /* table[nibble i] * absmax[i / bs] for i in [i0, i1), i0 even */
    void (*dequantize4)(const uint8_t *packed, int64_t i0, int64_t i1, int64_t bs, const float *table,
                        const float *absmax, void *out, int dtype);
    /* 4-bit matmul, in two steps: A [M, K] (a_dtype) is copied once per call into the layout
     * gemm4 reads (gemm4_packed_a_bytes of scratch), then gemm4 computes out[m, o] =
     * sum_k A[m, k] * W[o, k] (+ bias[o]) for o in [o0, o1), W the 4-bit [N, K] weight; bias
     * (may be NULL) has out's dtype */
    int64_t (*gemm4_packed_a_bytes)(int64_t M, int64_t K, int a_dtype);
    void (*gemm4_pack_a)(const void *A, int a_dtype, int64_t M, int64_t K, void *packed_a);
    void (*gemm4)(const void *packed_a, int a_dtype, int64_t M, int64_t K, const uint8_t *packed, const float *absmax,
                  int64_t bs, const float *table, int64_t o0, int64_t o1, int64_t N, const void *bias, void *out,
                  int out_dtype);
    /* int8 row quantization of rows [r0, r1); outlier columns (colmask != NULL) are zeroed */
    void (*int8_quant_rows)(const void *A, int dtype, int64_t r0, int64_t r1, int64_t K, float threshold,
                            const uint8_t *colmask, int8_t *codes, float *stats);
    /* out = A * stats[row] / 127 for rows [r0, r1) */
    void (*int8_dequant_rows)(const int8_t *A, int64_t r0, int64_t r1, int64_t K, const float *stats, float *out);
    /* one optimizer step over elements [i0, i1) (blockwise: whole blocks); ``pass`` is a
     * KB_PASS_* value: the measuring pass (norms, new whole-tensor scales) writes nothing */
    void (*optimizer_range)(const kb_optimizer_step *step, const kb_optimizer_tensors *t, int64_t i0, int64_t i1,
                            int pass, kb_partials *partials);
} kb_kernels;

/* x86-64 builds carry AVX-512 and AVX2 kernels besides the portable ones; every other
 * architecture (and a build with -DKB_PORTABLE_ONLY) only the portable ones. */
#if (defined(__x86_64__) || defined(_M_X64)) && !defined(KB_PORTABLE_ONLY)
#define KB_X86_KERNELS 1
#else
#define KB_X86_KERNELS 0
#endif

extern const kb_kernels kb_kernels_portable;
#if KB_X86_KERNELS
extern const kb_kernels kb_kernels_avx2;
extern const kb_kernels kb_kernels_avx512;
extern const kb_kernels kb_kernels_avx512vbmi;
/* AVX-512 with VBMI plus the BF16 dot products (AVX512_BF16), built where the compiler supports them */
#ifdef KB_HAVE_AVX512BF16
extern const kb_kernels kb_kernels_avx512bf16;
#endif
#endif

#endif /* KB_INTERNAL_H */
