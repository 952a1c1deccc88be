// quant4.cu: NF4 / FP4 quantization, dequantization and the batch-1 product gemv_4bit.
//
// Packed layout (docs/formats.md section 2): two codes per byte, element 2j in the high
// nibble, one float32 absmax per block of `blocksize` (32..4096, a multiple of 8).

#include "quantize.cuh"

namespace kbit {

__device__ __forceinline__ int nibble(unsigned word, int element)  // element 0..7 of 4 packed bytes
{
    const unsigned byte = (word >> (8 * (element >> 1))) & 0xffu;
    return (element & 1) ? (int)(byte & 0x0fu) : (int)(byte >> 4);
}

// out[i] = table[code i] * absmax[i / blocksize], float32, cast to T. Eight elements (4
// packed bytes, one 4-byte load) per thread per step, grid-stride; one absmax per thread
// (8 | blocksize); stores of 8 elements (two float4, or one 16-byte vector of 16-bit).
template <typename T>
__device__ void dequantize_4bit(const unsigned char* __restrict__ packed, const float* __restrict__ table16,
                                const float* __restrict__ absmax, T* __restrict__ out, long long n, int blocksize,
                                int vector_ok)
{
    __shared__ float s_table[16];
    if (threadIdx.x < 16) s_table[threadIdx.x] = table16[threadIdx.x];
    __syncthreads();
    const long long stride = 8LL * gridDim.x * blockDim.x;
    for (long long i = 8LL * ((long long)blockIdx.x * blockDim.x + threadIdx.x); i < n; i += stride) {
        const bool vector = vector_ok && i + 8 <= n;
        unsigned word = 0;
        if (vector) {
            word = *reinterpret_cast<const unsigned*>(packed + i / 2);
        } else {
            for (int b = 0; b < 4; ++b)
                if (i + 2 * b < n) word |= (unsigned)packed[i / 2 + b] << (8 * b);
        }
        const float scale = absmax[i / blocksize];
        float v[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = __fmul_rn(s_table[nibble(word, e)], scale);
        store4(out, i, n, vector, v);
        store4(out, i + 4, n, vector, v + 4);
    }
}

// y[r] = sum_c A[c] * table[code(r, c)] * absmax[(r * K + c) / blocksize] for one input
// row A (K elements) and the packed [N, K] weight: one warp per output row, 8 rows per
// 256-thread block (grid-stride over rows). The fast path (K % 8 == 0, aligned data)
// reads 4 packed bytes and 8 inputs per lane per step: the weight, the only large
// operand, streams through once at 0.5 byte per element; A stays in L1/L2.
template <typename T>
__device__ void gemv_4bit(const T* __restrict__ A, const unsigned char* __restrict__ packed,
                          const float* __restrict__ table16, const float* __restrict__ absmax, T* __restrict__ out,
                          int N, int K, int blocksize, int fast)
{
    __shared__ float s_table[16];
    if (threadIdx.x < 16) s_table[threadIdx.x] = table16[threadIdx.x];
    __syncthreads();
    const int lane = threadIdx.x & 31;
    const int warps = blockDim.x >> 5;
    for (int row = blockIdx.x * warps + (threadIdx.x >> 5); row < N; row += gridDim.x * warps) {
        const long long row_start = (long long)row * K;
        float acc = 0.0f;
        if (fast) {
            const unsigned* words = reinterpret_cast<const unsigned*>(packed + row_start / 2);
            for (int c = 8 * lane; c < K; c += 8 * KBIT_WARP) {
                const unsigned word = words[c / 8];
                float a[8];
                load4(A, c, K, true, 0.0f, a);
                load4(A, c + 4, K, true, 0.0f, a + 4);
                float partial = 0.0f;
#pragma unroll
                for (int e = 0; e < 8; ++e) partial = __fadd_rn(partial, __fmul_rn(s_table[nibble(word, e)], a[e]));
                acc = __fadd_rn(acc, __fmul_rn(partial, absmax[(row_start + c) / blocksize]));
            }
        } else {  // any K: element by element (rows and blocks need not start on a byte)
            for (int c = lane; c < K; c += KBIT_WARP) {
                const long long e = row_start + c;
                const unsigned char byte = packed[e / 2];
                const int q = (e & 1) ? (byte & 0x0f) : (byte >> 4);
                const float w = __fmul_rn(s_table[q], absmax[e / blocksize]);
                acc = __fadd_rn(acc, __fmul_rn(w, to_float(A[c])));
            }
        }
        acc = warp_sum(acc);
        if (lane == 0) out[row] = from_float<T>(acc);
    }
}

}  // namespace kbit

#define KBIT_QUANTIZE_4BIT(NAME, T, VECS)                                                                       \
    extern "C" __global__ void __launch_bounds__(KBIT_QUANT_THREADS)                                            \
        NAME(const T* A, const kbit::CodeTable* table, float* absmax, unsigned char* out, long long n,          \
             int blocksize, int mode, int vector_ok, const float* rand, long long rand_count)                   \
    {                                                                                                           \
        kbit::quantize_tiles<T, 4, VECS, false>(A, table, absmax, out, n, blocksize, mode, vector_ok, rand,     \
                                                rand_count);                                                    \
    }
#define KBIT_4BIT_KERNELS(SUFFIX, T)                                                                            \
    KBIT_QUANTIZE_4BIT(quantize_4bit_##SUFFIX##_v1, T, 1)                                                       \
    KBIT_QUANTIZE_4BIT(quantize_4bit_##SUFFIX##_v2, T, 2)                                                       \
    KBIT_QUANTIZE_4BIT(quantize_4bit_##SUFFIX##_v4, T, 4)                                                       \
    extern "C" __global__ void __launch_bounds__(256)                                                           \
        dequantize_4bit_##SUFFIX(const unsigned char* packed, const float* table16, const float* absmax, T* out, \
                                 long long n, int blocksize, int vector_ok)                                     \
    {                                                                                                           \
        kbit::dequantize_4bit<T>(packed, table16, absmax, out, n, blocksize, vector_ok);                        \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(256)                                                           \
        gemv_4bit_##SUFFIX(const T* A, const unsigned char* packed, const float* table16, const float* absmax,  \
                           T* out, int N, int K, int blocksize, int fast)                                       \
    {                                                                                                           \
        kbit::gemv_4bit<T>(A, packed, table16, absmax, out, N, K, blocksize, fast);                             \
    }
KBIT_4BIT_KERNELS(f32, float)
KBIT_4BIT_KERNELS(f16, __half)
KBIT_4BIT_KERNELS(bf16, __nv_bfloat16)
