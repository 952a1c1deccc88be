// common.cuh: what every kbit kernel file shares: element types, vector loads and stores,
// NaN-propagating reductions and the code-table search.
//
// Numerics (docs/formats.md): every float operation here is a single IEEE operation
// rounded to nearest even. The GPU build uses --fmad=false and -ftz=false, the emulator
// build -ffp-contract=off, so the same source gives the same bits on both and matches
// the reference backend's float32 arithmetic where the format demands it.
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>

#ifndef KBIT_DYNAMIC_SHARED
#define KBIT_DYNAMIC_SHARED(T, name) extern __shared__ __align__(16) T name[]
#endif

#define KBIT_FULL_MASK 0xffffffffu
#define KBIT_WARP 32

namespace kbit {

// ------------------------------------------------------------------ element conversions
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ unsigned short bits16(__half x) { return __half_as_ushort(x); }
__device__ __forceinline__ unsigned short bits16(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }
template <typename T> __device__ __forceinline__ T from_bits16(unsigned short b);
template <> __device__ __forceinline__ __half from_bits16<__half>(unsigned short b) { return __ushort_as_half(b); }
template <> __device__ __forceinline__ __nv_bfloat16 from_bits16<__nv_bfloat16>(unsigned short b)
{
    return __ushort_as_bfloat16(b);
}

// ------------------------------------------------- four consecutive elements at a time
// `vector` says the four elements are in range and 4 * sizeof(T) aligned: one 16-byte
// (float) or 8-byte (16-bit types) load or store; otherwise element by element, bounded
// by n (missing elements read as `fill`).
__device__ __forceinline__ void load4(const float* p, long long i, long long n, bool vector, float fill, float v[4])
{
    if (vector) {
        const float4 q = *reinterpret_cast<const float4*>(p + i);
        v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
    } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) v[j] = i + j < n ? p[i + j] : fill;
    }
}

template <typename T>
__device__ __forceinline__ void load4(const T* p, long long i, long long n, bool vector, float fill, float v[4])
{
    if (vector) {
        const uint2 q = *reinterpret_cast<const uint2*>(p + i);
        v[0] = to_float(from_bits16<T>((unsigned short)(q.x & 0xffffu)));
        v[1] = to_float(from_bits16<T>((unsigned short)(q.x >> 16)));
        v[2] = to_float(from_bits16<T>((unsigned short)(q.y & 0xffffu)));
        v[3] = to_float(from_bits16<T>((unsigned short)(q.y >> 16)));
    } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) v[j] = i + j < n ? to_float(p[i + j]) : fill;
    }
}

__device__ __forceinline__ void store4(float* p, long long i, long long n, bool vector, const float v[4])
{
    if (vector) {
        *reinterpret_cast<float4*>(p + i) = make_float4(v[0], v[1], v[2], v[3]);
    } else {
#pragma unroll
        for (int j = 0; j < 4; ++j)
            if (i + j < n) p[i + j] = v[j];
    }
}

template <typename T>
__device__ __forceinline__ void store4(T* p, long long i, long long n, bool vector, const float v[4])
{
    if (vector) {
        uint2 q;
        q.x = (unsigned)bits16(from_float<T>(v[0])) | ((unsigned)bits16(from_float<T>(v[1])) << 16);
        q.y = (unsigned)bits16(from_float<T>(v[2])) | ((unsigned)bits16(from_float<T>(v[3])) << 16);
        *reinterpret_cast<uint2*>(p + i) = q;
    } else {
#pragma unroll
        for (int j = 0; j < 4; ++j)
            if (i + j < n) p[i + j] = from_float<T>(v[j]);
    }
}

// ------------------------------------------------------------------------ reductions
// The larger of two magnitudes, NaN winning: a block holding NaN gets a NaN absmax
// (docs/formats.md section 2), which fmaxf would hide.
__device__ __forceinline__ float max_nan(float a, float b) { return (b > a || b != b) ? b : a; }

// Reduce over aligned groups of `width` lanes (a power of two <= 32) with XOR shuffles:
// every lane of a group ends with the group's result.
__device__ __forceinline__ float group_max_nan(float v, int width)
{
    for (int offset = width >> 1; offset > 0; offset >>= 1) v = max_nan(v, __shfl_xor_sync(KBIT_FULL_MASK, v, offset));
    return v;
}

__device__ __forceinline__ float warp_sum(float v)
{
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v = __fadd_rn(v, __shfl_xor_sync(KBIT_FULL_MASK, v, offset));
    return v;
}

// --------------------------------------------------------------------------- code tables
// A code table prepared for search by prepare_code_table (blockwise8.cu), in global
// memory: the sorted distinct code values, the lowest code index holding each, and the
// decision boundaries between neighbours (a value x belongs to distinct value
// `count of bounds < x`). Unused slots hold +inf. The boundaries reproduce the reference
// backend's exact nearest-code rule: ties go to the lower code index.
struct CodeTable {
    float bounds[256];
    float values[256];
    unsigned char index[256];
    int count;  // distinct values
};

// Number of the first `slots` (a power of two) entries of a sorted array that are < x.
// Branch-free; every slot past the used ones must hold +inf.
__device__ __forceinline__ int count_below(const float* sorted, int slots, float x)
{
    int position = 0;
    for (int step = slots >> 1; step > 0; step >>= 1)
        if (sorted[position + step - 1] < x) position += step;
    return position;
}

// Index of the code nearest to x (ties to the lower index; NaN to the largest value).
__device__ __forceinline__ int nearest_code(const float* bounds, const unsigned char* index, int count, int slots,
                                            float x)
{
    const int position = x != x ? count - 1 : count_below(bounds, slots, x);
    return index[position];
}

// Stochastic rounding (contract v2): between the neighbouring code values lo <= x <= hi,
// take hi when r < (x - lo) / (hi - lo); exact codes, values outside the table and NaN
// round as nearest rounding does at the ends.
__device__ __forceinline__ int stochastic_code(const float* values, const unsigned char* index, int count, int slots,
                                               float x, float r)
{
    if (x != x || x >= values[count - 1]) return index[count - 1];
    if (x <= values[0]) return index[0];
    const int hi = count_below(values, slots, x);  // values[hi] >= x > values[hi - 1]
    if (values[hi] == x) return index[hi];
    const float lo_value = values[hi - 1];
    const float fraction = __fdiv_rn(__fsub_rn(x, lo_value), __fsub_rn(values[hi], lo_value));
    return r < fraction ? index[hi] : index[hi - 1];
}

}  // namespace kbit
