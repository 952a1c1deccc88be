/* kbit's CPU kernels, written once against kb_simd.h and compiled once per instruction set.
 *
 * The build compiles this file once per tier (avx512bf16, avx512vbmi, avx512, avx2, portable;
 * setup.py) with -DKB_ISA=<name>;
 * each object exports one table, kb_kernels_<name>, and api.c picks the best table the CPU
 * supports at run time. Every function here runs on the calling thread over the range it
 * is given; api.c does the threading.
 *
 * Exactness (docs/formats.md): values are normalised as x * (1 / absmax) in float32, the
 * code search is exact (see codebook.c), dequantization is one float32 multiply, and the
 * 16-bit outputs round to nearest even. Only the 4-bit matmul and the optimizer rules use
 * fused multiply-adds, where the format leaves the order of float operations free.
 */
#include "kb_simd.h"

#ifndef KB_ISA
#error "compile with -DKB_ISA=<instruction set name>"
#endif

#define KB_CAT2(a, b) a##_##b
#define KB_CAT(a, b) KB_CAT2(a, b)
#define KB_STR2(x) #x
#define KB_STR(x) KB_STR2(x)

#define KB_MIN(a, b) ((a) < (b) ? (a) : (b))
#define KB_MAX(a, b) ((a) > (b) ? (a) : (b))

/* ====================================================================== code search */
/* The compact index's parameters, read once per loop (stores through uint8_t pointers
 * could alias the codebook, so reading them inside a loop would repeat the loads). */
typedef struct {
    const uint32_t *entries;
    int32_t first_key, last_key; /* keys are clamped to [compact_lo - 1, compact_hi + 1] */
    int32_t size;
} compact_index;

KB_INLINE compact_index compact_load(const kb_codebook *cb) {
    compact_index c = {cb->compact, cb->compact_lo - 1, cb->compact_hi + 1, cb->compact_size};
    return c;
}

/* Code indices of KB_W values from the compact index (see kb_codebook.compact): one table
 * lookup and one compare per value. Vector instruction sets only: one lane at a time, the
 * bucket lookup of code_one takes fewer instructions. */
KB_INLINE vi compact_lanes(const compact_index *ci, vf x) {
#if KB_W == 1
    (void)ci;
    return vf_bits(x); /* never called */
#else
    const vi bits = vf_bits(x);
    const vm negative = vf_lt(x, vf_zero());
    vi key = vi_srli(vi_and(bits, vi_set1(0x7fffffff)), 16);
    key = vi_min(vi_max(key, vi_set1(ci->first_key)), vi_set1(ci->last_key));
    const vi at = vi_add(key, vi_blend(negative, vi_set1(-ci->first_key), vi_set1(ci->size - ci->first_key)));
    const vi entry = vi_gather((const int32_t *)(const void *)ci->entries, at);
    const vi residual = vi_and(vi_blend(negative, bits, vi_xor(bits, vi_set1(-1))), vi_set1(0xffff));
    const vm above = vi_gt(residual, vi_srli(entry, 16));
    return vi_and(vi_blend(above, entry, vi_srli(entry, 8)), vi_set1(0xff));
#endif
}

/* Code index of one float32 value (scalar, exact; NaN -> the largest value's code). */
KB_INLINE int32_t code_one(const kb_codebook *cb, float x) {
    int32_t c;
    if (x != x) {
        c = cb->nbounds;
    } else if (cb->steps >= 0) {
        c = cb->start[kb_bits(x) >> 16];
        for (int32_t k = 0; k < cb->steps; ++k) c += cb->bounds[c] < x;
    } else {
        c = 0;
        for (int32_t step = 128; step > 0; step >>= 1)
            if (cb->bounds[c + step - 1] < x) c += step;
    }
    return cb->index[c];
}

/* What the vector code search keeps in registers across a loop. */
typedef struct {
    compact_index compact;
#ifdef KB_HAVE_TREE
    vtree tree;
#endif
} searcher;

KB_INLINE searcher searcher_load(const kb_codebook *cb) {
    searcher s;
    s.compact = compact_load(cb);
#ifdef KB_HAVE_TREE
    s.tree = vtree_load(cb->tree);
#endif
    return s;
}

/* Code indices of KB_W values (same result as code_one lane by lane) for tables without a
 * compact index: the register tree where the instruction set has one, else the bucket
 * lookup and its refinement steps. */
KB_INLINE vi general_lanes(const kb_codebook *cb, const searcher *sr, vf x) {
    vi c;
#ifdef KB_HAVE_TREE
    c = vtree_count(&sr->tree, x);
#else
    (void)sr;
    const int32_t steps = cb->steps;
    if (steps >= 0) {
        c = vi_gather_u8(cb->start, vi_srli(vf_bits(x), 16));
        for (int32_t k = 0; k < steps; ++k) c = vi_inc_if(c, vf_lt(vf_gather(cb->bounds, c), x));
    } else {
        c = vi_set1(0);
        for (int32_t step = 128; step > 0; step >>= 1) {
            vi probe = vi_add(c, vi_set1(step - 1));
            c = vi_blend(vf_lt(vf_gather(cb->bounds, probe), x), c, vi_add(c, vi_set1(step)));
        }
    }
#endif
    c = vi_blend(vf_isnan(x), c, vi_set1(cb->nbounds));
    return cb->identity ? c : vi_gather(cb->index, c);
}

/* Code indices of KB_W values by the method ``compact`` (a constant at every call site,
 * chosen once per loop: cb->compact_size > 0). */
KB_INLINE vi code_lanes(const kb_codebook *cb, const searcher *sr, vf x, const int compact) {
    return compact ? compact_lanes(&sr->compact, x) : general_lanes(cb, sr, x);
}

/* max |x| over [i0, i1) as float32; NaN when any element is NaN. Non-negative floats order
 * like their bit patterns, and NaN patterns lie above inf's, so an integer maximum of the
 * magnitude bits finds the largest magnitude and lets NaN win. */
KB_INLINE float absmax_seg(const void *x, const int dt, int64_t i0, int64_t i1) {
    const vi magnitude = vi_set1(0x7fffffff);
    vi m0 = vi_set1(0), m1 = vi_set1(0);
    int64_t i = i0;
    for (; i + 2 * KB_W <= i1; i += 2 * KB_W) {
        m0 = vi_max(m0, vi_and(vf_bits(vf_load_dt(x, dt, i)), magnitude));
        m1 = vi_max(m1, vi_and(vf_bits(vf_load_dt(x, dt, i + KB_W)), magnitude));
    }
    int32_t best = vi_reduce_max(vi_max(m0, m1));
    for (; i < i1; ++i) {
        int32_t bits = (int32_t)(kb_bits(load1_dt(x, dt, i)) & 0x7fffffffu);
        if (bits > best) best = bits;
    }
    return kb_float((uint32_t)best);
}

KB_INLINE float reciprocal_or_zero(float absmax) { return absmax == 0.0f ? 0.0f : 1.0f / absmax; }

/* ============================================================================ 8-bit */
KB_INLINE void quantize8_seg_by(const void *x, const int dt, int64_t i0, int64_t i1, float scale,
                                const kb_codebook *cb, uint8_t *codes, int64_t ahead, const int compact) {
    const vf s = vf_set1(scale);
    const searcher sr = searcher_load(cb);
    const int64_t esize = dt == KB_F32 ? 4 : 2;
    int64_t i = i0;
    /* Two independent vectors per iteration: each search is a chain of dependent steps, and
     * interleaving two chains keeps the vector units busy. */
    for (; i + 2 * KB_W <= i1; i += 2 * KB_W) {
        if (ahead)
            for (int64_t byte = 0; byte < 2 * KB_W * esize; byte += 64)
                __builtin_prefetch((const char *)x + (i + ahead) * esize + byte, 0, 3);
        const vi first = code_lanes(cb, &sr, vf_mul(vf_load_dt(x, dt, i), s), compact);
        const vi second = code_lanes(cb, &sr, vf_mul(vf_load_dt(x, dt, i + KB_W), s), compact);
        vi_store_u8(codes + i, first);
        vi_store_u8(codes + i + KB_W, second);
    }
    for (; i + KB_W <= i1; i += KB_W)
        vi_store_u8(codes + i, code_lanes(cb, &sr, vf_mul(vf_load_dt(x, dt, i), s), compact));
    for (; i < i1; ++i) codes[i] = (uint8_t)code_one(cb, load1_dt(x, dt, i) * scale);
}

/* Codes of x[i] * scale for i in [i0, i1), prefetching the elements ``ahead`` further on
 * (0: none). */
KB_INLINE void quantize8_seg_ahead(const void *x, const int dt, int64_t i0, int64_t i1, float scale,
                                   const kb_codebook *cb, uint8_t *codes, int64_t ahead) {
    if (KB_W > 1 && cb->compact_size > 0) quantize8_seg_by(x, dt, i0, i1, scale, cb, codes, ahead, 1);
    else quantize8_seg_by(x, dt, i0, i1, scale, cb, codes, ahead, 0);
}

KB_INLINE void quantize8_seg(const void *x, const int dt, int64_t i0, int64_t i1, float scale,
                             const kb_codebook *cb, uint8_t *codes) {
    quantize8_seg_ahead(x, dt, i0, i1, scale, cb, codes, 0);
}

KB_INLINE void quantize8_blocks_dt(const void *x, const int dt, int64_t n, int64_t bs, int64_t b0, int64_t b1,
                                   const kb_codebook *cb, float *absmax, uint8_t *codes) {
    const int64_t ahead = KB_MIN(KB_MAX(bs, 8192 / (dt == KB_F32 ? 4 : 2)), b1 * bs - b0 * bs);
    for (int64_t b = b0; b < b1; ++b) {
        int64_t i0 = b * bs, i1 = KB_MIN(n, i0 + bs);
        float am = absmax_seg(x, dt, i0, i1);
        absmax[b] = am;
        /* While this block is coded, the data of the next absmax passes is fetched: at
         * least a block and at least 8 KB ahead, so that small blocks look far enough. */
        quantize8_seg_ahead(x, dt, i0, i1, reciprocal_or_zero(am), cb, codes, ahead);
    }
}

static void quantize8_blocks(const void *x, int dtype, int64_t n, int64_t bs, int64_t b0, int64_t b1,
                             const kb_codebook *cb, float *absmax, uint8_t *codes) {
    KB_DTYPE_SWITCH(dtype, quantize8_blocks_dt(x, DT, n, bs, b0, b1, cb, absmax, codes));
}

static float absmax_range(const void *x, int dtype, int64_t i0, int64_t i1) {
    float result = 0.0f;
    KB_DTYPE_SWITCH(dtype, result = absmax_seg(x, DT, i0, i1));
    return result;
}

static void quantize8_scaled(const void *x, int dtype, int64_t i0, int64_t i1, float scale, const kb_codebook *cb,
                             uint8_t *codes) {
    KB_DTYPE_SWITCH(dtype, quantize8_seg(x, DT, i0, i1, scale, cb, codes));
}

KB_INLINE void dequantize8_dt(const uint8_t *codes, int64_t i0, int64_t i1, int64_t bs, const float *code,
                              const float *absmax, void *out, const int dt) {
#ifdef KB_HAVE_BYTE_LOOKUP
    vtab256 bytes;
    vtab256_load(&bytes, code);
#endif
    int64_t i = i0;
    /* the block index advances with the blocks (a division per block showed at blocksize 64) */
    for (int64_t b = i0 / bs; i < i1; ++b) {
        const int64_t end = KB_MIN(i1, (b + 1) * bs);
        const float a = absmax[b];
        const vf av = vf_set1(a);
#ifdef KB_HAVE_BYTE_LOOKUP
        for (; i + 64 <= end; i += 64) {
            vf v[4];
            vtab256_lookup64(&bytes, codes + i, v);
            for (int j = 0; j < 4; ++j) vf_store_dt(out, dt, i + 16 * j, vf_mul(v[j], av));
        }
#endif
        for (; i + KB_W <= end; i += KB_W) vf_store_dt(out, dt, i, vf_mul(vf_gather(code, vi_load_u8(codes + i)), av));
        for (; i < end; ++i) store1_dt(out, dt, i, code[codes[i]] * a);
    }
}

static void dequantize8(const uint8_t *codes, int64_t i0, int64_t i1, int64_t bs, const float *code,
                        const float *absmax, void *out, int dtype) {
    KB_DTYPE_SWITCH(dtype, dequantize8_dt(codes, i0, i1, bs, code, absmax, out, DT));
}

/* ============================================================================ 4-bit */
/* Code index of one value against a table of at most 16 entries: the bisection over the
 * codebook's 16-slot heap (tree16), four compares. */
KB_INLINE int32_t code4_one(const kb_codebook *cb, float x) {
    int32_t h = 1;
    for (int level = 0; level < 4; ++level) h = 2 * h + (cb->tree16[h] < x);
    int32_t c = x != x ? cb->nbounds : h - 16;
    return cb->index[c];
}

KB_INLINE vi code4_lanes(const kb_codebook *cb, vtab16 heap, vf x) {
    vi h = vi_set1(1);
    for (int level = 0; level < 4; ++level) {
        vi twice = vi_add(h, h);
        h = vi_inc_if(twice, vf_lt(vf_lookup16(heap, h), x));
    }
    vi c = vi_blend(vf_isnan(x), vi_add(h, vi_set1(-16)), vi_set1(cb->nbounds));
    return cb->identity ? c : vi_lookup16(cb->index, c);
}

KB_INLINE void quantize4_block_dt(const void *x, const int dt, int64_t i0, int64_t i1, float scale,
                                  const kb_codebook *cb, int32_t zero_code, uint8_t *packed) {
    const int64_t len = i1 - i0;
    int64_t i = 0;
#if KB_W > 1
    const vf s = vf_set1(scale);
    const vtab16 heap = vtab16_load(cb->tree16);
    for (; i + KB_W <= len; i += KB_W)
        vi_store_nibble_pairs(packed + i / 2, code4_lanes(cb, heap, vf_mul(vf_load_dt(x, dt, i0 + i), s)));
#endif
    for (; i < len; i += 2) {
        const int32_t high = code4_one(cb, load1_dt(x, dt, i0 + i) * scale);
        const int32_t low = i + 1 < len ? code4_one(cb, load1_dt(x, dt, i0 + i + 1) * scale) : zero_code;
        packed[i / 2] = (uint8_t)((high << 4) | low); /* an odd count pads with zero's code */
    }
}

KB_INLINE void quantize4_blocks_dt(const void *x, const int dt, int64_t n, int64_t bs, int64_t b0, int64_t b1,
                                   const kb_codebook *cb, float *absmax, uint8_t *packed) {
    const int32_t zero_code = code4_one(cb, 0.0f);
    for (int64_t b = b0; b < b1; ++b) {
        int64_t i0 = b * bs, i1 = KB_MIN(n, i0 + bs);
        float am = absmax_seg(x, dt, i0, i1);
        absmax[b] = am;
        quantize4_block_dt(x, dt, i0, i1, reciprocal_or_zero(am), cb, zero_code, packed + i0 / 2);
    }
}

static void quantize4_blocks(const void *x, int dtype, int64_t n, int64_t bs, int64_t b0, int64_t b1,
                             const kb_codebook *cb, float *absmax, uint8_t *packed) {
    KB_DTYPE_SWITCH(dtype, quantize4_blocks_dt(x, DT, n, bs, b0, b1, cb, absmax, packed));
}

KB_INLINE uint8_t nibble_at(const uint8_t *packed, int64_t i) {
    uint8_t byte = packed[i >> 1];
    return (i & 1) ? (uint8_t)(byte & 15u) : (uint8_t)(byte >> 4);
}

#if KB_W == 16
/* 16-bit outputs, 32 elements per step: a block's 16 values (table * absmax in float32,
 * rounded once to the output dtype exactly as a single value would be) are written twice
 * into one register, and a word permute looks the codes up. The codes of 16 packed bytes
 * are put in order as words (each byte twice, the even element's copy shifted right by 4;
 * the permute reads an index's low 5 bits, so the odd element's copy needs no mask). */
static const int16_t BYTE_TWICE[32] = {0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7,
                                       8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15};
static const int16_t LOW_WORDS_TWICE[32] = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30,
                                            0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};

KB_INLINE __m512i words_table(__m512 values, const int dt) {
    if (dt == KB_F16) {
        const __m256i halves = _mm512_cvtps_ph(values, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        return _mm512_inserti64x4(_mm512_castsi256_si512(halves), halves, 1);
    }
    /* bfloat16: round to nearest even in integers (vcvtneps2bf16 would flush subnormals) */
    const __m512i u = _mm512_castps_si512(values);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
    const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    const __m512i bits = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(values, values, _CMP_UNORD_Q), rounded, quiet);
    return _mm512_permutexvar_epi16(_mm512_loadu_si512((const void *)LOW_WORDS_TWICE), bits);
}

KB_INLINE void dequantize4_words(const uint8_t *packed, int64_t i0, int64_t i1, int64_t bs, const float *table,
                                 const float *absmax, uint16_t *out, const int dt) {
    const __m512 values = _mm512_loadu_ps(table);
    const __m512i twice = _mm512_loadu_si512((const void *)BYTE_TWICE);
    const __m512i shifts = _mm512_set1_epi32(4); /* 4 in the even words, 0 in the odd ones */
    const int shift = __builtin_ctzll((unsigned long long)bs);
    int64_t i = i0;
    while (i < i1) {
        const int64_t b = i >> shift, end = KB_MIN(i1, (b + 1) << shift);
        const __m512i tab = words_table(_mm512_mul_ps(values, _mm512_set1_ps(absmax[b])), dt);
        for (; i + 32 <= end; i += 32) { /* i is even: i0 is, and so are block starts */
            const __m512i bytes = _mm512_castsi256_si512(_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(packed + i / 2))));
            const __m512i codes = _mm512_srlv_epi16(_mm512_permutexvar_epi16(twice, bytes), shifts);
            _mm512_storeu_si512((void *)(out + i), _mm512_permutexvar_epi16(codes, tab));
        }
        const float a = absmax[b];
        for (; i < end; ++i) store1_dt(out, dt, i, table[nibble_at(packed, i)] * a);
    }
}

/* float32 output, 32 elements per step: the block's 16 values table * absmax, looked up by
 * a float permute (which reads an index's low 4 bits: the odd element's byte needs no mask). */
KB_INLINE void dequantize4_floats(const uint8_t *packed, int64_t i0, int64_t i1, int64_t bs, const float *table,
                                  const float *absmax, float *out) {
    const __m512 values = _mm512_loadu_ps(table);
    const __m512i shifts = _mm512_set_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
    const int shift = __builtin_ctzll((unsigned long long)bs);
    int64_t i = i0;
    while (i < i1) {
        const int64_t b = i >> shift, end = KB_MIN(i1, (b + 1) << shift);
        const __m512 tab = _mm512_mul_ps(values, _mm512_set1_ps(absmax[b]));
        for (; i + 32 <= end; i += 32) {
            const __m128i bytes = _mm_loadu_si128((const __m128i *)(packed + i / 2));
            const __m512i first = _mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(bytes, bytes)), shifts);
            const __m512i second = _mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(bytes, bytes)), shifts);
            _mm512_storeu_ps(out + i, _mm512_permutexvar_ps(first, tab));
            _mm512_storeu_ps(out + i + 16, _mm512_permutexvar_ps(second, tab));
        }
        const float a = absmax[b];
        for (; i < end; ++i) out[i] = table[nibble_at(packed, i)] * a;
    }
}
#endif

KB_INLINE void dequantize4_dt(const uint8_t *packed, int64_t i0, int64_t i1, int64_t bs, const float *table,
                              const float *absmax, void *out, const int dt) {
#if KB_W == 16
    if (dt != KB_F32) {
        dequantize4_words(packed, i0, i1, bs, table, absmax, (uint16_t *)out, dt);
        return;
    }
    dequantize4_floats(packed, i0, i1, bs, table, absmax, (float *)out);
    return;
#endif
#if KB_W > 1
    const vtab16 tab = vtab16_load(table);
#endif
    const int shift = __builtin_ctzll((unsigned long long)bs); /* blocksizes are powers of two */
    int64_t i = i0;
    while (i < i1) {
        const int64_t b = i >> shift, end = KB_MIN(i1, (b + 1) << shift);
        const float a = absmax[b];
#if KB_W > 1
        /* i is even here (i0 is, and blocks start at multiples of the even blocksize) */
        const vf av = vf_set1(a);
        for (; i + KB_W <= end; i += KB_W)
            vf_store_dt(out, dt, i, vf_mul(vf_lookup16(tab, vi_load_nibbles(packed + i / 2)), av));
#endif
        for (; i < end; ++i) store1_dt(out, dt, i, table[nibble_at(packed, i)] * a);
    }
}

static void dequantize4(const uint8_t *packed, int64_t i0, int64_t i1, int64_t bs, const float *table,
                        const float *absmax, void *out, int dtype) {
    KB_DTYPE_SWITCH(dtype, dequantize4_dt(packed, i0, i1, bs, table, absmax, out, DT));
}

/* ----------------------------------------------------------------------- 4-bit matmul */
/* out[m, o] = sum_k A[m, k] * W[o, k] (+ bias[o]), W[o, k] = table[code] * absmax[block]
 * decoded on the fly from the packed weight: the float weight never exists in memory.
 *
 * api.c first copies A, once per call, into the layout the kernel reads (gemm4_pack_a),
 * then splits the output features between threads. gemm4_layout alone picks the layout
 * from the call's shape and dtype, so packing and multiplying always agree:
 *
 *   A_ROWS         float32, row-major as given: any shape, element by element (K odd, or
 *                  not a multiple of the vector chunk).
 *   A_F32_PAIRS    float32, chunk-major: for chunk c of 2 * KB_W elements and row m, KB_W
 *                  even elements then KB_W odd ones at [(c * M + m) * 2 * KB_W]. A packed
 *                  byte's high nibble (element 2j) meets the even half and its low nibble
 *                  (2j + 1) the odd half, so KB_W bytes give 2 * KB_W weights with one load,
 *                  one shift, one mask and two 16-entry lookups; and every row of A an
 *                  iteration reads is in one contiguous block (rows K floats apart would
 *                  alias in the L1 cache).
 *   A_F32_OCTETS   (16 lanes) one float32 row, a matrix-vector product, in chunks of 128
 *                  elements as eight vectors of 16: vector v, lane i holds element
 *                  8i + OCTET_ELEMENT[v]. A 64-byte load of a weight row holds in 32-bit
 *                  lane i the 8 codes of elements 8i .. 8i + 7, and the 16-entry float
 *                  permute reads only an index's low 4 bits, so shifting the load by 4v
 *                  bits gives lookup v with no mask.
 *
 * With the AVX512_BF16 dot product (vdpbf16ps: 32 bfloat16 products summed pairwise into
 * 16 float32 lanes per instruction) bfloat16 rows of A meet weights decoded straight to
 * bfloat16 by a word permute (vpermw) of the table written twice, which reads an index's
 * low 5 bits: the neighbouring nibble's lowest bit then needs no mask either.
 *
 *   A_BF16_QUADS   one bfloat16 row, chunks of 128 elements as four vectors of 32: vector
 *                  q holds elements 4j + q. Word j of a 64-byte weight load holds bytes 2j
 *                  and 2j + 1, elements 4j .. 4j + 3: four lookups, one per shift, against
 *                  the unscaled table rounded to bfloat16.
 *   A_BF16_PAIRS   bfloat16 rows, the even/odd split of A_F32_PAIRS in chunks of 64
 *                  elements (32 bytes of a weight row zero-extended to words). Each weight
 *                  row's table is multiplied by the block's absmax in float32 and rounded to
 *                  bfloat16 once per block: the weights are the bfloat16 values the
 *                  reference multiplies, and each is used by up to four rows of A.
 *
 * The one-row layouts sum a chunk unscaled: float lane i of a sum covers elements
 * 8i .. 8i + 7 of the chunk, all in one block, and is multiplied by that block's absmax
 * (chunk_scale). Products of bfloat16 values are exact in float32; vdpbf16ps sums them in
 * float32, rounding to nearest even and treating subnormal inputs and results as zero.
 * A_BF16_QUADS's table rounding is a relative error below 2^-9 per weight, the size of
 * the reference's own rounding of the weight to bfloat16 (docs/cpu.md: measured). */
enum { A_ROWS, A_F32_PAIRS, A_F32_OCTETS, A_BF16_QUADS, A_BF16_PAIRS };

#if KB_W == 16 && defined(__AVX512BF16__)
#define KB_BF16_DOT 1
#else
#define KB_BF16_DOT 0
#endif

static int gemm4_layout(int64_t M, int64_t K, int a_dtype) {
#if KB_W == 16
    if (M == 1 && K % 128 == 0) return KB_BF16_DOT && a_dtype == KB_BF16 ? A_BF16_QUADS : A_F32_OCTETS;
#endif
#if KB_BF16_DOT
    if (a_dtype == KB_BF16 && K % 64 == 0) return A_BF16_PAIRS;
#endif
    (void)M;
    (void)a_dtype;
    return K % (2 * KB_W) == 0 ? A_F32_PAIRS : A_ROWS;
}

static int64_t gemm4_packed_a_bytes(int64_t M, int64_t K, int a_dtype) {
    const int layout = gemm4_layout(M, K, a_dtype);
    return M * K * (layout == A_BF16_QUADS || layout == A_BF16_PAIRS ? 2 : 4);
}

/* A_F32_OCTETS: the element of a 32-bit lane's 8 that lookup v (shift 4v) decodes. */
static const int OCTET_ELEMENT[8] = {1, 0, 3, 2, 5, 4, 7, 6};

/* Where element (m, i) of A goes in ``layout``. */
KB_INLINE int64_t packed_a_index(int layout, int64_t M, int64_t K, int64_t m, int64_t i) {
    switch (layout) {
    case A_F32_PAIRS: {
        const int64_t chunk = 2 * KB_W, c = i / chunk, j = i % chunk;
        return (c * M + m) * chunk + (j & 1) * KB_W + j / 2;
    }
    case A_F32_OCTETS: {
        const int64_t j = i % 128;
        int v = 0;
        while (OCTET_ELEMENT[v] != j % 8) ++v;
        return (i - j) + v * 16 + j / 8;
    }
    case A_BF16_QUADS: return (i / 128) * 128 + (i % 4) * 32 + (i % 128) / 4;
    case A_BF16_PAIRS: {
        const int64_t c = i / 64, j = i % 64;
        return (c * M + m) * 64 + (j & 1) * 32 + j / 2;
    }
    default: return m * K + i;
    }
}

static void gemm4_pack_a(const void *A, int a_dtype, int64_t M, int64_t K, void *packed_a) {
    const int layout = gemm4_layout(M, K, a_dtype);
    if (layout == A_BF16_QUADS || layout == A_BF16_PAIRS) { /* bfloat16 A, copied as it is */
        const uint16_t *from = (const uint16_t *)A;
        uint16_t *to = (uint16_t *)packed_a;
        for (int64_t m = 0; m < M; ++m)
            for (int64_t i = 0; i < K; ++i) to[packed_a_index(layout, M, K, m, i)] = from[m * K + i];
        return;
    }
    float *to = (float *)packed_a;
    for (int64_t m = 0; m < M; ++m)
        for (int64_t i = 0; i < K; ++i) to[packed_a_index(layout, M, K, m, i)] = load1_dt(A, a_dtype, m * K + i);
}

/* Store one result, the bias (out's dtype, or NULL) added first, before the one rounding. */
KB_INLINE void store_result(void *out, const int odt, int64_t at, float sum, const void *bias, int64_t o) {
    if (bias) sum += load1_dt(bias, odt, o);
    store1_dt(out, odt, at, sum);
}

/* A_F32_PAIRS: a register tile of ROWS weight rows by BATCH rows of A is accumulated at once,
 * so each decoded weight is used BATCH times and each loaded activation ROWS times. */
KB_INLINE void gemm4_tile(const float *A, int64_t M, int64_t K, const uint8_t *packed, const float *absmax, int64_t bs,
                          vtab16 tab, int64_t o, int64_t m0, const int ROWS, const int BATCH, int64_t N, const void *bias,
                          void *out, const int odt) {
    const int64_t half = K / 2;
    const int shift = __builtin_ctzll((unsigned long long)bs); /* blocksizes are powers of two */
    vf acc[4][4];
    for (int r = 0; r < ROWS; ++r)
        for (int b = 0; b < BATCH; ++b) acc[r][b] = vf_zero();
    const vi low4 = vi_set1(15);
    for (int64_t kb = 0; kb < half; kb += KB_W) { /* kb: byte offset within a row */
        vf even[4], odd[4];
        for (int r = 0; r < ROWS; ++r) {
            const int64_t first = (o + r) * K + 2 * kb; /* flat index of the chunk's first element */
            const vi bytes = vi_load_u8(packed + first / 2);
            const vf scale = vf_set1(absmax[first >> shift]);
            even[r] = vf_mul(vf_lookup16(tab, vi_srli(bytes, 4)), scale);
            odd[r] = vf_mul(vf_lookup16(tab, vi_and(bytes, low4)), scale);
        }
        const float *chunk = A + ((kb / KB_W) * M + m0) * 2 * KB_W;
        for (int b = 0; b < BATCH; ++b) {
            const vf a_even = vf_load(chunk + b * 2 * KB_W), a_odd = vf_load(chunk + b * 2 * KB_W + KB_W);
            for (int r = 0; r < ROWS; ++r) acc[r][b] = vf_fmadd(odd[r], a_odd, vf_fmadd(even[r], a_even, acc[r][b]));
        }
    }
    for (int r = 0; r < ROWS; ++r)
        for (int b = 0; b < BATCH; ++b) store_result(out, odt, (m0 + b) * N + o + r, vf_reduce_add(acc[r][b]), bias, o + r);
}

/* A_ROWS: element by element. */
static void gemm4_general(const float *A, int64_t M, int64_t K, const uint8_t *packed, const float *absmax, int64_t bs,
                          const float *table, int64_t o0, int64_t o1, int64_t N, const void *bias, void *out, int odt) {
    for (int64_t o = o0; o < o1; ++o)
        for (int64_t m = 0; m < M; ++m) {
            float sum = 0.0f;
            for (int64_t k = 0; k < K; ++k) {
                const int64_t flat = o * K + k;
                sum += A[m * K + k] * (table[nibble_at(packed, flat)] * absmax[flat / bs]);
            }
            store_result(out, odt, m * N + o, sum, bias, o);
        }
}

#define KB_GEMM_ROWS 4

#define KB_GEMV_ROWS 8

/* A_F32_PAIRS with one row of A (instruction sets without A_F32_OCTETS): ROWS weight rows
 * at a time, the products of a block summed unscaled and multiplied by the block's scale
 * once. Blocks are whole chunks (the blocksize is a multiple of 2 * KB_W). */
KB_INLINE void gemv4_tile(const float *A, int64_t K, const uint8_t *packed, const float *absmax, int64_t bs,
                          vtab16 tab, int64_t o, const int ROWS, const void *bias, void *out, const int odt) {
    const int64_t half = K / 2, block_bytes = bs / 2;
    const int shift = __builtin_ctzll((unsigned long long)bs);
    const vi low4 = vi_set1(15);
    vf acc[KB_GEMV_ROWS];
    for (int r = 0; r < ROWS; ++r) acc[r] = vf_zero();
    for (int64_t start = 0; start < half; start += block_bytes) {
        vf sum[KB_GEMV_ROWS];
        for (int r = 0; r < ROWS; ++r) sum[r] = vf_zero();
        for (int64_t kb = start; kb < start + block_bytes; kb += KB_W) {
            const float *chunk = A + (kb / KB_W) * 2 * KB_W;
            const vf a_even = vf_load(chunk), a_odd = vf_load(chunk + KB_W);
            for (int r = 0; r < ROWS; ++r) {
                const vi bytes = vi_load_u8(packed + (o + r) * half + kb);
                sum[r] = vf_fmadd(vf_lookup16(tab, vi_srli(bytes, 4)), a_even, sum[r]);
                sum[r] = vf_fmadd(vf_lookup16(tab, vi_and(bytes, low4)), a_odd, sum[r]);
            }
        }
        for (int r = 0; r < ROWS; ++r)
            acc[r] = vf_fmadd(sum[r], vf_set1(absmax[((o + r) * K + 2 * start) >> shift]), acc[r]);
    }
    for (int r = 0; r < ROWS; ++r) store_result(out, odt, o + r, vf_reduce_add(acc[r]), bias, o + r);
}

KB_INLINE void gemm4_rows_batch(const float *A, int64_t M, int64_t K, const uint8_t *packed, const float *absmax,
                                int64_t bs, vtab16 tab, int64_t o, const int ROWS, int64_t N, const void *bias, void *out,
                                int odt) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) gemm4_tile(A, M, K, packed, absmax, bs, tab, o, m, ROWS, 4, N, bias, out, odt);
    switch (M - m) {
    case 3: gemm4_tile(A, M, K, packed, absmax, bs, tab, o, m, ROWS, 3, N, bias, out, odt); break;
    case 2: gemm4_tile(A, M, K, packed, absmax, bs, tab, o, m, ROWS, 2, N, bias, out, odt); break;
    case 1: gemm4_tile(A, M, K, packed, absmax, bs, tab, o, m, ROWS, 1, N, bias, out, odt); break;
    default: break;
    }
}

static void gemm4_pairs(const float *A, int64_t M, int64_t K, const uint8_t *packed, const float *absmax, int64_t bs,
                        const float *table, int64_t o0, int64_t o1, int64_t N, const void *bias, void *out, int odt) {
    const vtab16 tab = vtab16_load(table);
    int64_t o = o0;
    if (M == 1 && K % bs == 0 && bs % (2 * KB_W) == 0) { /* blocks never straddle rows or chunks */
        for (; o + KB_GEMV_ROWS <= o1; o += KB_GEMV_ROWS)
            gemv4_tile(A, K, packed, absmax, bs, tab, o, KB_GEMV_ROWS, bias, out, odt);
        for (; o < o1; ++o) gemv4_tile(A, K, packed, absmax, bs, tab, o, 1, bias, out, odt);
        return;
    }
    /* 4 weight rows x 4 rows of A: wider batch tiles re-read more activations per decoded
     * weight than the caches deliver (measured: 2 x 8 was 35% slower at batch 16). */
    for (; o + KB_GEMM_ROWS <= o1; o += KB_GEMM_ROWS)
        gemm4_rows_batch(A, M, K, packed, absmax, bs, tab, o, KB_GEMM_ROWS, N, bias, out, odt);
    for (; o < o1; ++o) gemm4_rows_batch(A, M, K, packed, absmax, bs, tab, o, 1, N, bias, out, odt);
}

#if KB_W == 16
/* ----------------------------------------------------- one row of A, 128-element chunks */
/* Which block each float lane of a chunk's sum lies in: with blocks of 128 or more the
 * whole chunk is in one (``whole``); with 64 or 32, lane i is in the chunk's first block
 * plus lane_block[i] = 8i >> shift, ``nblocks`` (a mask of 2 or 4) blocks in all. A chunk
 * starts at a multiple of 128 (K is one), so it never straddles a block boundary otherwise. */
typedef struct {
    int shift, whole;
    __m512i lane_block;
    __mmask16 nblocks;
} chunk_blocks;

KB_INLINE chunk_blocks chunk_blocks_for(int64_t bs) {
    chunk_blocks cb;
    cb.shift = __builtin_ctzll((unsigned long long)bs);
    cb.whole = bs >= 128;
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    cb.lane_block = _mm512_srlv_epi32(_mm512_slli_epi32(lane, 3), _mm512_set1_epi32(cb.shift));
    cb.nblocks = cb.whole ? (__mmask16)1 : (__mmask16)((1u << (128 >> cb.shift)) - 1u);
    return cb;
}

/* The absmax of each float lane of the chunk starting at flat element ``first``. The masked
 * load never reads past the chunk's own blocks (the last chunk's are the array's end). */
KB_INLINE __m512 chunk_scale(const float *absmax, int64_t first, const chunk_blocks *cb, const int WHOLE) {
    const float *scales = absmax + (first >> cb->shift);
    if (WHOLE) return _mm512_set1_ps(*scales);
    return _mm512_permutexvar_ps(cb->lane_block, _mm512_castps128_ps512(_mm_maskz_loadu_ps(cb->nblocks, scales)));
}

/* A_F32_OCTETS: sum over one chunk of one weight row, as 16 lanes (two dependency chains). */
KB_INLINE __m512 dot_octets(const uint8_t *bytes, __m512 tab, const __m512 x[8]) {
    __m512i w = _mm512_loadu_epi32((const void *)bytes);
    __asm__("" : "+v"(w)); /* in a register: GCC 12 would copy it to the stack and shift from there */
    __m512 even = _mm512_mul_ps(_mm512_permutexvar_ps(w, tab), x[0]);
    __m512 odd = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(w, 4), tab), x[1]);
    even = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(w, 8), tab), x[2], even);
    odd = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(w, 12), tab), x[3], odd);
    even = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(w, 16), tab), x[4], even);
    odd = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(w, 20), tab), x[5], odd);
    even = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(w, 24), tab), x[6], even);
    odd = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(w, 28), tab), x[7], odd);
    return _mm512_add_ps(even, odd);
}

#if KB_BF16_DOT
/* ----------------------------------------------------- bfloat16 products (AVX512_BF16) */
KB_INLINE __m512 dot_bf16(__m512 acc, __m512i a, __m512i b) { return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b); }

/* The 16 float32 values of ``table`` times ``scale`` (rounded once in float32) in
 * bfloat16, written twice: a vpermw table that ignores an index's fifth bit. Rounded to
 * nearest even as torch casts (vcvtne2ps2bf16 flushes a subnormal to zero). */
KB_INLINE __m512i bf16_table(__m512 table, float scale) {
    const __m512 v = _mm512_mul_ps(table, _mm512_set1_ps(scale));
    return (__m512i)_mm512_cvtne2ps_pbh(v, v);
}

/* A_BF16_QUADS: sum over one chunk of one weight row. (loadu_epi16: with loadu_si512 GCC
 * 12 copies the vector through the stack before the word shifts.) */
KB_INLINE __m512 dot_quads(const uint8_t *bytes, __m512i tab, const __m512i x[4]) {
    const __m512i w = _mm512_loadu_epi16((const void *)bytes);
    __m512 sum = dot_bf16(_mm512_setzero_ps(), _mm512_permutexvar_epi16(_mm512_srli_epi16(w, 4), tab), x[0]);
    sum = dot_bf16(sum, _mm512_permutexvar_epi16(w, tab), x[1]);                        /* low nibble of byte 2j */
    sum = dot_bf16(sum, _mm512_permutexvar_epi16(_mm512_srli_epi16(w, 12), tab), x[2]); /* high nibble of 2j + 1 */
    return dot_bf16(sum, _mm512_permutexvar_epi16(_mm512_srli_epi16(w, 8), tab), x[3]); /* low nibble of 2j + 1 */
}
#endif /* KB_BF16_DOT */

/* What one row of A holds for a 128-element chunk: eight float32 vectors (A_F32_OCTETS)
 * or four bfloat16 ones (A_BF16_QUADS). */
typedef struct {
    __m512 floats[8];
    __m512i words[4];
} chunk_a;

KB_INLINE chunk_a load_chunk(const void *A, int64_t first, const int BF16) {
    chunk_a x;
    if (BF16)
        for (int q = 0; q < 4; ++q) x.words[q] = _mm512_loadu_si512((const void *)((const uint16_t *)A + first + 32 * q));
    else
        for (int v = 0; v < 8; ++v) x.floats[v] = _mm512_loadu_ps((const float *)A + first + 16 * v);
    return x;
}

/* The unscaled sum over one chunk of one weight row: 16 lanes of 8 products each. */
KB_INLINE __m512 dot_chunk(const uint8_t *bytes, __m512 floats, __m512i words, const chunk_a *x, const int BF16) {
#if KB_BF16_DOT
    if (BF16) return dot_quads(bytes, words, x->words);
#else
    (void)words;
    (void)BF16;
#endif
    return dot_octets(bytes, floats, x->floats);
}

/* ROWS weight rows against one row of A. The accumulators are named variables: GCC keeps an
 * array of them in memory across this loop. */
KB_INLINE void gemv4_chunks_tile(const void *A, const int BF16, int64_t K, const uint8_t *packed, const float *absmax,
                                 const chunk_blocks *cb, const int WHOLE, __m512 floats, __m512i words, int64_t o,
                                 const int ROWS, const void *bias, void *out, const int odt) {
    const int64_t half = K / 2;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
    for (int64_t kb = 0; kb < half; kb += 64) {
        const chunk_a x = load_chunk(A, 2 * kb, BF16);
        for (int r = 0; r < ROWS; ++r) {
            const __m512 sum = dot_chunk(packed + (o + r) * half + kb, floats, words, &x, BF16);
            const __m512 scale = chunk_scale(absmax, (o + r) * K + 2 * kb, cb, WHOLE);
            if (r == 0) acc0 = _mm512_fmadd_ps(sum, scale, acc0);
            if (r == 1) acc1 = _mm512_fmadd_ps(sum, scale, acc1);
            if (r == 2) acc2 = _mm512_fmadd_ps(sum, scale, acc2);
            if (r == 3) acc3 = _mm512_fmadd_ps(sum, scale, acc3);
        }
    }
    const __m512 acc[4] = {acc0, acc1, acc2, acc3};
    for (int r = 0; r < ROWS; ++r) store_result(out, odt, o + r, _mm512_reduce_add_ps(acc[r]), bias, o + r);
}

KB_INLINE void gemv4_chunks_rows(const void *A, const int BF16, int64_t K, const uint8_t *packed, const float *absmax,
                                 const chunk_blocks *cb, const int WHOLE, __m512 floats, __m512i words, int64_t o0,
                                 int64_t o1, const void *bias, void *out, int odt) {
    int64_t o = o0;
    for (; o + 4 <= o1; o += 4) gemv4_chunks_tile(A, BF16, K, packed, absmax, cb, WHOLE, floats, words, o, 4, bias, out, odt);
    for (; o < o1; ++o) gemv4_chunks_tile(A, BF16, K, packed, absmax, cb, WHOLE, floats, words, o, 1, bias, out, odt);
}

/* A_F32_OCTETS (BF16 = 0) and A_BF16_QUADS (BF16 = 1). */
KB_INLINE void gemv4_chunks(const void *A, const int BF16, int64_t K, const uint8_t *packed, const float *absmax,
                            int64_t bs, const float *table, int64_t o0, int64_t o1, const void *bias, void *out, int odt) {
    const chunk_blocks cb = chunk_blocks_for(bs);
    const __m512 floats = _mm512_loadu_ps(table);
#if KB_BF16_DOT
    const __m512i words = bf16_table(floats, 1.0f);
#else
    const __m512i words = _mm512_setzero_si512();
#endif
    if (cb.whole) gemv4_chunks_rows(A, BF16, K, packed, absmax, &cb, 1, floats, words, o0, o1, bias, out, odt);
    else gemv4_chunks_rows(A, BF16, K, packed, absmax, &cb, 0, floats, words, o0, o1, bias, out, odt);
}
#endif /* KB_W == 16 */

#if KB_BF16_DOT
/* A_BF16_PAIRS: a tile of ROWS weight rows by BATCH rows of A. A 64-element chunk lies in
 * one block when the blocksize is 64 or more; with blocks of 32 its two halves (words 0-15
 * and 16-31 after zero-extension) take their own tables. */
KB_INLINE void gemm4_bf16_tile(const uint16_t *A, int64_t M, int64_t K, const uint8_t *packed, const float *absmax,
                               int64_t bs, __m512 table, int64_t o, int64_t m0, const int ROWS, const int BATCH, int64_t N,
                               const void *bias, void *out, const int odt) {
    const int shift = __builtin_ctzll((unsigned long long)bs);
    const __mmask32 upper = 0xffff0000u;
    __m512 acc[4][4];
    __m512i tab[4], tab2[4];
    for (int r = 0; r < ROWS; ++r) {
        tab[r] = tab2[r] = _mm512_setzero_si512();
        for (int b = 0; b < BATCH; ++b) acc[r][b] = _mm512_setzero_ps();
    }
    for (int64_t c = 0; c < K / 64; ++c) {
        __m512i even[4], odd[4];
        for (int r = 0; r < ROWS; ++r) {
            const int64_t first = (o + r) * K + 64 * c;
            if (bs == 32) {
                tab[r] = bf16_table(table, absmax[first >> 5]);
                tab2[r] = bf16_table(table, absmax[(first >> 5) + 1]);
            } else if (c == 0 || (first & (bs - 1)) == 0) {
                tab[r] = bf16_table(table, absmax[first >> shift]);
            }
            const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(packed + (first >> 1))));
            const __m512i high = _mm512_srli_epi16(w, 4);
            even[r] = _mm512_permutexvar_epi16(high, tab[r]);
            odd[r] = _mm512_permutexvar_epi16(w, tab[r]);
            if (bs == 32) {
                even[r] = _mm512_mask_permutexvar_epi16(even[r], upper, high, tab2[r]);
                odd[r] = _mm512_mask_permutexvar_epi16(odd[r], upper, w, tab2[r]);
            }
        }
        const uint16_t *chunk = A + (c * M + m0) * 64;
        for (int b = 0; b < BATCH; ++b) {
            const __m512i a_even = _mm512_loadu_si512((const void *)(chunk + b * 64));
            const __m512i a_odd = _mm512_loadu_si512((const void *)(chunk + b * 64 + 32));
            for (int r = 0; r < ROWS; ++r) acc[r][b] = dot_bf16(dot_bf16(acc[r][b], even[r], a_even), odd[r], a_odd);
        }
    }
    for (int r = 0; r < ROWS; ++r)
        for (int b = 0; b < BATCH; ++b)
            store_result(out, odt, (m0 + b) * N + o + r, _mm512_reduce_add_ps(acc[r][b]), bias, o + r);
}

KB_INLINE void gemm4_bf16_rows(const uint16_t *A, int64_t M, int64_t K, const uint8_t *packed, const float *absmax,
                               int64_t bs, __m512 table, int64_t o, const int ROWS, int64_t N, const void *bias,
                               void *out, int odt) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) gemm4_bf16_tile(A, M, K, packed, absmax, bs, table, o, m, ROWS, 4, N, bias, out, odt);
    switch (M - m) {
    case 3: gemm4_bf16_tile(A, M, K, packed, absmax, bs, table, o, m, ROWS, 3, N, bias, out, odt); break;
    case 2: gemm4_bf16_tile(A, M, K, packed, absmax, bs, table, o, m, ROWS, 2, N, bias, out, odt); break;
    case 1: gemm4_bf16_tile(A, M, K, packed, absmax, bs, table, o, m, ROWS, 1, N, bias, out, odt); break;
    default: break;
    }
}

static void gemm4_bf16_pairs(const uint16_t *A, int64_t M, int64_t K, const uint8_t *packed, const float *absmax,
                             int64_t bs, const float *table, int64_t o0, int64_t o1, int64_t N, const void *bias,
                             void *out, int odt) {
    const __m512 values = _mm512_loadu_ps(table);
    int64_t o = o0;
    for (; o + KB_GEMM_ROWS <= o1; o += KB_GEMM_ROWS)
        gemm4_bf16_rows(A, M, K, packed, absmax, bs, values, o, KB_GEMM_ROWS, N, bias, out, odt);
    for (; o < o1; ++o) gemm4_bf16_rows(A, M, K, packed, absmax, bs, values, o, 1, N, bias, out, odt);
}
#endif /* KB_BF16_DOT */

static void gemm4(const void *packed_a, int a_dtype, int64_t M, int64_t K, const uint8_t *packed, const float *absmax,
                  int64_t bs, const float *table, int64_t o0, int64_t o1, int64_t N, const void *bias, void *out, int odt) {
    switch (gemm4_layout(M, K, a_dtype)) {
#if KB_BF16_DOT
    case A_BF16_QUADS:
        gemv4_chunks(packed_a, 1, K, packed, absmax, bs, table, o0, o1, bias, out, odt);
        return;
    case A_BF16_PAIRS:
        gemm4_bf16_pairs((const uint16_t *)packed_a, M, K, packed, absmax, bs, table, o0, o1, N, bias, out, odt);
        return;
#endif
#if KB_W == 16
    case A_F32_OCTETS:
        gemv4_chunks(packed_a, 0, K, packed, absmax, bs, table, o0, o1, bias, out, odt);
        return;
#endif
    case A_F32_PAIRS:
        gemm4_pairs((const float *)packed_a, M, K, packed, absmax, bs, table, o0, o1, N, bias, out, odt);
        return;
    default:
        gemm4_general((const float *)packed_a, M, K, packed, absmax, bs, table, o0, o1, N, bias, out, odt);
        return;
    }
}

/* ============================================================================= int8 */
/* Row-wise int8: stat = max |a| over the row's inliers; code = round_half_even(a * 127 /
 * stat) computed as (a * 127) / stat in float32 (a zero stat divides by 1, NaN gives 0);
 * outliers (|a| >= threshold, threshold > 0) count as 0, and columns marked in colmask
 * are zeroed. */
KB_INLINE void int8_quant_rows_dt(const void *A, const int dt, int64_t r0, int64_t r1, int64_t K, float threshold,
                                  const uint8_t *colmask, int8_t *codes, float *stats) {
    const int outliers = threshold > 0.0f;
    const vf thr = vf_set1(threshold), zero = vf_zero(), c127 = vf_set1(127.0f);
    const vi magnitude = vi_set1(0x7fffffff);
    for (int64_t r = r0; r < r1; ++r) {
        const int64_t base = r * K;
        vi m = vi_set1(0);
        int64_t k = 0;
        for (; k + KB_W <= K; k += KB_W) {
            vf v = vf_load_dt(A, dt, base + k);
            if (outliers) v = vf_blend(vf_ge(vf_abs(v), thr), v, zero);
            m = vi_max(m, vi_and(vf_bits(v), magnitude));
        }
        int32_t best = vi_reduce_max(m);
        for (; k < K; ++k) {
            float v = load1_dt(A, dt, base + k);
            if (outliers && fabsf(v) >= threshold) v = 0.0f;
            int32_t bits = (int32_t)(kb_bits(v) & 0x7fffffffu);
            if (bits > best) best = bits;
        }
        const float stat = kb_float((uint32_t)best);
        stats[r] = stat;
        const float divisor = stat == 0.0f ? 1.0f : stat;
        const vf d = vf_set1(divisor);
        uint8_t *row = (uint8_t *)(codes + base);
        for (k = 0; k + KB_W <= K; k += KB_W) {
            vf v = vf_load_dt(A, dt, base + k);
            if (outliers) v = vf_blend(vf_ge(vf_abs(v), thr), v, zero);
            vf q = vf_round_even(vf_div(vf_mul(v, c127), d));
            q = vf_blend(vf_isnan(q), q, zero);
            if (colmask) q = vf_blend(vf_gt(vi_to_float(vi_load_u8(colmask + k)), zero), q, zero);
            vi_store_u8(row + k, vf_to_int(q));
        }
        for (; k < K; ++k) {
            float v = load1_dt(A, dt, base + k);
            if (outliers && fabsf(v) >= threshold) v = 0.0f;
            float q = nearbyintf((v * 127.0f) / divisor);
            if (q != q || (colmask && colmask[k])) q = 0.0f;
            codes[base + k] = (int8_t)q;
        }
    }
}

static void int8_quant_rows(const void *A, int dtype, int64_t r0, int64_t r1, int64_t K, float threshold,
                            const uint8_t *colmask, int8_t *codes, float *stats) {
    KB_DTYPE_SWITCH(dtype, int8_quant_rows_dt(A, DT, r0, r1, K, threshold, colmask, codes, stats));
}

static void int8_dequant_rows(const int8_t *A, int64_t r0, int64_t r1, int64_t K, const float *stats, float *out) {
    const vf c127 = vf_set1(127.0f);
    for (int64_t r = r0; r < r1; ++r) {
        const int64_t base = r * K;
        const float s = stats[r];
        const vf sv = vf_set1(s);
        int64_t k = 0;
        for (; k + KB_W <= K; k += KB_W)
            vf_store(out + base + k, vf_div(vf_mul(vi_to_float(vi_load_i8(A + base + k)), sv), c127));
        for (; k < K; ++k) out[base + k] = ((float)A[base + k] * s) / 127.0f;
    }
}

/* ======================================================================= optimizers */
/* One step of every kind (docs/formats.md section 5) in one pass over the data, in float32,
 * following the reference backend's order of operations: torch's lerp (a fused
 * multiply-add on its vector path), add with alpha (also fused), addcmul and addcdiv
 * (unfused). 8-bit states are decoded as qmap[code] * absmax and re-encoded to the
 * nearest code with a fresh absmax, per 256-element block (blockwise) or for the tensor
 * (whole-tensor: a first pass finds the new scales, a second writes). With a trust-ratio
 * limit (max_unorm) a first pass measures ||p|| and ||update|| and the second applies. */

typedef struct {
    vf s1, s1b, s2; /* s1b: AdEMAMix's second first moment */
} vstates;

KB_INLINE vf opt_lerp(vf a, vf b, float w) {
    if (w < 0.5f) return vf_fmadd(vf_set1(w), vf_sub(b, a), a);
    return vf_fmadd(vf_set1(w - 1.0f), vf_sub(b, a), b);
}

KB_INLINE vf opt_sign(vf x) {
    const vf zero = vf_zero();
    return vf_blend(vf_gt(x, zero), vf_blend(vf_lt(x, zero), zero, vf_set1(-1.0f)), vf_set1(1.0f));
}

KB_INLINE int kind_has_den(const int KIND) {
    return KIND == KB_OPT_ADAM || KIND == KB_OPT_LAMB || KIND == KB_OPT_RMSPROP || KIND == KB_OPT_ADAGRAD ||
           KIND == KB_OPT_ADEMAMIX;
}

KB_INLINE int kind_states(const int KIND) {
    return (KIND == KB_OPT_ADAM || KIND == KB_OPT_LAMB || KIND == KB_OPT_ADEMAMIX) ? 2 : 1;
}

/* Update the states of KB_W elements; return the update's numerator (and its denominator
 * in *den when the kind has one). */
KB_INLINE vf opt_rule(const kb_optimizer_step *st, const int KIND, vf g, vstates *s, vf *den) {
    switch (KIND) {
    case KB_OPT_ADAM:
    case KB_OPT_LAMB:
        s->s1 = opt_lerp(s->s1, g, st->one_minus_beta1);
        s->s2 = vf_add(vf_mul(s->s2, vf_set1(st->beta2)), vf_mul(vf_mul(vf_set1(st->one_minus_beta2), g), g));
        *den = vf_add(vf_sqrt(s->s2), vf_set1(st->eps_scaled));
        return s->s1;
    case KB_OPT_MOMENTUM:
    case KB_OPT_LARS:
        s->s1 = st->first_step ? g : vf_add(vf_mul(s->s1, vf_set1(st->beta1)), g);
        return s->s1;
    case KB_OPT_LION: {
        /* the sign uses the momentum before this step's update */
        vf sign = opt_sign(vf_fmadd(vf_set1(st->one_minus_beta1), g, vf_mul(s->s1, vf_set1(st->beta1))));
        s->s1 = opt_lerp(s->s1, g, st->one_minus_beta2);
        return sign;
    }
    case KB_OPT_RMSPROP:
        s->s1 = vf_add(vf_mul(s->s1, vf_set1(st->beta1)), vf_mul(vf_mul(vf_set1(st->one_minus_beta1), g), g));
        *den = vf_add(vf_sqrt(s->s1), vf_set1(st->eps));
        return g;
    case KB_OPT_ADAGRAD:
        s->s1 = vf_add(s->s1, vf_mul(g, g));
        *den = vf_add(vf_sqrt(s->s1), vf_set1(st->eps));
        return g;
    default: /* KB_OPT_ADEMAMIX */
        s->s1 = opt_lerp(s->s1, g, st->one_minus_beta1);
        s->s1b = opt_lerp(s->s1b, g, st->one_minus_beta3);
        s->s2 = vf_add(vf_mul(s->s2, vf_set1(st->beta2)), vf_mul(vf_mul(vf_set1(st->one_minus_beta2), g), g));
        *den = vf_add(vf_div(vf_sqrt(s->s2), vf_set1(st->c2)), vf_set1(st->eps));
        return vf_fmadd(vf_set1(st->inv_c1), s->s1, vf_mul(s->s1b, vf_set1(st->alpha)));
    }
}

/* The gradient the rule reads: scaled, plus L2 weight decay for the kinds that use it. */
KB_INLINE vf opt_working_grad(const kb_optimizer_step *st, vf g, vf p) {
    if (st->has_gnorm_scale) g = vf_mul(g, vf_set1(st->gnorm_scale));
    if (st->has_weight_decay && !st->decoupled_decay) g = vf_fmadd(vf_set1(st->weight_decay), p, g);
    return g;
}

/* The materialised update (trust-ratio path): (num / den) * factor. */
KB_INLINE vf opt_update(const kb_optimizer_step *st, const int KIND, vf num, vf den) {
    vf u = kind_has_den(KIND) ? vf_div(num, den) : num;
    return vf_mul(u, vf_set1(st->update_factor));
}

/* The new parameter. */
KB_INLINE vf opt_param(const kb_optimizer_step *st, const int KIND, vf p, vf num, vf den) {
    if (st->has_weight_decay && st->decoupled_decay) p = vf_mul(p, vf_set1(st->decay));
    if (st->use_update_scale)
        return vf_add(p, vf_mul(vf_mul(vf_set1(st->neg_lr), opt_update(st, KIND, num, den)), vf_set1(st->update_scale)));
    if (kind_has_den(KIND)) return vf_add(p, vf_mul(vf_set1(st->step_size), vf_div(num, den)));
    return vf_fmadd(vf_set1(st->step_size), num, p);
}

/* A span's current states: float32 values indexed like the span (the float32 state
 * tensors themselves, or the 8-bit states decoded into span buffers); NULL when the kind
 * does not have that state. */
typedef struct {
    const kb_optimizer_step *st;
    const float *s1, *s1b, *s2; /* s1b: AdEMAMix's second first moment */
} opt_ctx;

/* Load the KB_W elements at offset ``at`` of a span (``count`` of them real; the others
 * repeat the last one and are never stored). */
KB_INLINE void opt_load(const opt_ctx *c, int64_t at, int64_t count, const float *gs, const float *ps,
                        const int KIND, vf *g, vf *p, vstates *s) {
    const int two = kind_states(KIND) == 2, stacked = KIND == KB_OPT_ADEMAMIX;
    if (count == KB_W) {
        *g = vf_load(gs + at);
        *p = vf_load(ps + at);
        s->s1 = vf_load(c->s1 + at);
        s->s1b = stacked ? vf_load(c->s1b + at) : vf_zero();
        s->s2 = two ? vf_load(c->s2 + at) : vf_zero();
        return;
    }
    float gb[KB_W], pb[KB_W], a[KB_W], b[KB_W], d[KB_W];
    for (int l = 0; l < KB_W; ++l) {
        const int64_t j = at + (l < count ? l : count - 1);
        gb[l] = gs[j];
        pb[l] = ps[j];
        a[l] = c->s1[j];
        b[l] = stacked ? c->s1b[j] : 0.0f;
        d[l] = two ? c->s2[j] : 0.0f;
    }
    *g = vf_load(gb);
    *p = vf_load(pb);
    s->s1 = vf_load(a);
    s->s1b = vf_load(b);
    s->s2 = vf_load(d);
}

KB_INLINE void store_count(float *dst, vf v, int64_t count) {
    if (count == KB_W) {
        vf_store(dst, v);
        return;
    }
    float buf[KB_W];
    vf_store(buf, v);
    for (int64_t l = 0; l < count; ++l) dst[l] = buf[l];
}

/* The largest magnitudes of a span's new states, as float bits (NaN above inf). */
typedef struct {
    int32_t s1, s1b, s2;
} span_max;

/* What a span accumulates besides its stores: the new states' largest magnitudes (as
 * float bits, integer maxima) and the norms' partial sums. */
typedef struct {
    vi max1, max1b, max2;
    vf pacc, uacc;
    double param_sq, update_sq;
    int pending;
} span_sums;

/* One step of the KB_W elements at offset ``at`` of a span (``count`` of them real: KB_W, a
 * constant, except in a span's last vector). See opt_span. */
KB_INLINE void opt_vector(const opt_ctx *c, int64_t at, int64_t count, const float *gs, float *ps,
                          int write, int measure, float *new1, float *new1b, float *new2, int maxima,
                          span_sums *sums, const int KIND) {
    const kb_optimizer_step *st = c->st;
    const vf zero = vf_zero();
    vf g, p;
    vstates s;
    opt_load(c, at, count, gs, ps, KIND, &g, &p, &s);
    const vstates old = s;
    vf den = vf_set1(1.0f);
    const vf num = opt_rule(st, KIND, opt_working_grad(st, g, p), &s, &den);
    vm keep = vf_lt(zero, zero); /* nothing */
    if (st->skip_zeros) {
        keep = vf_eq(g, zero);
        s.s1 = vf_blend(keep, s.s1, old.s1);
        s.s1b = vf_blend(keep, s.s1b, old.s1b);
        s.s2 = vf_blend(keep, s.s2, old.s2);
    }
    if (measure) {
        vf u = opt_update(st, KIND, num, den), pm = p;
        if (count < KB_W) {
            float pb[KB_W], ub[KB_W];
            vf_store(pb, pm);
            vf_store(ub, u);
            for (int l = (int)count; l < KB_W; ++l) pb[l] = ub[l] = 0.0f;
            pm = vf_load(pb);
            u = vf_load(ub);
        }
        sums->pacc = vf_add(sums->pacc, vf_mul(pm, pm));
        sums->uacc = vf_add(sums->uacc, vf_mul(u, u));
        if (++sums->pending == 64) { /* float partial sums of at most 64 terms per lane */
            sums->param_sq += vf_reduce_add(sums->pacc);
            sums->update_sq += vf_reduce_add(sums->uacc);
            sums->pacc = sums->uacc = zero;
            sums->pending = 0;
        }
    }
    if (new1) store_count(new1 + at, s.s1, count);
    if (new1b) store_count(new1b + at, s.s1b, count);
    if (new2) store_count(new2 + at, s.s2, count);
    if (maxima) { /* lanes past ``count`` repeat a real element: harmless in a maximum */
        const vi magnitude = vi_set1(0x7fffffff);
        sums->max1 = vi_max(sums->max1, vi_and(vf_bits(s.s1), magnitude));
        if (KIND == KB_OPT_ADEMAMIX) sums->max1b = vi_max(sums->max1b, vi_and(vf_bits(s.s1b), magnitude));
        if (kind_states(KIND) == 2) sums->max2 = vi_max(sums->max2, vi_and(vf_bits(s.s2), magnitude));
    }
    if (write) store_count(ps + at, vf_blend(keep, opt_param(st, KIND, p, num, den), p), count);
}

/* One step over the ``len`` elements of a span. ``g`` and ``p`` are float32 and indexed
 * from 0 (the tensors themselves, or span buffers of 16-bit ones), as are the states in
 * ``c``; the new parameter is written back into ``p`` when ``write``. The new float32
 * states go to new1 / new1b / new2 when not NULL (the same buffers as the states read:
 * every vector is loaded before it is stored), and their largest magnitudes to ``max`` when not NULL (the 8-bit
 * layouts' new scales, found while updating instead of by another pass). ``measure``
 * adds ||p||^2 and ||update||^2 to ``out``. */
KB_INLINE void opt_span(const opt_ctx *c, int64_t len, const float *gs, float *ps, int write,
                        int measure, float *new1, float *new1b, float *new2, span_max *max, kb_partials *out,
                        const int KIND) {
    span_sums sums = {vi_set1(0), vi_set1(0), vi_set1(0), vf_zero(), vf_zero(), 0.0, 0.0, 0};
    const int maxima = max != NULL;
    int64_t at = 0;
    /* whole vectors: ``count`` is the constant KB_W, which removes every partial-vector branch */
    for (; at + KB_W <= len; at += KB_W)
        opt_vector(c, at, KB_W, gs, ps, write, measure, new1, new1b, new2, maxima, &sums, KIND);
    if (at < len) opt_vector(c, at, len - at, gs, ps, write, measure, new1, new1b, new2, maxima, &sums, KIND);
    if (max) {
        max->s1 = vi_reduce_max(sums.max1);
        max->s1b = vi_reduce_max(sums.max1b);
        max->s2 = vi_reduce_max(sums.max2);
    }
    if (measure) {
        out->param_sq += sums.param_sq + vf_reduce_add(sums.pacc);
        out->update_sq += sums.update_sq + vf_reduce_add(sums.uacc);
    }
}

typedef void (*opt_span_fn)(const opt_ctx *c, int64_t len, const float *gs, float *ps, int write,
                            int measure, float *new1, float *new1b, float *new2, span_max *max, kb_partials *out);

/* One compiled span function per kind: the rule is resolved at compile time, everything
 * else (dtype, layout, pass) at run time, which keeps the build small. */
#define KB_SPAN_FOR(NAME, K)                                                                                  \
    static void NAME(const opt_ctx *c, int64_t len, const float *gs, float *ps, int write,                    \
                     int measure, float *new1, float *new1b, float *new2, span_max *max, kb_partials *out) {  \
        opt_span(c, len, gs, ps, write, measure, new1, new1b, new2, max, out, K);                             \
    }
KB_SPAN_FOR(span_adam, KB_OPT_ADAM)
KB_SPAN_FOR(span_momentum, KB_OPT_MOMENTUM)
KB_SPAN_FOR(span_rmsprop, KB_OPT_RMSPROP)
KB_SPAN_FOR(span_lion, KB_OPT_LION)
KB_SPAN_FOR(span_adagrad, KB_OPT_ADAGRAD)
KB_SPAN_FOR(span_lamb, KB_OPT_LAMB)
KB_SPAN_FOR(span_lars, KB_OPT_LARS)
KB_SPAN_FOR(span_ademamix, KB_OPT_ADEMAMIX)

static const opt_span_fn SPANS[8] = {span_adam, span_momentum, span_rmsprop, span_lion,
                                     span_adagrad, span_lamb, span_lars, span_ademamix};

/* Requantize n new float32 state values with the scale ``absmax``. */
static void encode_state(const float *values, int64_t n, float absmax, const kb_codebook *cb, uint8_t *codes) {
    quantize8_seg(values, KB_F32, 0, n, reciprocal_or_zero(absmax), cb, codes);
}

/* A 256-entry table prepared for decoding 8-bit codes: byte permutes where the instruction
 * set has them (see vtab256), else gathers from the table itself. */
typedef struct {
    const float *table;
#ifdef KB_HAVE_BYTE_LOOKUP
    vtab256 bytes;
#endif
} decoder;

KB_INLINE void decoder_load(decoder *d, const float *table) {
    d->table = table;
#ifdef KB_HAVE_BYTE_LOOKUP
    vtab256_load(&d->bytes, table);
#endif
}

/* out[i] = table[codes[i]] * scale for i in [0, n). */
KB_INLINE void decode_scaled(const decoder *d, const uint8_t *codes, int64_t n, float scale, float *out) {
    const vf s = vf_set1(scale);
    int64_t i = 0;
#ifdef KB_HAVE_BYTE_LOOKUP
    for (; i + 64 <= n; i += 64) {
        vf v[4];
        vtab256_lookup64(&d->bytes, codes + i, v);
        for (int j = 0; j < 4; ++j) vf_store(out + i + 16 * j, vf_mul(v[j], s));
    }
#endif
    for (; i + KB_W <= n; i += KB_W) vf_store(out + i, vf_mul(vf_gather(d->table, vi_load_u8(codes + i)), s));
    for (; i < n; ++i) out[i] = d->table[codes[i]] * scale;
}

static void to_float(const void *x, int dt, int64_t i0, int64_t len, float *out) {
    KB_DTYPE_SWITCH(dt, {
        int64_t i = 0;
        for (; i + KB_W <= len; i += KB_W) vf_store(out + i, vf_load_dt(x, DT, i0 + i));
        for (; i < len; ++i) out[i] = load1_dt(x, DT, i0 + i);
    });
}

static void from_float(const float *v, int64_t len, void *y, int dt, int64_t i0) {
    KB_DTYPE_SWITCH(dt, {
        int64_t i = 0;
        for (; i + KB_W <= len; i += KB_W) vf_store_dt(y, DT, i0 + i, vf_load(v + i));
        for (; i < len; ++i) store1_dt(y, DT, i0 + i, v[i]);
    });
}

#define KB_OPT_BLOCK 256
/* Elements per span: a multiple of the 8-bit block, small enough for stack buffers. */
#define KB_OPT_SPAN 2048

/* One optimizer step over [i0, i1) (blockwise: i0 at a block start); ``pass`` is a
 * KB_PASS_* value. */
static void optimizer_range(const kb_optimizer_step *st, const kb_optimizer_tensors *t, int64_t i0, int64_t i1,
                            int pass, kb_partials *out) {
    const opt_span_fn span = SPANS[st->kind];
    const int two = st->kind == KB_OPT_ADAM || st->kind == KB_OPT_LAMB || st->kind == KB_OPT_ADEMAMIX;
    const int stacked = st->kind == KB_OPT_ADEMAMIX;
    const int64_t n = t->n, nblocks = (n + KB_OPT_BLOCK - 1) / KB_OPT_BLOCK;
    /* 8-bit layouts: the current states are decoded into new1 / new1b / new2, updated
     * there in place, then requantized. */
    float gbuf[KB_OPT_SPAN], pbuf[KB_OPT_SPAN], new1[KB_OPT_SPAN], new1b[KB_OPT_SPAN], new2[KB_OPT_SPAN];
    uint8_t *c1 = (uint8_t *)t->state1, *c2 = (uint8_t *)t->state2;
    float *s1 = (float *)t->state1, *s2 = (float *)t->state2;
    const int writes = pass != KB_PASS_MEASURE;
    decoder dec1, dec2;
    if (st->layout != KB_STATE_F32) {
        decoder_load(&dec1, t->qmap1);
        if (two) decoder_load(&dec2, t->qmap2);
    }
    for (int64_t start = i0; start < i1; start += KB_OPT_SPAN) {
        const int64_t len = KB_MIN((int64_t)KB_OPT_SPAN, i1 - start);
        const float *g = gbuf;
        float *p = pbuf;
        if (st->dtype == KB_F32) {
            g = (const float *)t->g + start;
            p = (float *)t->p + start;
        } else {
            to_float(t->g, st->dtype, start, len, gbuf);
            to_float(t->p, st->dtype, start, len, pbuf);
        }
        span_max max;
        if (st->layout == KB_STATE_F32) {
            const opt_ctx c = {st, s1 + start, stacked ? s1 + n + start : NULL, two ? s2 + start : NULL};
            if (writes)
                span(&c, len, g, p, 1, 0, s1 + start, stacked ? s1 + n + start : NULL, two ? s2 + start : NULL,
                     NULL, out);
            else
                span(&c, len, g, p, 0, 1, NULL, NULL, NULL, NULL, out);
        } else if (st->layout == KB_STATE_U8_BLOCKWISE) {
            for (int64_t at = 0; at < len; at += KB_OPT_BLOCK) {
                const int64_t b = (start + at) / KB_OPT_BLOCK, blen = KB_MIN((int64_t)KB_OPT_BLOCK, len - at);
                decode_scaled(&dec1, c1 + start + at, blen, t->absmax1[b], new1);
                if (stacked) decode_scaled(&dec1, c1 + n + start + at, blen, t->absmax1[nblocks + b], new1b);
                if (two) decode_scaled(&dec2, c2 + start + at, blen, t->absmax2[b], new2);
                const opt_ctx c = {st, new1, stacked ? new1b : NULL, two ? new2 : NULL};
                span(&c, blen, g + at, p + at, 1, 0, new1, stacked ? new1b : NULL, two ? new2 : NULL, &max, out);
                float am = kb_float((uint32_t)max.s1);
                t->absmax1[b] = am;
                encode_state(new1, blen, am, t->cb1, c1 + start + at);
                if (stacked) {
                    am = kb_float((uint32_t)max.s1b);
                    t->absmax1[nblocks + b] = am;
                    encode_state(new1b, blen, am, t->cb1, c1 + n + start + at);
                }
                if (two) {
                    am = kb_float((uint32_t)max.s2);
                    t->absmax2[b] = am;
                    encode_state(new2, blen, am, t->cb2, c2 + start + at);
                }
            }
        } else { /* whole-tensor 8-bit (one first moment: AdEMAMix is blockwise only) */
            decode_scaled(&dec1, c1 + start, len, t->max1, new1);
            if (two) decode_scaled(&dec2, c2 + start, len, t->max2, new2);
            const opt_ctx c = {st, new1, NULL, two ? new2 : NULL};
            if (writes) {
                span(&c, len, g, p, 1, 0, new1, NULL, two ? new2 : NULL, NULL, out);
                encode_state(new1, len, t->new_max1, t->cb1, c1 + start);
                if (two) encode_state(new2, len, t->new_max2, t->cb2, c2 + start);
            } else { /* the new states' largest magnitudes, without storing the states */
                span(&c, len, g, p, 0, st->clip, NULL, NULL, NULL, &max, out);
                if (max.s1 > out->max1_bits) out->max1_bits = max.s1;
                if (two && max.s2 > out->max2_bits) out->max2_bits = max.s2;
            }
        }
        if (writes && st->dtype != KB_F32) from_float(pbuf, len, t->p, st->dtype, start);
    }
}

/* ========================================================================= the table */
const kb_kernels KB_CAT(kb_kernels, KB_ISA) = {
    .name = KB_STR(KB_ISA),
    .quantize8_blocks = quantize8_blocks,
    .absmax_range = absmax_range,
    .quantize8_scaled = quantize8_scaled,
    .dequantize8 = dequantize8,
    .quantize4_blocks = quantize4_blocks,
    .dequantize4 = dequantize4,
    .gemm4_packed_a_bytes = gemm4_packed_a_bytes,
    .gemm4_pack_a = gemm4_pack_a,
    .gemm4 = gemm4,
    .int8_quant_rows = int8_quant_rows,
    .int8_dequant_rows = int8_dequant_rows,
    .optimizer_range = optimizer_range,
};
