// int8.cu: LLM.int8() row- and column-wise quantization, dequantization and the scaling
// of an int32 product back to floats (docs/formats.md section 4).
//
// Codes are round_half_even(a * 127 / absmax) in float32 (multiply, then divide: the
// reference's order), NaN -> 0; a zero statistic divides by 1. With threshold > 0 an
// element with |a| >= threshold is an outlier: it is left out of the statistics (counted
// as 0), and its whole column is zeroed in the row-wise codes.

#include "common.cuh"

namespace kbit {

__device__ __forceinline__ bool is_inlier(float a, float threshold) { return threshold <= 0.0f || !(fabsf(a) >= threshold); }

__device__ __forceinline__ signed char int8_code(float value, float stat)
{
    const float safe = stat == 0.0f ? 1.0f : stat;
    const float q = rintf(__fdiv_rn(__fmul_rn(value, 127.0f), safe));
    return q != q ? (signed char)0 : (signed char)(int)q;
}

// col_mask[c] = 1 for every column holding an outlier (col_mask starts zeroed).
template <typename T>
__device__ void outlier_columns(const T* __restrict__ A, long long n, int K, float threshold, int* __restrict__ col_mask)
{
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        if (!is_inlier(to_float(A[i]), threshold)) col_mask[i % K] = 1;
}

// Row statistics and row-wise codes: one warp per row (8 per block), lanes striding over
// the row, which is read twice (the second time from L1/L2).
template <typename T>
__device__ void rowwise(const T* __restrict__ A, int rows, int K, float threshold, const int* __restrict__ col_mask,
                        signed char* __restrict__ CA, float* __restrict__ row_stats)
{
    const int lane = threadIdx.x & 31;
    const int warps = blockDim.x >> 5;
    for (int row = blockIdx.x * warps + (threadIdx.x >> 5); row < rows; row += gridDim.x * warps) {
        const T* a = A + (long long)row * K;
        float m = 0.0f;
        for (int c = lane; c < K; c += KBIT_WARP) {
            const float v = to_float(a[c]);
            if (is_inlier(v, threshold)) m = max_nan(m, fabsf(v));
        }
        m = group_max_nan(m, KBIT_WARP);
        if (lane == 0) row_stats[row] = m;
        signed char* out = CA + (long long)row * K;
        for (int c = lane; c < K; c += KBIT_WARP) {
            const float v = to_float(a[c]);
            const bool zeroed = col_mask != nullptr && col_mask[c] != 0;
            out[c] = zeroed ? (signed char)0 : int8_code(is_inlier(v, threshold) ? v : 0.0f, m);
        }
    }
}

// Column statistics: one thread per column walking down the rows (adjacent threads read
// adjacent columns: coalesced).
template <typename T>
__device__ void column_stats(const T* __restrict__ A, int rows, int K, float threshold, float* __restrict__ col_stats)
{
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < K; c += gridDim.x * blockDim.x) {
        float m = 0.0f;
        for (int r = 0; r < rows; ++r) {
            const float v = to_float(A[(long long)r * K + c]);
            if (is_inlier(v, threshold)) m = max_nan(m, fabsf(v));
        }
        col_stats[c] = m;
    }
}

// Column-wise codes (outliers count as 0, columns are not zeroed).
template <typename T>
__device__ void columnwise(const T* __restrict__ A, long long n, int K, float threshold,
                           const float* __restrict__ col_stats, signed char* __restrict__ CAt)
{
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float v = to_float(A[i]);
        CAt[i] = int8_code(is_inlier(v, threshold) ? v : 0.0f, col_stats[i % K]);
    }
}

// out = A * stats[row] / 127 in float32.
__device__ void dequantize_rows(const signed char* __restrict__ A, const float* __restrict__ stats,
                                float* __restrict__ out, long long n, int K)
{
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        out[i] = __fdiv_rn(__fmul_rn((float)A[i], stats[i / K]), 127.0f);
}

// out = C * (row * col / 127^2) (+ bias) in float32, cast to T: the reference's order.
template <typename T>
__device__ void mm_dequant(const int* __restrict__ C, const float* __restrict__ row_stats,
                           const float* __restrict__ col_stats, const float* __restrict__ bias, T* __restrict__ out,
                           long long n, int N)
{
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const int c = (int)(i % N);
        const float scale = __fdiv_rn(__fmul_rn(row_stats[i / N], col_stats[c]), 16129.0f);
        float v = __fmul_rn(scale, (float)C[i]);
        if (bias != nullptr) v = __fadd_rn(v, bias[c]);
        out[i] = from_float<T>(v);
    }
}

}  // namespace kbit

#define KBIT_INT8_KERNELS(SUFFIX, T)                                                                             \
    extern "C" __global__ void __launch_bounds__(256)                                                            \
        int8_outlier_columns_##SUFFIX(const T* A, long long n, int K, float threshold, int* col_mask)             \
    {                                                                                                            \
        kbit::outlier_columns<T>(A, n, K, threshold, col_mask);                                                   \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(256) int8_rowwise_##SUFFIX(                                     \
        const T* A, int rows, int K, float threshold, const int* col_mask, signed char* CA, float* row_stats)    \
    {                                                                                                            \
        kbit::rowwise<T>(A, rows, K, threshold, col_mask, CA, row_stats);                                        \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(256)                                                            \
        int8_column_stats_##SUFFIX(const T* A, int rows, int K, float threshold, float* col_stats)               \
    {                                                                                                            \
        kbit::column_stats<T>(A, rows, K, threshold, col_stats);                                                 \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(256) int8_columnwise_##SUFFIX(                                  \
        const T* A, long long n, int K, float threshold, const float* col_stats, signed char* CAt)               \
    {                                                                                                            \
        kbit::columnwise<T>(A, n, K, threshold, col_stats, CAt);                                                 \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(256) int8_mm_dequant_##SUFFIX(                                  \
        const int* C, const float* row_stats, const float* col_stats, const float* bias, T* out, long long n,    \
        int N)                                                                                                   \
    {                                                                                                            \
        kbit::mm_dequant<T>(C, row_stats, col_stats, bias, out, n, N);                                           \
    }
KBIT_INT8_KERNELS(f32, float)
KBIT_INT8_KERNELS(f16, __half)
KBIT_INT8_KERNELS(bf16, __nv_bfloat16)

extern "C" __global__ void __launch_bounds__(256)
    int8_dequantize_rows(const signed char* A, const float* stats, float* out, long long n, int K)
{
    kbit::dequantize_rows(A, stats, out, n, K);
}
