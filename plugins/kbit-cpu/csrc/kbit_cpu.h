/* kbit-cpu: the C ABI of kbit's native CPU kernels.
 *
 * Plain C, called from Python through ctypes on tensor data pointers: no libtorch, no
 * Python headers, so one build serves every torch version. Every output buffer is
 * allocated by the caller (torch) and every input has been validated by kbit before it
 * gets here; the functions only compute. ``nthreads`` is the number of threads a call may
 * use (the caller passes torch.get_num_threads()); small calls run on the calling thread.
 *
 * dtype codes: KB_F32 = 0, KB_F16 = 1, KB_BF16 = 2.
 */
#ifndef KBIT_CPU_H
#define KBIT_CPU_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define KB_API __declspec(dllexport)
#else
#define KB_API __attribute__((visibility("default")))
#endif

#define KB_ABI_VERSION 3
#define KB_MAX_CODES 256

enum { KB_F32 = 0, KB_F16 = 1, KB_BF16 = 2 };

/* Optimizer kinds (docs/formats.md section 5). */
enum {
    KB_OPT_ADAM = 0,
    KB_OPT_MOMENTUM = 1,
    KB_OPT_RMSPROP = 2,
    KB_OPT_LION = 3,
    KB_OPT_ADAGRAD = 4,
    KB_OPT_LAMB = 5,
    KB_OPT_LARS = 6,
    KB_OPT_ADEMAMIX = 7,
};

typedef struct kb_codebook kb_codebook;

/* Scalars of one optimizer step, as the update applies them (float32). The caller derives
 * the compound ones (bias corrections, step size) in double precision and rounds once,
 * exactly as the reference backend's PyTorch expressions do. */
typedef struct kb_optimizer_step {
    int32_t kind;
    int32_t layout;          /* 0: float32 states, 1: 8-bit blockwise, 2: 8-bit whole-tensor */
    int32_t dtype;           /* of p and g */
    int32_t first_step;      /* step == 1 (momentum and LARS copy the gradient) */
    int32_t decoupled_decay; /* weight decay multiplies p (1) or is added to the gradient (0) */
    int32_t skip_zeros;      /* elements whose gradient is exactly 0 are left untouched */
    int32_t has_weight_decay;
    int32_t has_gnorm_scale;
    int32_t clip;             /* max_unorm > 0: a first pass measures ||p|| and ||update|| */
    int32_t use_update_scale; /* set by kb_optimizer_update between the passes */
    float beta1, beta2, beta3, alpha, eps, weight_decay, gnorm_scale;
    float one_minus_beta1, one_minus_beta2, one_minus_beta3;
    float decay;         /* 1 - lr * weight_decay */
    float step_size;     /* -lr * update_factor */
    float neg_lr;        /* -lr */
    float update_factor; /* Adam, LAMB: sqrt(1 - beta2^t) / (1 - beta1^t); 1 for the others */
    float eps_scaled;    /* Adam, LAMB: eps * sqrt(1 - beta2^t) */
    float inv_c1;        /* AdEMAMix: 1 / (1 - beta1^t) */
    float c2;            /* AdEMAMix: sqrt(1 - beta2^t) */
    float max_unorm;
    float update_scale;  /* the trust ratio, set between the passes */
} kb_optimizer_step;

/* The tensors of one optimizer step (data pointers). */
typedef struct kb_optimizer_tensors {
    void *p;
    const void *g;
    void *state1;              /* float32, or uint8 codes (AdEMAMix: 2 * n elements) */
    void *state2;              /* NULL for one-state kinds */
    const float *qmap1;        /* 8-bit: the 256 code values */
    const float *qmap2;
    const kb_codebook *cb1;    /* 8-bit: qmap1 prepared for requantization */
    const kb_codebook *cb2;
    float *absmax1;            /* blockwise: per 256 elements, rewritten (AdEMAMix: 2 rows) */
    float *absmax2;
    float max1, max2;          /* whole-tensor: the states' current scales */
    float new_max1, new_max2;  /* whole-tensor: the new scales (found by the first pass) */
    int64_t n;
} kb_optimizer_tensors;

KB_API int kb_abi_version(void);
/* Name of the instruction set the kernels run with: "avx512bf16", "avx512vbmi", "avx512", "avx2" or "portable". */
KB_API const char *kb_isa(void);
/* Names of the instruction sets this CPU and build support, best first, comma separated. */
KB_API const char *kb_supported_isas(void);
/* Use the named instruction set ("avx512bf16", "avx512vbmi", "avx512", "avx2", "portable"); returns 0, or -1 when this
 * CPU or build cannot run it (the current choice is kept). */
KB_API int kb_set_isa(const char *name);
/* Name and version of the OpenMP runtime the library is linked with ("none" without). */
KB_API const char *kb_openmp(void);

KB_API size_t kb_codebook_size(void);
/* Prepare ``n`` (<= 256) float32 code values for exact nearest-code search into ``cb``
 * (kb_codebook_size() bytes). Returns 0, or -1 when a value is NaN. */
KB_API int kb_codebook_init(kb_codebook *cb, const float *values, int n);
KB_API int kb_codebook_steps(const kb_codebook *cb);
/* Buckets per sign of the table's compact index (0: the table is searched without one). */
KB_API int kb_codebook_compact_size(const kb_codebook *cb);
/* Make a prepared table use the general search, as a table without a compact index does
 * (lets tests compare both methods on the same table). */
KB_API void kb_codebook_drop_compact(kb_codebook *cb);

/* ---------------------------------------------------------------- 8-bit */
KB_API void kb_quantize_blockwise(const void *x, int dtype, int64_t n, int64_t blocksize, const kb_codebook *cb,
                                  float *absmax, uint8_t *codes, int nthreads);
/* Stochastic rounding: element i uses rand[i % nrand]. */
KB_API void kb_quantize_blockwise_stochastic(const void *x, int dtype, int64_t n, int64_t blocksize,
                                             const kb_codebook *cb, const float *rand, int64_t nrand,
                                             float *absmax, uint8_t *codes, int nthreads);
KB_API void kb_dequantize_blockwise(const uint8_t *codes, int64_t n, int64_t blocksize, const float *code,
                                    const float *absmax, void *out, int dtype, int nthreads);
/* Whole tensor: one scale; absmax[0] receives it (0 for n == 0). */
KB_API void kb_quantize_tensor(const void *x, int dtype, int64_t n, const kb_codebook *cb, float *absmax,
                               uint8_t *codes, int nthreads);
/* Code-only: the values are used as they are (no scale). */
KB_API void kb_quantize_no_absmax(const void *x, int dtype, int64_t n, const kb_codebook *cb, uint8_t *codes,
                                  int nthreads);

/* ---------------------------------------------------------------- 4-bit */
/* ``packed`` holds (n + 1) / 2 bytes; ``padded_bytes`` >= that many are written (zeros after). */
KB_API void kb_quantize_4bit(const void *x, int dtype, int64_t n, int64_t blocksize, const kb_codebook *cb,
                             float *absmax, uint8_t *packed, int64_t padded_bytes, int nthreads);
KB_API void kb_dequantize_4bit(const uint8_t *packed, int64_t n, int64_t blocksize, const float *table,
                               const float *absmax, void *out, int dtype, int nthreads);
/* out[M, N] (dtype out_dtype) = A[M, K] (dtype a_dtype) @ W[N, K].T (+ bias[N], dtype
 * out_dtype, added before the one rounding to out_dtype; NULL for none), W 4-bit packed.
 * Returns 0, or -1 when the copy of A cannot be allocated (out is then not written). */
KB_API int kb_matmul_4bit(const void *A, int a_dtype, int64_t M, int64_t K, const uint8_t *packed,
                          const float *absmax, int64_t blocksize, const float *table, int64_t N, const void *bias,
                          void *out, int out_dtype, int nthreads);

/* ---------------------------------------------------------------- int8 */
/* Returns the number of outlier columns written to ``outlier_cols`` (capacity K). */
KB_API int64_t kb_int8_vectorwise_quant(const void *A, int dtype, int64_t rows, int64_t K, float threshold,
                                        int8_t *codes, float *stats, int64_t *outlier_cols, int nthreads);
KB_API void kb_int8_vectorwise_dequant(const int8_t *A, int64_t rows, int64_t K, const float *stats, float *out,
                                       int nthreads);
KB_API void kb_int8_mm_dequant(const int32_t *A, int64_t rows, int64_t N, const float *row_stats,
                               const float *col_stats, const float *bias, int bias_dtype, void *out,
                               int out_dtype, int nthreads);

/* ---------------------------------------------------------------- optimizers */
/* One step, in place. With ``step->clip`` the update is scaled to at most
 * max_unorm * ||p|| and ``unorm`` (may be NULL) receives the squared update norm. Returns 0. */
KB_API int kb_optimizer_update(kb_optimizer_step *step, kb_optimizer_tensors *tensors, float *unorm, int nthreads);

#endif /* KBIT_CPU_H */
