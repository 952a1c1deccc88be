// quantize.cuh: blockwise absmax quantization to 8-bit codes or packed 4-bit codes, shared
// by blockwise8.cu and quant4.cu.
//
// A CUDA block of 256 threads works on tiles of 1024 * VECS elements (grid-stride over
// tiles). Thread t holds elements [tile + 4 * (k * 256 + t), +4) for k < VECS: one
// 16-byte (float) or 8-byte (16-bit) load per k, coalesced across the warp. With VECS = 1
// a quantization block of B <= 1024 elements is B / 4 consecutive threads, whose absmax
// is a shuffle reduction (plus one shared-memory step past a warp); with VECS = 2 or 4
// (B = 2048, 4096) the whole tile is one block. Values stay in registers between the
// reduction and the encoding, so the input is read once.
#pragma once

#include "common.cuh"

namespace kbit {

#define KBIT_QUANT_THREADS 256

enum ScaleMode {
    SCALE_PER_BLOCK = 0,  // compute absmax per block of `blocksize` and store it
    SCALE_GIVEN = 1,      // one absmax for the whole tensor, read from absmax[0]
    SCALE_NONE = 2,       // values are already normalised (quantize_no_absmax)
};

// BITS = 8: one code per element. BITS = 4: two per byte, element 2j in the high nibble.
// STOCHASTIC: stochastic rounding with `rand` (a separate instantiation: the nearest
// rounding kernels stay small and spill-free).
template <typename T, int BITS, int VECS, bool STOCHASTIC>
__device__ void quantize_tiles(const T* __restrict__ A, const CodeTable* __restrict__ table,
                               float* __restrict__ absmax, unsigned char* __restrict__ out, long long n,
                               int blocksize, int mode, int vector_ok, const float* __restrict__ rand,
                               long long rand_count)
{
    constexpr int SLOTS = BITS == 8 ? 256 : 16;
    constexpr long long TILE = 1024LL * VECS;
    __shared__ float s_bounds[SLOTS];
    __shared__ float s_values[STOCHASTIC ? SLOTS : 1];
    __shared__ unsigned char s_index[SLOTS];
    __shared__ float s_warp_max[KBIT_QUANT_THREADS / KBIT_WARP];

    const int t = threadIdx.x;
    const int lane = t & 31;
    const int warp = t >> 5;
    const int count = table->count;
    for (int i = t; i < SLOTS; i += KBIT_QUANT_THREADS) {
        s_bounds[i] = table->bounds[i];
        if (STOCHASTIC) s_values[i] = table->values[i];
        s_index[i] = table->index[i];
    }
    __syncthreads();
    // The code 0.0 quantizes to: what an odd 4-bit count pads its last byte with.
    const int zero_code = nearest_code(s_bounds, s_index, count, SLOTS, 0.0f);

    // Threads per quantization block (VECS == 1), a power of two from 8 to 256.
    const int group = VECS == 1 ? blocksize / 4 : KBIT_QUANT_THREADS;
    const float given_scale = mode == SCALE_GIVEN ? absmax[0] : 0.0f;

    for (long long tile = (long long)blockIdx.x * TILE; tile < n; tile += (long long)gridDim.x * TILE) {
        float v[VECS][4];
#pragma unroll
        for (int k = 0; k < VECS; ++k) {
            const long long i = tile + 4LL * (k * KBIT_QUANT_THREADS + t);
            load4(A, i, n, vector_ok && i + 4 <= n, 0.0f, v[k]);
        }

        float scale = given_scale;
        if (mode == SCALE_PER_BLOCK) {
            float m = 0.0f;
#pragma unroll
            for (int k = 0; k < VECS; ++k)
#pragma unroll
                for (int j = 0; j < 4; ++j) m = max_nan(m, fabsf(v[k][j]));
            m = group_max_nan(m, group < KBIT_WARP ? group : KBIT_WARP);
            if (group > KBIT_WARP) {
                if (lane == 0) s_warp_max[warp] = m;
                __syncthreads();
                const int warps = group / KBIT_WARP, first = warp / warps * warps;
                m = s_warp_max[first];
                for (int w = 1; w < warps; ++w) m = max_nan(m, s_warp_max[first + w]);
                __syncthreads();  // s_warp_max is rewritten by the next tile
            }
            scale = m;
            const long long first_element = tile + 4LL * t;
            if (t % group == 0 && first_element < n) absmax[first_element / blocksize] = m;
        }
        // x * (1 / absmax) in float32, 0 for an all-zero block (docs/formats.md section 2).
        const float inverse = scale == 0.0f ? 0.0f : __frcp_rn(scale);

#pragma unroll
        for (int k = 0; k < VECS; ++k) {
            const long long i = tile + 4LL * (k * KBIT_QUANT_THREADS + t);
            if (i >= n) continue;
            int code[4];
            // rand is read cyclically (contract v2): element i uses rand[i % rand_count].
            long long r = STOCHASTIC ? i % rand_count : 0;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const float x = mode == SCALE_NONE ? v[k][j] : __fmul_rn(v[k][j], inverse);
                if (i + j >= n)
                    code[j] = zero_code;
                else if (STOCHASTIC)
                    code[j] = stochastic_code(s_values, s_index, count, SLOTS, x, rand[r]);
                else
                    code[j] = nearest_code(s_bounds, s_index, count, SLOTS, x);
                if (STOCHASTIC && ++r == rand_count) r = 0;
            }
            if (BITS == 8) {
                if (i + 4 <= n) {  // out is 4-byte aligned at i (a multiple of 4)
                    *reinterpret_cast<unsigned*>(out + i) =
                        (unsigned)code[0] | ((unsigned)code[1] << 8) | ((unsigned)code[2] << 16) | ((unsigned)code[3] << 24);
                } else {
#pragma unroll
                    for (int j = 0; j < 4; ++j)
                        if (i + j < n) out[i + j] = (unsigned char)code[j];
                }
            } else {
                const unsigned char first = (unsigned char)((code[0] << 4) | code[1]);
                const unsigned char second = (unsigned char)((code[2] << 4) | code[3]);
                if (i + 2 < n) {  // both bytes hold an element: one 2-byte store at i / 2
                    *reinterpret_cast<unsigned short*>(out + i / 2) = (unsigned short)(first | (second << 8));
                } else {
                    out[i / 2] = first;
                }
            }
        }
    }
}

}  // namespace kbit
