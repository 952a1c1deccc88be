/* A small vector abstraction, so each kernel is written once and compiled per instruction set.
 *
 * kernels.c is compiled five times: with the AVX-512 flags (16 float lanes), once more
 * with AVX512-VBMI added (byte permutes for table lookups, KB_HAVE_BYTE_LOOKUP), once more
 * with VBMI and AVX512_BF16 (the bfloat16 dot products of the 4-bit matmul), with the
 * AVX2 + FMA + F16C flags (8 lanes), and with none (1 lane: plain C, the portable path that
 * also builds on aarch64). The compiler's predefined macros select the implementation, so
 * no -march=native is ever baked in. Types:
 *
 *   vf  KB_W float32 lanes      vi  KB_W int32 lanes      vm  a lane mask
 *   vtab16  a 16-entry float table held in registers
 *
 * Every operation is IEEE float32 with round-to-nearest-even; vf_fmadd is the only fused
 * operation and is used only where the format leaves the order of float operations free
 * (the 4-bit matmul's sums).
 */
#ifndef KB_SIMD_H
#define KB_SIMD_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kb_internal.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
/* =============================================================== AVX-512: 16 lanes */
#include <immintrin.h>
#define KB_W 16
typedef __m512 vf;
typedef __m512i vi;
typedef __mmask16 vm;
typedef __m512 vtab16;

KB_INLINE vf vf_load(const float *p) { return _mm512_loadu_ps(p); }
KB_INLINE void vf_store(float *p, vf v) { _mm512_storeu_ps(p, v); }
KB_INLINE vf vf_load_f16(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
KB_INLINE vf vf_load_bf16(const uint16_t *p) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
KB_INLINE void vf_store_f16(uint16_t *p, vf v) {
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
KB_INLINE void vf_store_bf16(uint16_t *p, vf v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
    __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, rounded, quiet)));
}
KB_INLINE vf vf_set1(float x) { return _mm512_set1_ps(x); }
KB_INLINE vf vf_zero(void) { return _mm512_setzero_ps(); }
KB_INLINE vf vf_add(vf a, vf b) { return _mm512_add_ps(a, b); }
KB_INLINE vf vf_sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
KB_INLINE vf vf_mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
KB_INLINE vf vf_div(vf a, vf b) { return _mm512_div_ps(a, b); }
KB_INLINE vf vf_sqrt(vf a) { return _mm512_sqrt_ps(a); }
KB_INLINE vf vf_fmadd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
KB_INLINE vf vf_max(vf a, vf b) { return _mm512_max_ps(a, b); }
KB_INLINE vf vf_abs(vf a) { return _mm512_abs_ps(a); }
KB_INLINE vf vf_round_even(vf a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
KB_INLINE float vf_reduce_add(vf a) { return _mm512_reduce_add_ps(a); }
KB_INLINE vm vf_lt(vf a, vf b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
KB_INLINE vm vf_gt(vf a, vf b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
KB_INLINE vm vf_eq(vf a, vf b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
KB_INLINE vm vf_ge(vf a, vf b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ); }
KB_INLINE vm vf_isnan(vf a) { return _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q); }
KB_INLINE vm vm_or(vm a, vm b) { return (vm)(a | b); }
KB_INLINE vm vm_and(vm a, vm b) { return (vm)(a & b); }
KB_INLINE int vm_any(vm a) { return a != 0; }
KB_INLINE vf vf_blend(vm m, vf a, vf b) { return _mm512_mask_blend_ps(m, a, b); }
KB_INLINE vf vf_gather(const float *t, vi idx) { return _mm512_i32gather_ps(idx, t, 4); }

KB_INLINE vi vi_set1(int32_t x) { return _mm512_set1_epi32(x); }
KB_INLINE vi vi_add(vi a, vi b) { return _mm512_add_epi32(a, b); }
KB_INLINE vi vi_and(vi a, vi b) { return _mm512_and_si512(a, b); }
KB_INLINE vi vi_srli(vi a, int n) { return _mm512_srli_epi32(a, (unsigned)n); }
KB_INLINE vi vi_max(vi a, vi b) { return _mm512_max_epi32(a, b); }
KB_INLINE vi vi_min(vi a, vi b) { return _mm512_min_epi32(a, b); }
KB_INLINE vi vi_xor(vi a, vi b) { return _mm512_xor_si512(a, b); }
KB_INLINE vm vi_gt(vi a, vi b) { return _mm512_cmpgt_epi32_mask(a, b); }
KB_INLINE int32_t vi_reduce_max(vi a) { return _mm512_reduce_max_epi32(a); }
KB_INLINE vi vi_inc_if(vi c, vm m) { return _mm512_mask_add_epi32(c, m, c, _mm512_set1_epi32(1)); }
KB_INLINE vi vi_blend(vm m, vi a, vi b) { return _mm512_mask_blend_epi32(m, a, b); }
KB_INLINE vi vf_bits(vf a) { return _mm512_castps_si512(a); }
KB_INLINE vf vi_as_float(vi a) { return _mm512_castsi512_ps(a); }
KB_INLINE vi vf_to_int(vf a) { return _mm512_cvtps_epi32(a); } /* a holds integers */
KB_INLINE vf vi_to_float(vi a) { return _mm512_cvtepi32_ps(a); }
KB_INLINE vi vi_gather(const int32_t *t, vi idx) { return _mm512_i32gather_epi32(idx, t, 4); }
KB_INLINE vi vi_gather_u8(const uint8_t *t, vi idx) {
    return _mm512_and_si512(_mm512_i32gather_epi32(idx, (const void *)t, 1), _mm512_set1_epi32(0xff));
}
KB_INLINE vi vi_load_u8(const uint8_t *p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)); }
KB_INLINE vi vi_load_i8(const int8_t *p) { return _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)); }
KB_INLINE vi vi_load_i32(const int32_t *p) { return _mm512_loadu_si512((const void *)p); }
KB_INLINE void vi_store_u8(uint8_t *p, vi v) { _mm_storeu_si128((__m128i *)p, _mm512_cvtepi32_epi8(v)); }
/* The 4-bit codes of KB_W consecutive elements from KB_W / 2 packed bytes (high nibble first). */
KB_INLINE vi vi_load_nibbles(const uint8_t *p) {
    __m128i bytes = _mm_loadl_epi64((const __m128i *)p);
    __m512i lanes = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(bytes, bytes));
    const __m512i shift = _mm512_set_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
    return _mm512_and_si512(_mm512_srlv_epi32(lanes, shift), _mm512_set1_epi32(15));
}
KB_INLINE vtab16 vtab16_load(const float *t) { return _mm512_loadu_ps(t); }
KB_INLINE vf vf_lookup16(vtab16 t, vi idx) { return _mm512_permutexvar_ps(idx, t); }
KB_INLINE vi vi_lookup16(const int32_t *t, vi idx) {
    return _mm512_permutexvar_epi32(idx, _mm512_loadu_si512((const void *)t));
}
/* Pack the 4-bit codes of KB_W elements into KB_W / 2 bytes, element 2j in the high nibble. */
KB_INLINE void vi_store_nibble_pairs(uint8_t *p, vi codes) {
    __m512i pairs = _mm512_or_si512(_mm512_slli_epi64(codes, 4), _mm512_srli_epi64(codes, 32));
    _mm_storel_epi64((__m128i *)p, _mm512_cvtepi64_epi8(pairs));
}

#if defined(__AVX512VBMI__)
/* Lookups of 64 byte indices at once in a 256-entry float table (AVX512-VBMI): the
 * table's floats are split into four byte planes of 256 bytes, each held in four registers
 * and indexed with two-source byte permutes, and the four result bytes of each lane are
 * interleaved back into floats. The interleave works within 128-bit lanes, so the indices
 * are first permuted (``order``) such that the floats come out in the indices' order.
 * About 26 instructions per 64 values, where gathers take one per value on some CPUs. */
#define KB_HAVE_BYTE_LOOKUP 1
typedef struct {
    __m512i plane[4][4]; /* plane[k][q]: byte k of entries 64q .. 64q + 63 */
    __m512i order;
} vtab256;

KB_INLINE void vtab256_load(vtab256 *t, const float *table) {
    uint8_t planes[4][256], order[64];
    const uint8_t *bytes = (const uint8_t *)table;
    for (int e = 0; e < 256; ++e)
        for (int k = 0; k < 4; ++k) planes[k][e] = bytes[4 * e + k];
    for (int k = 0; k < 4; ++k)
        for (int q = 0; q < 4; ++q) t->plane[k][q] = _mm512_loadu_si512((const void *)(planes[k] + 64 * q));
    /* After the byte and word interleaves, result j's lane L holds the values of index
     * bytes 16L + 4j .. 16L + 4j + 3; those must be indices 16j + 4L .. 16j + 4L + 3. */
    for (int lane = 0; lane < 4; ++lane)
        for (int j = 0; j < 4; ++j)
            for (int q = 0; q < 4; ++q) order[16 * lane + 4 * j + q] = (uint8_t)(16 * j + 4 * lane + q);
    t->order = _mm512_loadu_si512((const void *)order);
}

/* out[j] = table[codes[16j .. 16j + 15]] for j = 0..3. */
KB_INLINE void vtab256_lookup64(const vtab256 *t, const uint8_t *codes, __m512 out[4]) {
    const __m512i idx = _mm512_permutexvar_epi8(t->order, _mm512_loadu_si512((const void *)codes));
    const __mmask64 high = _mm512_movepi8_mask(idx); /* index bit 7: entries 128..255 */
    __m512i b[4];
    for (int k = 0; k < 4; ++k)
        b[k] = _mm512_mask_blend_epi8(high, _mm512_permutex2var_epi8(t->plane[k][0], idx, t->plane[k][1]),
                                      _mm512_permutex2var_epi8(t->plane[k][2], idx, t->plane[k][3]));
    const __m512i low01 = _mm512_unpacklo_epi8(b[0], b[1]), high01 = _mm512_unpackhi_epi8(b[0], b[1]);
    const __m512i low23 = _mm512_unpacklo_epi8(b[2], b[3]), high23 = _mm512_unpackhi_epi8(b[2], b[3]);
    out[0] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(low01, low23));
    out[1] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(low01, low23));
    out[2] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(high01, high23));
    out[3] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(high01, high23));
}
#endif

/* Exact count of decision bounds below x without memory lookups: the bisection over the
 * 256 bound slots walks the codebook's level tables (see kb_codebook.tree), all 256
 * floats held in 16 registers and indexed with permutes. */
#define KB_HAVE_TREE 1
typedef struct {
    __m512 heap, level4, level5[2], level6[4], level7[8];
} vtree;

KB_INLINE vtree vtree_load(const float *tree) {
    vtree t;
    t.heap = _mm512_loadu_ps(tree);
    t.level4 = _mm512_loadu_ps(tree + 16);
    for (int i = 0; i < 2; ++i) t.level5[i] = _mm512_loadu_ps(tree + 32 + 16 * i);
    for (int i = 0; i < 4; ++i) t.level6[i] = _mm512_loadu_ps(tree + 64 + 16 * i);
    for (int i = 0; i < 8; ++i) t.level7[i] = _mm512_loadu_ps(tree + 128 + 16 * i);
    return t;
}

/* h <- 2h + (node < x): the heap index of the next level's node. */
KB_INLINE __m512i tree_step(__m512i h, __m512 node, __m512 x) {
    /* 2h - (-1 where node < x) */
    return _mm512_sub_epi32(_mm512_add_epi32(h, h), _mm512_movm_epi32(_mm512_cmp_ps_mask(node, x, _CMP_LT_OQ)));
}

KB_INLINE vi vtree_count(const vtree *t, vf x) {
    __m512i h = _mm512_set1_epi32(1);
    for (int level = 0; level < 4; ++level) h = tree_step(h, _mm512_permutexvar_ps(h, t->heap), x);
    h = tree_step(h, _mm512_permutexvar_ps(h, t->level4), x);                    /* h in [16, 32) */
    h = tree_step(h, _mm512_permutex2var_ps(t->level5[0], h, t->level5[1]), x);  /* h in [32, 64) */
    const __mmask16 bit5 = _mm512_test_epi32_mask(h, _mm512_set1_epi32(32));     /* h in [64, 128) */
    h = tree_step(h, _mm512_mask_blend_ps(bit5, _mm512_permutex2var_ps(t->level6[0], h, t->level6[1]),
                                          _mm512_permutex2var_ps(t->level6[2], h, t->level6[3])), x);
    const __mmask16 b5 = _mm512_test_epi32_mask(h, _mm512_set1_epi32(32));        /* h in [128, 256) */
    const __mmask16 b6 = _mm512_test_epi32_mask(h, _mm512_set1_epi32(64));
    const __m512 low = _mm512_mask_blend_ps(b5, _mm512_permutex2var_ps(t->level7[0], h, t->level7[1]),
                                            _mm512_permutex2var_ps(t->level7[2], h, t->level7[3]));
    const __m512 high = _mm512_mask_blend_ps(b5, _mm512_permutex2var_ps(t->level7[4], h, t->level7[5]),
                                             _mm512_permutex2var_ps(t->level7[6], h, t->level7[7]));
    h = tree_step(h, _mm512_mask_blend_ps(b6, low, high), x);                    /* h in [256, 512) */
    return _mm512_sub_epi32(h, _mm512_set1_epi32(256));
}

#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
/* ======================================================= AVX2 + FMA + F16C: 8 lanes */
#include <immintrin.h>
#define KB_W 8
typedef __m256 vf;
typedef __m256i vi;
typedef __m256i vm; /* all-ones lanes where true */
typedef struct {
    __m256 lo, hi;
} vtab16;

KB_INLINE vf vf_load(const float *p) { return _mm256_loadu_ps(p); }
KB_INLINE void vf_store(float *p, vf v) { _mm256_storeu_ps(p, v); }
KB_INLINE vf vf_load_f16(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
KB_INLINE vf vf_load_bf16(const uint16_t *p) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
KB_INLINE void vf_store_f16(uint16_t *p, vf v) {
    _mm_storeu_si128((__m128i *)p, _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
KB_INLINE void vf_store_bf16(uint16_t *p, vf v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
    __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    __m256i halves = _mm256_blendv_epi8(rounded, quiet, nan);
    /* packus works within 128-bit lanes: keep qwords 0 and 2 */
    __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(halves, halves), 0x08);
    _mm_storeu_si128((__m128i *)p, _mm256_castsi256_si128(packed));
}
KB_INLINE vf vf_set1(float x) { return _mm256_set1_ps(x); }
KB_INLINE vf vf_zero(void) { return _mm256_setzero_ps(); }
KB_INLINE vf vf_add(vf a, vf b) { return _mm256_add_ps(a, b); }
KB_INLINE vf vf_sub(vf a, vf b) { return _mm256_sub_ps(a, b); }
KB_INLINE vf vf_mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
KB_INLINE vf vf_div(vf a, vf b) { return _mm256_div_ps(a, b); }
KB_INLINE vf vf_sqrt(vf a) { return _mm256_sqrt_ps(a); }
KB_INLINE vf vf_fmadd(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
KB_INLINE vf vf_max(vf a, vf b) { return _mm256_max_ps(a, b); }
KB_INLINE vf vf_abs(vf a) { return _mm256_and_ps(a, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff))); }
KB_INLINE vf vf_round_even(vf a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
KB_INLINE float vf_reduce_add(vf a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
KB_INLINE vm vf_lt(vf a, vf b) { return _mm256_castps_si256(_mm256_cmp_ps(a, b, _CMP_LT_OQ)); }
KB_INLINE vm vf_gt(vf a, vf b) { return _mm256_castps_si256(_mm256_cmp_ps(a, b, _CMP_GT_OQ)); }
KB_INLINE vm vf_eq(vf a, vf b) { return _mm256_castps_si256(_mm256_cmp_ps(a, b, _CMP_EQ_OQ)); }
KB_INLINE vm vf_ge(vf a, vf b) { return _mm256_castps_si256(_mm256_cmp_ps(a, b, _CMP_GE_OQ)); }
KB_INLINE vm vf_isnan(vf a) { return _mm256_castps_si256(_mm256_cmp_ps(a, a, _CMP_UNORD_Q)); }
KB_INLINE vm vm_or(vm a, vm b) { return _mm256_or_si256(a, b); }
KB_INLINE vm vm_and(vm a, vm b) { return _mm256_and_si256(a, b); }
KB_INLINE int vm_any(vm a) { return !_mm256_testz_si256(a, a); }
KB_INLINE vf vf_blend(vm m, vf a, vf b) { return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(m)); }
KB_INLINE vf vf_gather(const float *t, vi idx) { return _mm256_i32gather_ps(t, idx, 4); }

KB_INLINE vi vi_set1(int32_t x) { return _mm256_set1_epi32(x); }
KB_INLINE vi vi_add(vi a, vi b) { return _mm256_add_epi32(a, b); }
KB_INLINE vi vi_and(vi a, vi b) { return _mm256_and_si256(a, b); }
KB_INLINE vi vi_srli(vi a, int n) { return _mm256_srli_epi32(a, n); }
KB_INLINE vi vi_max(vi a, vi b) { return _mm256_max_epi32(a, b); }
KB_INLINE vi vi_min(vi a, vi b) { return _mm256_min_epi32(a, b); }
KB_INLINE vi vi_xor(vi a, vi b) { return _mm256_xor_si256(a, b); }
KB_INLINE vm vi_gt(vi a, vi b) { return _mm256_cmpgt_epi32(a, b); }
KB_INLINE int32_t vi_reduce_max(vi a) {
    __m128i m = _mm_max_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
    m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0x4e));
    m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0xb1));
    return _mm_cvtsi128_si32(m);
}
KB_INLINE vi vi_inc_if(vi c, vm m) { return _mm256_sub_epi32(c, m); }
KB_INLINE vi vi_blend(vm m, vi a, vi b) { return _mm256_blendv_epi8(a, b, m); }
KB_INLINE vi vf_bits(vf a) { return _mm256_castps_si256(a); }
KB_INLINE vf vi_as_float(vi a) { return _mm256_castsi256_ps(a); }
KB_INLINE vi vf_to_int(vf a) { return _mm256_cvtps_epi32(a); }
KB_INLINE vf vi_to_float(vi a) { return _mm256_cvtepi32_ps(a); }
KB_INLINE vi vi_gather(const int32_t *t, vi idx) { return _mm256_i32gather_epi32(t, idx, 4); }
KB_INLINE vi vi_gather_u8(const uint8_t *t, vi idx) {
    return _mm256_and_si256(_mm256_i32gather_epi32((const int *)(const void *)t, idx, 1), _mm256_set1_epi32(0xff));
}
KB_INLINE vi vi_load_u8(const uint8_t *p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)); }
KB_INLINE vi vi_load_i8(const int8_t *p) { return _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)); }
KB_INLINE vi vi_load_i32(const int32_t *p) { return _mm256_loadu_si256((const __m256i *)p); }
KB_INLINE void vi_store_u8(uint8_t *p, vi v) {
    const __m256i low_bytes = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                               0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    __m256i picked = _mm256_shuffle_epi8(v, low_bytes);
    __m128i joined = _mm_unpacklo_epi32(_mm256_castsi256_si128(picked), _mm256_extracti128_si256(picked, 1));
    _mm_storel_epi64((__m128i *)p, joined);
}
KB_INLINE vi vi_load_nibbles(const uint8_t *p) {
    int32_t four;
    memcpy(&four, p, sizeof four);
    __m128i bytes = _mm_cvtsi32_si128(four);
    __m256i lanes = _mm256_cvtepu8_epi32(_mm_unpacklo_epi8(bytes, bytes));
    const __m256i shift = _mm256_set_epi32(0, 4, 0, 4, 0, 4, 0, 4);
    return _mm256_and_si256(_mm256_srlv_epi32(lanes, shift), _mm256_set1_epi32(15));
}
KB_INLINE vtab16 vtab16_load(const float *t) {
    vtab16 tab = {_mm256_loadu_ps(t), _mm256_loadu_ps(t + 8)};
    return tab;
}
KB_INLINE vf vf_lookup16(vtab16 t, vi idx) {
    vf lo = _mm256_permutevar8x32_ps(t.lo, idx);
    vf hi = _mm256_permutevar8x32_ps(t.hi, idx);
    /* bit 3 of the index selects the upper half: move it to the sign bit for blendv */
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}
KB_INLINE vi vi_lookup16(const int32_t *t, vi idx) {
    vtab16 tab = vtab16_load((const float *)(const void *)t);
    return _mm256_castps_si256(vf_lookup16(tab, idx));
}
KB_INLINE void vi_store_nibble_pairs(uint8_t *p, vi codes) {
    __m256i pairs = _mm256_or_si256(_mm256_slli_epi64(codes, 4), _mm256_srli_epi64(codes, 32));
    const __m256i first_bytes = _mm256_setr_epi8(0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                                 0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    __m256i picked = _mm256_shuffle_epi8(pairs, first_bytes);
    int32_t four = _mm_cvtsi128_si32(
        _mm_unpacklo_epi16(_mm256_castsi256_si128(picked), _mm256_extracti128_si256(picked, 1)));
    memcpy(p, &four, sizeof four);
}

#else
/* ============================================================ portable: one lane */
#define KB_W 1
typedef float vf;
typedef int32_t vi;
typedef int vm;
typedef struct {
    float v[16];
} vtab16;

KB_INLINE vf vf_load(const float *p) { return *p; }
KB_INLINE void vf_store(float *p, vf v) { *p = v; }
KB_INLINE vf vf_load_f16(const uint16_t *p) { return kb_f16_to_f32(*p); }
KB_INLINE vf vf_load_bf16(const uint16_t *p) { return kb_bf16_to_f32(*p); }
KB_INLINE void vf_store_f16(uint16_t *p, vf v) { *p = kb_f32_to_f16(v); }
KB_INLINE void vf_store_bf16(uint16_t *p, vf v) { *p = kb_f32_to_bf16(v); }
KB_INLINE vf vf_set1(float x) { return x; }
KB_INLINE vf vf_zero(void) { return 0.0f; }
KB_INLINE vf vf_add(vf a, vf b) { return a + b; }
KB_INLINE vf vf_sub(vf a, vf b) { return a - b; }
KB_INLINE vf vf_mul(vf a, vf b) { return a * b; }
KB_INLINE vf vf_div(vf a, vf b) { return a / b; }
KB_INLINE vf vf_sqrt(vf a) { return sqrtf(a); }
KB_INLINE vf vf_fmadd(vf a, vf b, vf c) { return a * b + c; }
KB_INLINE vf vf_max(vf a, vf b) { return a > b ? a : b; }
KB_INLINE vf vf_abs(vf a) { return fabsf(a); }
KB_INLINE vf vf_round_even(vf a) { return nearbyintf(a); }
KB_INLINE float vf_reduce_add(vf a) { return a; }
KB_INLINE vm vf_lt(vf a, vf b) { return a < b; }
KB_INLINE vm vf_gt(vf a, vf b) { return a > b; }
KB_INLINE vm vf_eq(vf a, vf b) { return a == b; }
KB_INLINE vm vf_ge(vf a, vf b) { return a >= b; }
KB_INLINE vm vf_isnan(vf a) { return a != a; }
KB_INLINE vm vm_or(vm a, vm b) { return a | b; }
KB_INLINE vm vm_and(vm a, vm b) { return a & b; }
KB_INLINE int vm_any(vm a) { return a; }
KB_INLINE vf vf_blend(vm m, vf a, vf b) { return m ? b : a; }
KB_INLINE vf vf_gather(const float *t, vi idx) { return t[idx]; }

KB_INLINE vi vi_set1(int32_t x) { return x; }
KB_INLINE vi vi_add(vi a, vi b) { return a + b; }
KB_INLINE vi vi_and(vi a, vi b) { return a & b; }
KB_INLINE vi vi_srli(vi a, int n) { return (vi)((uint32_t)a >> n); }
KB_INLINE vi vi_max(vi a, vi b) { return a > b ? a : b; }
KB_INLINE vi vi_min(vi a, vi b) { return a < b ? a : b; }
KB_INLINE vi vi_xor(vi a, vi b) { return a ^ b; }
KB_INLINE vm vi_gt(vi a, vi b) { return a > b; }
KB_INLINE int32_t vi_reduce_max(vi a) { return a; }
KB_INLINE vi vi_inc_if(vi c, vm m) { return c + (m != 0); }
KB_INLINE vi vi_blend(vm m, vi a, vi b) { return m ? b : a; }
KB_INLINE vi vf_bits(vf a) { return (vi)kb_bits(a); }
KB_INLINE vf vi_as_float(vi a) { return kb_float((uint32_t)a); }
KB_INLINE vi vf_to_int(vf a) { return (vi)a; }
KB_INLINE vf vi_to_float(vi a) { return (float)a; }
KB_INLINE vi vi_gather(const int32_t *t, vi idx) { return t[idx]; }
KB_INLINE vi vi_gather_u8(const uint8_t *t, vi idx) { return t[idx]; }
KB_INLINE vi vi_load_u8(const uint8_t *p) { return *p; }
KB_INLINE vi vi_load_i8(const int8_t *p) { return *p; }
KB_INLINE vi vi_load_i32(const int32_t *p) { return *p; }
KB_INLINE void vi_store_u8(uint8_t *p, vi v) { *p = (uint8_t)v; }
KB_INLINE vtab16 vtab16_load(const float *t) {
    vtab16 tab;
    memcpy(tab.v, t, sizeof tab.v);
    return tab;
}
KB_INLINE vf vf_lookup16(vtab16 t, vi idx) { return t.v[idx]; }
KB_INLINE vi vi_lookup16(const int32_t *t, vi idx) { return t[idx]; }
#endif

/* ------------------------------------------------------ dtype-generic loads/stores */
/* ``dt`` is a compile-time constant at every call site (see KB_DTYPE_SWITCH), so the
 * switch folds away. */
KB_INLINE vf vf_load_dt(const void *x, int dt, int64_t i) {
    if (dt == KB_F32) return vf_load((const float *)x + i);
    if (dt == KB_F16) return vf_load_f16((const uint16_t *)x + i);
    return vf_load_bf16((const uint16_t *)x + i);
}

KB_INLINE void vf_store_dt(void *y, int dt, int64_t i, vf v) {
    if (dt == KB_F32) vf_store((float *)y + i, v);
    else if (dt == KB_F16) vf_store_f16((uint16_t *)y + i, v);
    else vf_store_bf16((uint16_t *)y + i, v);
}

KB_INLINE float load1_dt(const void *x, int dt, int64_t i) {
    if (dt == KB_F32) return ((const float *)x)[i];
    if (dt == KB_F16) return kb_f16_to_f32(((const uint16_t *)x)[i]);
    return kb_bf16_to_f32(((const uint16_t *)x)[i]);
}

KB_INLINE void store1_dt(void *y, int dt, int64_t i, float v) {
    if (dt == KB_F32) ((float *)y)[i] = v;
    else if (dt == KB_F16) ((uint16_t *)y)[i] = kb_f32_to_f16(v);
    else ((uint16_t *)y)[i] = kb_f32_to_bf16(v);
}

/* Run STATEMENT with the constant DT bound to the runtime dtype ``dt``. */
#define KB_DTYPE_SWITCH(dt, STATEMENT)          \
    do {                                        \
        switch (dt) {                           \
        case KB_F32: {                          \
            enum { DT = KB_F32 };               \
            STATEMENT;                          \
        } break;                                \
        case KB_F16: {                          \
            enum { DT = KB_F16 };               \
            STATEMENT;                          \
        } break;                                \
        default: {                              \
            enum { DT = KB_BF16 };              \
            STATEMENT;                          \
        } break;                                \
        }                                       \
    } while (0)

#endif /* KB_SIMD_H */
