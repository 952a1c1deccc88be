/* The exported C ABI: instruction-set dispatch, threading, and the few steps that are not
 * per-element kernels (whole-tensor reductions, outlier columns, buffer padding).
 *
 * Threading uses OpenMP, and only here: every parallel region splits a call into
 * ``nthreads`` contiguous ranges and runs one kernel per range, so the kernels stay
 * single-threaded and instruction-set specific. The library links the OpenMP runtime by its
 * usual soname (libgomp.so.1 with GCC); torch's CPU wheels load a runtime of that soname
 * before this library is opened, and the dynamic loader then binds this library to the
 * same copy, so the process keeps a single OpenMP runtime and a single thread pool
 * (kbit_cpu/_library.py checks this at load time). Calls below a size threshold run on
 * the calling thread: a parallel region costs microseconds.
 */
#define _GNU_SOURCE /* MADV_HUGEPAGE */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

#include "kb_internal.h"

/* ============================================================ instruction sets */
#if KB_X86_KERNELS
#include <cpuid.h>

static uint64_t xgetbv0(void) {
    uint32_t eax, edx;
    __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
    return ((uint64_t)edx << 32) | eax;
}

/* AVX2 + FMA + F16C, with the OS saving the AVX registers. */
static int cpu_has_avx2(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    const unsigned need = (1u << 12) | (1u << 27) | (1u << 28) | (1u << 29); /* FMA OSXSAVE AVX F16C */
    if ((c & need) != need) return 0;
    if ((xgetbv0() & 0x6u) != 0x6u) return 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    return (b >> 5) & 1u;
}

/* AVX-512 F, DQ, BW and VL, with the OS saving the opmask and ZMM registers. */
static int cpu_has_avx512(void) {
    unsigned a, b, c, d;
    if (!cpu_has_avx2()) return 0;
    if ((xgetbv0() & 0xe6u) != 0xe6u) return 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    const unsigned need = (1u << 16) | (1u << 17) | (1u << 30) | (1u << 31);
    return (b & need) == need;
}

/* The above plus AVX512-VBMI (byte permutes across a whole register). */
static int cpu_has_avx512vbmi(void) {
    unsigned a, b, c, d;
    if (!cpu_has_avx512()) return 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    return (c >> 1) & 1u;
}

#ifdef KB_HAVE_AVX512BF16
/* AVX-512 with VBMI as above plus AVX512_BF16 (the bfloat16 dot product and conversions):
 * the set of Sapphire Rapids and Zen 4 and later, so one tier serves both extensions. */
static int cpu_has_avx512bf16(void) {
    unsigned a, b, c, d;
    if (!cpu_has_avx512vbmi()) return 0;
    if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return 0;
    return (a >> 5) & 1u;
}
#endif
#endif

/* Instruction sets by preference; the first one this CPU runs is the default. */
static const kb_kernels *candidate(int i, int *supported) {
#if KB_X86_KERNELS
#ifdef KB_HAVE_AVX512BF16
    if (i == 0) {
        *supported = cpu_has_avx512bf16();
        return &kb_kernels_avx512bf16;
    }
    --i;
#endif
    switch (i) {
    case 0: *supported = cpu_has_avx512vbmi(); return &kb_kernels_avx512vbmi;
    case 1: *supported = cpu_has_avx512(); return &kb_kernels_avx512;
    case 2: *supported = cpu_has_avx2(); return &kb_kernels_avx2;
    case 3: *supported = 1; return &kb_kernels_portable;
    default: return NULL;
    }
#else
    if (i == 0) {
        *supported = 1;
        return &kb_kernels_portable;
    }
    return NULL;
#endif
}

static const kb_kernels *g_kernels = &kb_kernels_portable;
static char g_supported[64];

__attribute__((constructor)) static void choose_kernels(void) {
    int supported = 0;
    const kb_kernels *k;
    g_supported[0] = '\0';
    int chosen = 0;
    for (int i = 0; (k = candidate(i, &supported)) != NULL; ++i) {
        if (!supported) continue;
        if (!chosen) {
            g_kernels = k;
            chosen = 1;
        }
        if (g_supported[0]) strncat(g_supported, ",", sizeof g_supported - strlen(g_supported) - 1);
        strncat(g_supported, k->name, sizeof g_supported - strlen(g_supported) - 1);
    }
}

int kb_abi_version(void) { return KB_ABI_VERSION; }

const char *kb_isa(void) { return g_kernels->name; }

const char *kb_supported_isas(void) { return g_supported; }

int kb_set_isa(const char *name) {
    int supported = 0;
    const kb_kernels *k;
    for (int i = 0; (k = candidate(i, &supported)) != NULL; ++i) {
        if (strcmp(k->name, name) == 0 && supported) {
            g_kernels = k;
            return 0;
        }
    }
    return -1;
}

const char *kb_openmp(void) {
#ifdef _OPENMP
#define KB_STR2(x) #x
#define KB_STR(x) KB_STR2(x)
    return "OpenMP " KB_STR(_OPENMP);
#else
    return "none";
#endif
}

/* ================================================================== threading */
/* Below this many elements per thread a parallel region costs more than it saves. */
#define KB_GRAIN 32768

static int threads_for(int64_t work, int nthreads, int64_t grain) {
    if (nthreads < 1) nthreads = 1;
    int64_t most = work / grain;
    if (most < 1) most = 1;
    return most < nthreads ? (int)most : nthreads;
}

/* The t-th of nt contiguous shares of [0, count), each share a multiple of ``align``. */
static void share(int64_t count, int t, int nt, int64_t align, int64_t *lo, int64_t *hi) {
    int64_t units = (count + align - 1) / align;
    int64_t a = units * t / nt * align, b = units * (t + 1) / nt * align;
    *lo = a < count ? a : count;
    *hi = b < count ? b : count;
}

/* =============================================================== output memory */
/* Outputs are fresh torch allocations that the kernels touch first, and a large one costs
 * one page fault per 4 KiB page on first touch: on virtual machines that is several
 * microseconds each, more than the kernel itself takes. Asking for transparent huge pages
 * on the 2 MiB-aligned interior of a large output (what torch does for all allocations
 * under THP_MEM_ALLOC_ENABLE=1) makes that one fault per 2 MiB. Advice only: where huge
 * pages are disabled it changes nothing. */
static void prefer_huge_pages(void *ptr, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t huge = (uintptr_t)2 << 20;
    if (bytes < (int64_t)(2 * huge)) return;
    const uintptr_t begin = ((uintptr_t)ptr + huge - 1) & ~(huge - 1);
    const uintptr_t end = ((uintptr_t)ptr + (uintptr_t)bytes) & ~(huge - 1);
    if (end > begin) madvise((void *)begin, end - begin, MADV_HUGEPAGE);
#else
    (void)ptr;
    (void)bytes;
#endif
}

static int64_t dtype_size(int dtype) { return dtype == KB_F32 ? 4 : 2; }

/* ====================================================================== 8-bit */
void kb_quantize_blockwise(const void *x, int dtype, int64_t n, int64_t bs, const kb_codebook *cb, float *absmax,
                           uint8_t *codes, int nthreads) {
    const kb_kernels *k = g_kernels;
    const int64_t nblocks = (n + bs - 1) / bs;
    const int nt = threads_for(n, nthreads, KB_GRAIN);
    prefer_huge_pages(codes, n);
    if (nt <= 1) {
        k->quantize8_blocks(x, dtype, n, bs, 0, nblocks, cb, absmax, codes);
        return;
    }
#pragma omp parallel for num_threads(nt) schedule(static, 1)
    for (int t = 0; t < nt; ++t) {
        int64_t b0, b1;
        share(nblocks, t, nt, 1, &b0, &b1);
        k->quantize8_blocks(x, dtype, n, bs, b0, b1, cb, absmax, codes);
    }
}

void kb_dequantize_blockwise(const uint8_t *codes, int64_t n, int64_t bs, const float *code, const float *absmax,
                             void *out, int dtype, int nthreads) {
    const kb_kernels *k = g_kernels;
    const int nt = threads_for(n, nthreads, KB_GRAIN);
    prefer_huge_pages(out, n * dtype_size(dtype));
    if (nt <= 1) {
        k->dequantize8(codes, 0, n, bs, code, absmax, out, dtype);
        return;
    }
#pragma omp parallel for num_threads(nt) schedule(static, 1)
    for (int t = 0; t < nt; ++t) {
        int64_t i0, i1;
        share(n, t, nt, 64, &i0, &i1);
        k->dequantize8(codes, i0, i1, bs, code, absmax, out, dtype);
    }
}

/* max |x| over the whole input (NaN if any element is NaN), in parallel. */
static float tensor_absmax(const kb_kernels *k, const void *x, int dtype, int64_t n, int nt) {
    if (nt <= 1) return k->absmax_range(x, dtype, 0, n);
    float parts[256];
    if (nt > 256) nt = 256;
#pragma omp parallel for num_threads(nt) schedule(static, 1)
    for (int t = 0; t < nt; ++t) {
        int64_t i0, i1;
        share(n, t, nt, 64, &i0, &i1);
        parts[t] = k->absmax_range(x, dtype, i0, i1);
    }
    uint32_t best = 0;
    for (int t = 0; t < nt; ++t)
        if (kb_bits(parts[t]) > best) best = kb_bits(parts[t]);
    return kb_float(best);
}

static void quantize_scaled(const kb_kernels *k, const void *x, int dtype, int64_t n, float scale,
                            const kb_codebook *cb, uint8_t *codes, int nt) {
    prefer_huge_pages(codes, n);
    if (nt <= 1) {
        k->quantize8_scaled(x, dtype, 0, n, scale, cb, codes);
        return;
    }
#pragma omp parallel for num_threads(nt) schedule(static, 1)
    for (int t = 0; t < nt; ++t) {
        int64_t i0, i1;
        share(n, t, nt, 64, &i0, &i1);
        k->quantize8_scaled(x, dtype, i0, i1, scale, cb, codes);
    }
}

void kb_quantize_tensor(const void *x, int dtype, int64_t n, const kb_codebook *cb, float *absmax, uint8_t *codes,
                        int nthreads) {
    const kb_kernels *k = g_kernels;
    const int nt = threads_for(n, nthreads, KB_GRAIN);
    const float am = n > 0 ? tensor_absmax(k, x, dtype, n, nt) : 0.0f;
    absmax[0] = am;
    quantize_scaled(k, x, dtype, n, am == 0.0f ? 0.0f : 1.0f / am, cb, codes, nt);
}

void kb_quantize_no_absmax(const void *x, int dtype, int64_t n, const kb_codebook *cb, uint8_t *codes,
                           int nthreads) {
    quantize_scaled(g_kernels, x, dtype, n, 1.0f, cb, codes, threads_for(n, nthreads, KB_GRAIN));
}

/* Stochastic rounding (sorted tables): lo = largest code value <= x, hi = smallest >= x,
 * clamped to the table's ends; x takes hi's code when r < (x - lo) / (hi - lo). */
static int32_t stochastic_code(const kb_codebook *cb, float x, float r) {
    const int32_t last = cb->nbounds; /* distinct values: nbounds + 1 */
    if (x != x) return cb->sorted_index[last];
    int32_t lo = 0, hi = last + 1; /* first index with sorted[j] > x, by bisection */
    while (lo < hi) {
        int32_t mid = (lo + hi) / 2;
        if (cb->sorted[mid] <= x) lo = mid + 1;
        else hi = mid;
    }
    const int32_t above = lo; /* sorted[above] > x */
    if (above == 0) return cb->sorted_index[0];
    const int32_t below = above - 1; /* sorted[below] <= x */
    if (cb->sorted[below] == x || above > last) return cb->sorted_index[below];
    const float low = cb->sorted[below], high = cb->sorted[above];
    return r < (x - low) / (high - low) ? cb->sorted_index[above] : cb->sorted_index[below];
}

void kb_quantize_blockwise_stochastic(const void *x, int dtype, int64_t n, int64_t bs, const kb_codebook *cb,
                                      const float *rand, int64_t nrand, float *absmax, uint8_t *codes,
                                      int nthreads) {
    const kb_kernels *k = g_kernels;
    const int64_t nblocks = (n + bs - 1) / bs;
    const int nt = threads_for(n, nthreads, KB_GRAIN / 4);
#pragma omp parallel for num_threads(nt) schedule(static, 1) if (nt > 1)
    for (int t = 0; t < nt; ++t) {
        int64_t b0, b1;
        share(nblocks, t, nt, 1, &b0, &b1);
        for (int64_t b = b0; b < b1; ++b) {
            const int64_t i0 = b * bs, i1 = i0 + bs < n ? i0 + bs : n;
            const float am = k->absmax_range(x, dtype, i0, i1);
            const float scale = am == 0.0f ? 0.0f : 1.0f / am;
            absmax[b] = am;
            for (int64_t i = i0; i < i1; ++i) {
                float v;
                if (dtype == KB_F32) v = ((const float *)x)[i];
                else if (dtype == KB_F16) v = kb_f16_to_f32(((const uint16_t *)x)[i]);
                else v = kb_bf16_to_f32(((const uint16_t *)x)[i]);
                codes[i] = (uint8_t)stochastic_code(cb, v * scale, rand[i % nrand]);
            }
        }
    }
}

/* ====================================================================== 4-bit */
void kb_quantize_4bit(const void *x, int dtype, int64_t n, int64_t bs, const kb_codebook *cb, float *absmax,
                      uint8_t *packed, int64_t padded_bytes, int nthreads) {
    const kb_kernels *k = g_kernels;
    const int64_t nblocks = (n + bs - 1) / bs, used = (n + 1) / 2;
    const int nt = threads_for(n, nthreads, KB_GRAIN);
    prefer_huge_pages(packed, padded_bytes);
    if (nt <= 1) {
        k->quantize4_blocks(x, dtype, n, bs, 0, nblocks, cb, absmax, packed);
    } else {
#pragma omp parallel for num_threads(nt) schedule(static, 1)
        for (int t = 0; t < nt; ++t) {
            int64_t b0, b1;
            share(nblocks, t, nt, 1, &b0, &b1);
            k->quantize4_blocks(x, dtype, n, bs, b0, b1, cb, absmax, packed);
        }
    }
    if (padded_bytes > used) memset(packed + used, 0, (size_t)(padded_bytes - used));
}

void kb_dequantize_4bit(const uint8_t *packed, int64_t n, int64_t bs, const float *table, const float *absmax,
                        void *out, int dtype, int nthreads) {
    const kb_kernels *k = g_kernels;
    const int nt = threads_for(n, nthreads, KB_GRAIN);
    const int64_t size = dtype_size(dtype);
    prefer_huge_pages(out, n * size);
    if (nt <= 1) {
        k->dequantize4(packed, 0, n, bs, table, absmax, out, dtype);
        return;
    }
#pragma omp parallel for num_threads(nt) schedule(static, 1)
    for (int t = 0; t < nt; ++t) {
        int64_t i0, i1;
        share(n, t, nt, 64, &i0, &i1); /* even starts: whole bytes */
        k->dequantize4(packed, i0, i1, bs, table, absmax, out, dtype);
    }
}

static float load_scalar(const void *x, int dtype, int64_t i) {
    if (dtype == KB_F32) return ((const float *)x)[i];
    if (dtype == KB_F16) return kb_f16_to_f32(((const uint16_t *)x)[i]);
    return kb_bf16_to_f32(((const uint16_t *)x)[i]);
}

static void store_scalar(void *y, int dtype, int64_t i, float v) {
    if (dtype == KB_F32) ((float *)y)[i] = v;
    else if (dtype == KB_F16) ((uint16_t *)y)[i] = kb_f32_to_f16(v);
    else ((uint16_t *)y)[i] = kb_f32_to_bf16(v);
}

int kb_matmul_4bit(const void *A, int a_dtype, int64_t M, int64_t K, const uint8_t *packed, const float *absmax,
                   int64_t bs, const float *table, int64_t N, const void *bias, void *out, int out_dtype, int nthreads) {
    const kb_kernels *k = g_kernels;
    /* A copied once into the layout the kernel reads (kernels.c, gemm4_layout): a copy of
     * the activations, never of the weight. */
    const int64_t bytes = k->gemm4_packed_a_bytes(M, K, a_dtype);
    void *packed_a = malloc((size_t)(bytes > 0 ? bytes : 1));
    if (!packed_a) return -1;
    k->gemm4_pack_a(A, a_dtype, M, K, packed_a);
    const int nt = threads_for(N * K * (M < 4 ? 1 : M / 4), nthreads, 1 << 18);
    if (nt <= 1) {
        k->gemm4(packed_a, a_dtype, M, K, packed, absmax, bs, table, 0, N, N, bias, out, out_dtype);
    } else {
#pragma omp parallel for num_threads(nt) schedule(static, 1)
        for (int t = 0; t < nt; ++t) {
            int64_t o0, o1;
            share(N, t, nt, 8, &o0, &o1);
            k->gemm4(packed_a, a_dtype, M, K, packed, absmax, bs, table, o0, o1, N, bias, out, out_dtype);
        }
    }
    free(packed_a);
    return 0;
}

/* ======================================================================= int8 */
int64_t kb_int8_vectorwise_quant(const void *A, int dtype, int64_t rows, int64_t K, float threshold, int8_t *codes,
                                 float *stats, int64_t *outlier_cols, int nthreads) {
    const kb_kernels *k = g_kernels;
    uint8_t *colmask = NULL;
    int64_t count = 0;
    if (threshold > 0.0f && K > 0) {
        colmask = (uint8_t *)calloc((size_t)K, 1);
        if (!colmask) return -1;
        for (int64_t r = 0; r < rows; ++r)
            for (int64_t c = 0; c < K; ++c)
                if (fabsf(load_scalar(A, dtype, r * K + c)) >= threshold) colmask[c] = 1;
        for (int64_t c = 0; c < K; ++c)
            if (colmask[c]) outlier_cols[count++] = c;
        if (count == 0) {
            free(colmask);
            colmask = NULL;
        }
    }
    const int nt = threads_for(rows * K, nthreads, KB_GRAIN);
    prefer_huge_pages(codes, rows * K);
    if (nt <= 1) {
        k->int8_quant_rows(A, dtype, 0, rows, K, threshold, colmask, codes, stats);
    } else {
#pragma omp parallel for num_threads(nt) schedule(static, 1)
        for (int t = 0; t < nt; ++t) {
            int64_t r0, r1;
            share(rows, t, nt, 1, &r0, &r1);
            k->int8_quant_rows(A, dtype, r0, r1, K, threshold, colmask, codes, stats);
        }
    }
    free(colmask);
    return count;
}

void kb_int8_vectorwise_dequant(const int8_t *A, int64_t rows, int64_t K, const float *stats, float *out,
                                int nthreads) {
    const kb_kernels *k = g_kernels;
    const int nt = threads_for(rows * K, nthreads, KB_GRAIN);
    prefer_huge_pages(out, rows * K * 4);
    if (nt <= 1) {
        k->int8_dequant_rows(A, 0, rows, K, stats, out);
        return;
    }
#pragma omp parallel for num_threads(nt) schedule(static, 1)
    for (int t = 0; t < nt; ++t) {
        int64_t r0, r1;
        share(rows, t, nt, 1, &r0, &r1);
        k->int8_dequant_rows(A, r0, r1, K, stats, out);
    }
}

void kb_int8_mm_dequant(const int32_t *A, int64_t rows, int64_t N, const float *row_stats, const float *col_stats,
                        const float *bias, int bias_dtype, void *out, int out_dtype, int nthreads) {
    const int nt = threads_for(rows * N, nthreads, KB_GRAIN);
    prefer_huge_pages(out, rows * N * dtype_size(out_dtype));
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < N; ++c) {
            /* (row * col / 127^2) * C (+ bias), in float32 */
            float v = ((row_stats[r] * col_stats[c]) / 16129.0f) * (float)A[r * N + c];
            if (bias) v = v + load_scalar(bias, bias_dtype, c);
            store_scalar(out, out_dtype, r * N + c, v);
        }
}

/* ================================================================= optimizers */
#define KB_OPT_GRAIN 16384

static void run_optimizer_pass(const kb_kernels *k, kb_optimizer_step *st, kb_optimizer_tensors *t, int pass, int nt,
                               kb_partials *parts) {
    const int64_t align = st->layout == KB_STATE_U8_BLOCKWISE ? 256 : 64;
    if (nt <= 1) {
        k->optimizer_range(st, t, 0, t->n, pass, &parts[0]);
        return;
    }
#pragma omp parallel for num_threads(nt) schedule(static, 1)
    for (int i = 0; i < nt; ++i) {
        int64_t i0, i1;
        share(t->n, i, nt, align, &i0, &i1);
        k->optimizer_range(st, t, i0, i1, pass, &parts[i]);
    }
}

int kb_optimizer_update(kb_optimizer_step *st, kb_optimizer_tensors *t, float *unorm, int nthreads) {
    const kb_kernels *k = g_kernels;
    int nt = threads_for(t->n, nthreads, KB_OPT_GRAIN);
    if (nt > 64) nt = 64;
    kb_partials parts[64];
    memset(parts, 0, sizeof parts);
    st->use_update_scale = 0;
    st->update_scale = 1.0f;
    const int measure = st->layout == KB_STATE_U8_TENSOR || (st->clip && st->layout == KB_STATE_F32);
    if (measure) {
        run_optimizer_pass(k, st, t, KB_PASS_MEASURE, nt, parts);
        double param_sq = 0.0, update_sq = 0.0;
        int32_t max1 = 0, max2 = 0;
        for (int i = 0; i < nt; ++i) {
            param_sq += parts[i].param_sq;
            update_sq += parts[i].update_sq;
            if (parts[i].max1_bits > max1) max1 = parts[i].max1_bits;
            if (parts[i].max2_bits > max2) max2 = parts[i].max2_bits;
        }
        if (st->layout == KB_STATE_U8_TENSOR) {
            t->new_max1 = kb_float((uint32_t)max1);
            t->new_max2 = kb_float((uint32_t)max2);
        }
        if (st->clip) {
            const float update_norm = (float)sqrt(update_sq), param_norm = (float)sqrt(param_sq);
            if (unorm) *unorm = update_norm * update_norm;
            const float limit = st->max_unorm * param_norm;
            st->update_scale = update_norm > limit ? limit / update_norm : 1.0f;
            st->use_update_scale = 1;
        }
    }
    run_optimizer_pass(k, st, t, KB_PASS_WRITE, nt, parts);
    return 0;
}
