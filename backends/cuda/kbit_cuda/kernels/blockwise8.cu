// blockwise8.cu: 8-bit quantization (blockwise, whole-tensor, code-only, stochastic
// rounding), 8-bit dequantization, and the code-table preparation every quantizer uses.

#include "quantize.cuh"

namespace kbit {

// -------------------------------------------------------------- code table preparation
// One block of 256 threads turns a code table (n <= 256 float32 values, any order) into a
// CodeTable: sort (value, index) pairs, keep the first index of each distinct value, and
// compute the decision boundary between neighbours exactly as the reference backend does
// (kbit_reference._common): the midpoint in float64, rounded to the float32 on the side
// that keeps ties with the lower code index.
__device__ __forceinline__ bool pair_less(float a, int ia, float b, int ib) { return a < b || (a == b && ia < ib); }

__device__ void prepare_table(const float* __restrict__ code, int n, CodeTable* __restrict__ table)
{
    __shared__ float s_value[256];
    __shared__ int s_index[256];
    __shared__ int s_warp_kept[8];
    __shared__ float s_unique[256];
    __shared__ int s_unique_index[256];
    const int t = threadIdx.x;
    const float inf = __int_as_float(0x7f800000);
    s_value[t] = t < n ? code[t] : inf;
    s_index[t] = t;
    __syncthreads();

    // Bitonic sort of 256 (value, index) pairs, ascending; equal values by index (stable).
    for (int size = 2; size <= 256; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            const int partner = t ^ stride;
            if (partner > t) {
                const bool ascending = (t & size) == 0;
                const bool swap = ascending ? pair_less(s_value[partner], s_index[partner], s_value[t], s_index[t])
                                            : pair_less(s_value[t], s_index[t], s_value[partner], s_index[partner]);
                if (swap) {
                    const float v = s_value[t];
                    s_value[t] = s_value[partner];
                    s_value[partner] = v;
                    const int i = s_index[t];
                    s_index[t] = s_index[partner];
                    s_index[partner] = i;
                }
            }
            __syncthreads();
        }
    }

    // Compact the first of each run of equal values (indices past n are padding).
    const bool keep = s_index[t] < n && (t == 0 || s_value[t] != s_value[t - 1]);
    const unsigned ballot = __ballot_sync(KBIT_FULL_MASK, keep);
    if ((t & 31) == 0) s_warp_kept[t >> 5] = __popc(ballot);
    s_unique[t] = inf;
    s_unique_index[t] = 0;
    __syncthreads();
    int position = __popc(ballot & ((1u << (t & 31)) - 1u));
    int count = 0;
    for (int w = 0; w < 8; ++w) {
        if (w < (t >> 5)) position += s_warp_kept[w];
        count += s_warp_kept[w];
    }
    if (keep) {
        s_unique[position] = s_value[t];
        s_unique_index[position] = s_index[t];
    }
    __syncthreads();

    float bound = inf;
    if (t + 1 < count) {
        const double mid = __dmul_rn(__dadd_rn((double)s_unique[t], (double)s_unique[t + 1]), 0.5);
        const float mid32 = __double2float_rn(mid);
        const float below = nextafterf(mid32, -inf);
        const bool lower_index_wins = s_unique_index[t] < s_unique_index[t + 1];
        // Lower index wins a tie: x goes low iff x <= mid, i.e. x <= the largest float <= mid.
        // Upper index wins: x goes low iff x < mid, i.e. x <= the largest float < mid.
        const bool rounded_up = lower_index_wins ? (double)mid32 > mid : (double)mid32 >= mid;
        bound = rounded_up ? below : mid32;
    }
    table->bounds[t] = bound;
    table->values[t] = s_unique[t];
    table->index[t] = (unsigned char)s_unique_index[t];
    if (t == 0) table->count = count;
}

// ------------------------------------------------------------------------ dequantization
// out[i] = code[A[i]] * absmax[i / blocksize] in float32, cast to T; without absmax
// (dequantize_no_absmax) code[A[i]] alone. Four codes per thread per step (one 4-byte
// load), grid-stride; the code table sits in shared memory.
template <typename T>
__device__ void dequantize_8bit(const unsigned char* __restrict__ A, const float* __restrict__ code, int code_size,
                                const float* __restrict__ absmax, T* __restrict__ out, long long n,
                                long long blocksize, int vector_ok)
{
    __shared__ float s_code[256];
    for (int i = threadIdx.x; i < 256; i += blockDim.x)
        s_code[i] = i < code_size ? code[i] : __int_as_float(0x7fffffff);  // codes past the table: NaN
    __syncthreads();
    const long long stride = 4LL * gridDim.x * blockDim.x;
    for (long long i = 4LL * ((long long)blockIdx.x * blockDim.x + threadIdx.x); i < n; i += stride) {
        const bool vector = vector_ok && i + 4 <= n;
        unsigned char q[4];
        if (vector) {
            const unsigned packed = *reinterpret_cast<const unsigned*>(A + i);
#pragma unroll
            for (int j = 0; j < 4; ++j) q[j] = (unsigned char)(packed >> (8 * j));
        } else {
#pragma unroll
            for (int j = 0; j < 4; ++j) q[j] = i + j < n ? A[i + j] : 0;
        }
        float v[4];
        if (absmax != nullptr) {
            // blocksize is a multiple of 4 (or the whole tensor): one scale per thread.
            const float scale = absmax[i / blocksize];
#pragma unroll
            for (int j = 0; j < 4; ++j) v[j] = __fmul_rn(s_code[q[j]], scale);
        } else {
#pragma unroll
            for (int j = 0; j < 4; ++j) v[j] = s_code[q[j]];
        }
        store4(out, i, n, vector, v);
    }
}

}  // namespace kbit

extern "C" __global__ void __launch_bounds__(256) prepare_code_table(const float* code, int n, kbit::CodeTable* table)
{
    kbit::prepare_table(code, n, table);
}

#define KBIT_QUANTIZE_8BIT(NAME, T, VECS, STOCHASTIC)                                                      \
    extern "C" __global__ void __launch_bounds__(KBIT_QUANT_THREADS)                                           \
        NAME(const T* A, const kbit::CodeTable* table, float* absmax, unsigned char* out, long long n,         \
             int blocksize, int mode, int vector_ok, const float* rand, long long rand_count)                  \
    {                                                                                                          \
        kbit::quantize_tiles<T, 8, VECS, STOCHASTIC>(A, table, absmax, out, n, blocksize, mode, vector_ok, rand, \
                                                     rand_count);                                              \
    }
#define KBIT_QUANTIZE_8BIT_ALL(SUFFIX, T)                               \
    KBIT_QUANTIZE_8BIT(quantize_8bit_##SUFFIX##_v1, T, 1, false)        \
    KBIT_QUANTIZE_8BIT(quantize_8bit_##SUFFIX##_v2, T, 2, false)        \
    KBIT_QUANTIZE_8BIT(quantize_8bit_##SUFFIX##_v4, T, 4, false)        \
    KBIT_QUANTIZE_8BIT(quantize_8bit_##SUFFIX##_v1_stochastic, T, 1, true) \
    KBIT_QUANTIZE_8BIT(quantize_8bit_##SUFFIX##_v2_stochastic, T, 2, true) \
    KBIT_QUANTIZE_8BIT(quantize_8bit_##SUFFIX##_v4_stochastic, T, 4, true)
KBIT_QUANTIZE_8BIT_ALL(f32, float)
KBIT_QUANTIZE_8BIT_ALL(f16, __half)
KBIT_QUANTIZE_8BIT_ALL(bf16, __nv_bfloat16)

#define KBIT_DEQUANTIZE_8BIT(NAME, T)                                                                          \
    extern "C" __global__ void __launch_bounds__(256)                                                         \
        NAME(const unsigned char* A, const float* code, int code_size, const float* absmax, T* out, long long n, \
             long long blocksize, int vector_ok)                                                               \
    {                                                                                                          \
        kbit::dequantize_8bit<T>(A, code, code_size, absmax, out, n, blocksize, vector_ok);                   \
    }
KBIT_DEQUANTIZE_8BIT(dequantize_8bit_f32, float)
KBIT_DEQUANTIZE_8BIT(dequantize_8bit_f16, __half)
KBIT_DEQUANTIZE_8BIT(dequantize_8bit_bf16, __nv_bfloat16)

// Largest magnitude of the whole tensor, NaN winning, as the bits of a non-negative float:
// for those, unsigned order is float order and every NaN is above inf, so atomicMax on
// the bits is a NaN-propagating max. absmax_bits must start at 0.
template <typename T>
__device__ void tensor_absmax(const T* __restrict__ A, long long n, unsigned* __restrict__ absmax_bits, int vector_ok)
{
    float m = 0.0f;
    const long long stride = 4LL * gridDim.x * blockDim.x;
    for (long long i = 4LL * ((long long)blockIdx.x * blockDim.x + threadIdx.x); i < n; i += stride) {
        float v[4];
        kbit::load4(A, i, n, vector_ok && i + 4 <= n, 0.0f, v);
#pragma unroll
        for (int j = 0; j < 4; ++j) m = kbit::max_nan(m, fabsf(v[j]));
    }
    m = kbit::group_max_nan(m, KBIT_WARP);
    if ((threadIdx.x & 31) == 0) atomicMax(absmax_bits, __float_as_uint(m));
}

#define KBIT_TENSOR_ABSMAX(NAME, T)                                                                            \
    extern "C" __global__ void __launch_bounds__(256) NAME(const T* A, long long n, unsigned* absmax_bits,     \
                                                           int vector_ok)                                      \
    {                                                                                                          \
        tensor_absmax<T>(A, n, absmax_bits, vector_ok);                                                        \
    }
KBIT_TENSOR_ABSMAX(tensor_absmax_f32, float)
KBIT_TENSOR_ABSMAX(tensor_absmax_f16, __half)
KBIT_TENSOR_ABSMAX(tensor_absmax_bf16, __nv_bfloat16)
