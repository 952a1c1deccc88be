// optimizer.cu: fused optimizer steps (32-bit, blockwise 8-bit and whole-tensor 8-bit
// state) for every kind, and the gradient norm of percentile clipping.
//
// One kernel per layout and parameter dtype; the kind is a uniform runtime switch. Each
// step reads g, p and the states once and writes p and the states once: 8-bit states are
// dequantized, updated in float32 and requantized in registers, the block absmax found in
// the same pass (docs/formats.md section 5). Two things need a value from the whole
// tensor first and so a first pass that only measures: the trust-ratio clipping
// (max_unorm: ||p|| and ||update||) and whole-tensor 8-bit state (the new absmax).

#include "common.cuh"

namespace kbit {

enum Rule { RULE_ADAM = 0, RULE_ADEMAMIX = 1, RULE_LION = 2, RULE_MOMENTUM = 3, RULE_RMSPROP = 4, RULE_ADAGRAD = 5 };

// The scalars of one step, computed on the host in double precision and rounded once,
// as the reference backend's Python scalars are: 1 - beta, 1 - lr * wd and the bias
// corrections would each round differently if formed here from float32 betas.
struct Step {
    int rule;
    int first_step;       // step == 1 (momentum starts from the gradient)
    int decoupled_decay;  // p *= 1 - lr * wd before the update; else g += wd * p
    int skip_zeros;
    float beta1, beta2, beta3, alpha, eps, weight_decay, lr, gnorm_scale;
    float rest1, rest2, rest3;  // 1 - beta1, 1 - beta2, 1 - beta3
    float decay;                // 1 - lr * weight_decay
    float bias1;                // Adam: sqrt(1 - beta2^t) / (1 - beta1^t); AdEMAMix: 1 / (1 - beta1^t)
    float bias2;                // Adam: eps * sqrt(1 - beta2^t); AdEMAMix: sqrt(1 - beta2^t)
};

__device__ __forceinline__ Step make_step(int rule, int first_step, int decoupled_decay, int skip_zeros, float beta1,
                                          float beta2, float beta3, float alpha, float eps, float weight_decay,
                                          float lr, float gnorm_scale, float rest1, float rest2, float rest3,
                                          float decay, float bias1, float bias2)
{
    Step s;
    s.rule = rule; s.first_step = first_step; s.decoupled_decay = decoupled_decay; s.skip_zeros = skip_zeros;
    s.beta1 = beta1; s.beta2 = beta2; s.beta3 = beta3; s.alpha = alpha; s.eps = eps;
    s.weight_decay = weight_decay; s.lr = lr; s.gnorm_scale = gnorm_scale;
    s.rest1 = rest1; s.rest2 = rest2; s.rest3 = rest3; s.decay = decay; s.bias1 = bias1; s.bias2 = bias2;
    return s;
}

// torch.lerp's formula (the reference moves first moments with lerp_).
__device__ __forceinline__ float lerp(float start, float end, float weight)
{
    return weight < 0.5f ? __fadd_rn(start, __fmul_rn(weight, __fsub_rn(end, start)))
                         : __fsub_rn(end, __fmul_rn(__fsub_rn(end, start), __fsub_rn(1.0f, weight)));
}

// One element: the states m1 (first moment or the only state), m2 (AdEMAMix's slow
// moment) and v (second moment) are updated in place; returns the update direction u
// (p moves by -lr * u). `g` is the working gradient (scaled, L2 decay added).
__device__ __forceinline__ float update_direction(const Step& s, float g, float& m1, float& m2, float& v)
{
    switch (s.rule) {
        case RULE_ADAM:
            m1 = lerp(m1, g, s.rest1);
            v = __fadd_rn(__fmul_rn(s.beta2, v), __fmul_rn(__fmul_rn(s.rest2, g), g));
            return __fmul_rn(s.bias1, __fdiv_rn(m1, __fadd_rn(__fsqrt_rn(v), s.bias2)));
        case RULE_ADEMAMIX: {
            m1 = lerp(m1, g, s.rest1);
            m2 = lerp(m2, g, s.rest3);
            v = __fadd_rn(__fmul_rn(s.beta2, v), __fmul_rn(__fmul_rn(s.rest2, g), g));
            const float mixed = __fadd_rn(__fmul_rn(m2, s.alpha), __fmul_rn(m1, s.bias1));
            return __fdiv_rn(mixed, __fadd_rn(__fdiv_rn(__fsqrt_rn(v), s.bias2), s.eps));
        }
        case RULE_LION: {
            // The sign uses the momentum before this step's update of it.
            const float blend = __fadd_rn(__fmul_rn(m1, s.beta1), __fmul_rn(g, s.rest1));
            m1 = lerp(m1, g, s.rest2);
            return blend > 0.0f ? 1.0f : (blend < 0.0f ? -1.0f : 0.0f);
        }
        case RULE_MOMENTUM:
            m1 = s.first_step ? g : __fadd_rn(__fmul_rn(m1, s.beta1), g);
            return m1;
        case RULE_RMSPROP:
            m1 = __fadd_rn(__fmul_rn(m1, s.beta1), __fmul_rn(__fmul_rn(s.rest1, g), g));
            return __fdiv_rn(g, __fadd_rn(__fsqrt_rn(m1), s.eps));
        default:  // RULE_ADAGRAD
            m1 = __fadd_rn(m1, __fmul_rn(g, g));
            return __fdiv_rn(g, __fadd_rn(__fsqrt_rn(m1), s.eps));
    }
}

__device__ __forceinline__ float working_gradient(const Step& s, float g, float p)
{
    if (s.gnorm_scale != 1.0f) g = __fmul_rn(g, s.gnorm_scale);
    if (!s.decoupled_decay && s.weight_decay > 0.0f) g = __fadd_rn(g, __fmul_rn(s.weight_decay, p));
    return g;
}

// The new parameter value after the update u (scaled by the trust ratio `clip`).
__device__ __forceinline__ float apply_update(const Step& s, float p, float u, float clip)
{
    if (s.decoupled_decay && s.weight_decay > 0.0f) p = __fmul_rn(p, s.decay);
    return __fsub_rn(p, __fmul_rn(__fmul_rn(s.lr, u), clip));
}

// The trust ratio of max_unorm from the measured sums (norms[0] = sum p^2, norms[1] =
// sum u^2): the update shrinks to at most max_unorm * ||p||.
__device__ __forceinline__ float trust_ratio(const float* norms, float max_unorm)
{
    if (max_unorm <= 0.0f) return 1.0f;
    const float unorm = __fsqrt_rn(norms[1]);
    const float limit = __fmul_rn(max_unorm, __fsqrt_rn(norms[0]));
    return unorm > limit ? __fdiv_rn(limit, unorm) : 1.0f;
}

// Sum a value over the block and add it to *target (one atomic per block).
__device__ __forceinline__ void block_sum_into(float value, float* target, float* s_partial)
{
    value = warp_sum(value);
    if ((threadIdx.x & 31) == 0) s_partial[threadIdx.x >> 5] = value;
    __syncthreads();
    if (threadIdx.x == 0) {
        float total = 0.0f;
        for (int w = 0; w < (int)(blockDim.x >> 5); ++w) total = __fadd_rn(total, s_partial[w]);
        atomicAdd(target, total);
    }
    __syncthreads();
}

// ---------------------------------------------------------------------------- 32-bit
// Phase 0 (only with max_unorm): measure ||p||^2 and ||u||^2 into norms, change nothing.
// Phase 1: update states and p. Four elements per thread per step.
template <typename T>
__device__ void step_32bit(const Step s, int phase, const T* __restrict__ g, T* __restrict__ p,
                           float* __restrict__ state1, float* __restrict__ state2, long long n, float max_unorm,
                           float* __restrict__ norms, float* __restrict__ unorm_vec)
{
    __shared__ float s_partial[8];
    const float clip = phase == 1 ? trust_ratio(norms, max_unorm) : 1.0f;
    if (phase == 1 && max_unorm > 0.0f && unorm_vec != nullptr && blockIdx.x == 0 && threadIdx.x == 0)
        unorm_vec[0] = norms[1];
    float sum_p = 0.0f, sum_u = 0.0f;
    const long long stride = 4LL * gridDim.x * blockDim.x;
    for (long long i = 4LL * ((long long)blockIdx.x * blockDim.x + threadIdx.x); i < n; i += stride) {
        float gv[4], pv[4];
        load4(g, i, n, false, 0.0f, gv);
        load4(p, i, n, false, 0.0f, pv);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            if (i + j >= n) continue;
            const long long e = i + j;
            // skip_zeros leaves the element alone, but (as in the reference) its update
            // still counts in the trust ratio's norms.
            if (phase == 1 && s.skip_zeros && gv[j] == 0.0f) continue;
            float m1 = state1[e];
            float m2 = s.rule == RULE_ADEMAMIX ? state1[n + e] : 0.0f;
            float v = state2 != nullptr ? state2[e] : 0.0f;
            const float gw = working_gradient(s, gv[j], pv[j]);
            const float u = update_direction(s, gw, m1, m2, v);
            if (phase == 0) {
                sum_p = __fadd_rn(sum_p, __fmul_rn(pv[j], pv[j]));
                sum_u = __fadd_rn(sum_u, __fmul_rn(u, u));
                continue;
            }
            state1[e] = m1;
            if (s.rule == RULE_ADEMAMIX) state1[n + e] = m2;
            if (state2 != nullptr) state2[e] = v;
            pv[j] = apply_update(s, pv[j], u, clip);
        }
        if (phase == 1) store4(p, i, n, false, pv);
    }
    if (phase == 0) {
        block_sum_into(sum_p, norms, s_partial);
        block_sum_into(sum_u, norms + 1, s_partial);
    }
}

// ---------------------------------------------------------------------- 8-bit helpers
// Shared copies of one 8-bit state's code table: values (decode) and the prepared search
// table (encode, exactly as quantize_blockwise encodes).
struct SharedCodes {
    float values[256];
    float bounds[256];
    unsigned char index[256];
    int count;
};

__device__ __forceinline__ void load_codes(SharedCodes& s, const float* qmap, const CodeTable* table)
{
    for (int i = threadIdx.x; i < 256; i += blockDim.x) {
        s.values[i] = qmap[i];
        s.bounds[i] = table->bounds[i];
        s.index[i] = table->index[i];
    }
    if (threadIdx.x == 0) s.count = table->count;
}

__device__ __forceinline__ unsigned char encode(const SharedCodes& s, float value, float scale)
{
    const float inverse = scale == 0.0f ? 0.0f : __frcp_rn(scale);
    return (unsigned char)nearest_code(s.bounds, s.index, s.count, 256, __fmul_rn(value, inverse));
}

// ---------------------------------------------------------------- blockwise 8-bit state
// 256 threads, 4 consecutive elements each: 64 threads per 256-element state block, four
// blocks per 1024-element tile (grid-stride). Per state: decode, update, absmax over the
// 64 threads (shuffles + one shared step), requantize; the state bytes move once.
#define KBIT_OPT_BLOCK 256
template <typename T>
__device__ void step_8bit_blockwise(const Step s, const T* __restrict__ g, T* __restrict__ p,
                                    unsigned char* __restrict__ state1, unsigned char* __restrict__ state2,
                                    const float* __restrict__ qmap1, const float* __restrict__ qmap2,
                                    const CodeTable* __restrict__ table1, const CodeTable* __restrict__ table2,
                                    float* __restrict__ absmax1, float* __restrict__ absmax2, long long n)
{
    __shared__ SharedCodes s_codes[2];
    __shared__ float s_warp_max[3][8];
    load_codes(s_codes[0], qmap1, table1);
    if (state2 != nullptr) load_codes(s_codes[1], qmap2, table2);
    __syncthreads();
    const bool stacked = s.rule == RULE_ADEMAMIX;
    const long long blocks = (n + KBIT_OPT_BLOCK - 1) / KBIT_OPT_BLOCK;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (long long tile = 1024LL * blockIdx.x; tile < n; tile += 1024LL * gridDim.x) {
        const long long i = tile + 4LL * threadIdx.x;
        const long long block = i / KBIT_OPT_BLOCK;
        float gv[4], pv[4], m1[4], m2[4], v[4];
        load4(g, i, n, false, 0.0f, gv);
        load4(p, i, n, false, 0.0f, pv);
        const float scale1 = block < blocks ? absmax1[block] : 0.0f;
        const float scale1b = stacked && block < blocks ? absmax1[blocks + block] : 0.0f;
        const float scale2 = state2 != nullptr && block < blocks ? absmax2[block] : 0.0f;
        float max1 = 0.0f, max1b = 0.0f, max2 = 0.0f;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const long long e = i + j;
            if (e >= n) {
                m1[j] = m2[j] = v[j] = 0.0f;
                continue;
            }
            m1[j] = __fmul_rn(s_codes[0].values[state1[e]], scale1);
            m2[j] = stacked ? __fmul_rn(s_codes[0].values[state1[n + e]], scale1b) : 0.0f;
            v[j] = state2 != nullptr ? __fmul_rn(s_codes[1].values[state2[e]], scale2) : 0.0f;
            if (!(s.skip_zeros && gv[j] == 0.0f)) {
                const float gw = working_gradient(s, gv[j], pv[j]);
                const float u = update_direction(s, gw, m1[j], m2[j], v[j]);
                pv[j] = apply_update(s, pv[j], u, 1.0f);
            }
            max1 = max_nan(max1, fabsf(m1[j]));
            max1b = max_nan(max1b, fabsf(m2[j]));
            max2 = max_nan(max2, fabsf(v[j]));
        }
        store4(p, i, n, false, pv);
        // The absmax of each state over this 256-element block: 64 threads = 2 warps.
        max1 = group_max_nan(max1, KBIT_WARP);
        max1b = group_max_nan(max1b, KBIT_WARP);
        max2 = group_max_nan(max2, KBIT_WARP);
        if (lane == 0) {
            s_warp_max[0][warp] = max1;
            s_warp_max[1][warp] = max1b;
            s_warp_max[2][warp] = max2;
        }
        __syncthreads();
        const int pair = warp & ~1;
        max1 = max_nan(s_warp_max[0][pair], s_warp_max[0][pair + 1]);
        max1b = max_nan(s_warp_max[1][pair], s_warp_max[1][pair + 1]);
        max2 = max_nan(s_warp_max[2][pair], s_warp_max[2][pair + 1]);
        __syncthreads();  // s_warp_max is rewritten by the next tile
        if (block < blocks && threadIdx.x % 64 == 0) {
            absmax1[block] = max1;
            if (stacked) absmax1[blocks + block] = max1b;
            if (state2 != nullptr) absmax2[block] = max2;
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const long long e = i + j;
            if (e >= n) continue;
            state1[e] = encode(s_codes[0], m1[j], max1);
            if (stacked) state1[n + e] = encode(s_codes[0], m2[j], max1b);
            if (state2 != nullptr) state2[e] = encode(s_codes[1], v[j], max2);
        }
    }
}

// -------------------------------------------------------------- whole-tensor 8-bit state
// Phase 0: decode with max1/max2, update in registers, and record the new states' absmax
// (atomicMax on the bits, NaN winning: new_max starts at 0) plus, with max_unorm, the
// norms. Phase 1: the same update again (same arithmetic, same values), applied to p, and
// the states requantized with new_max.
template <typename T>
__device__ void step_8bit_tensor(const Step s, int phase, const T* __restrict__ g, T* __restrict__ p,
                                 unsigned char* __restrict__ state1, unsigned char* __restrict__ state2,
                                 const float* __restrict__ qmap1, const float* __restrict__ qmap2,
                                 const CodeTable* __restrict__ table1, const CodeTable* __restrict__ table2,
                                 const float* __restrict__ max1, const float* __restrict__ max2,
                                 float* __restrict__ new_max1, float* __restrict__ new_max2, long long n,
                                 float max_unorm, float* __restrict__ norms, float* __restrict__ unorm_vec)
{
    __shared__ SharedCodes s_codes[2];
    __shared__ float s_partial[8];
    load_codes(s_codes[0], qmap1, table1);
    if (state2 != nullptr) load_codes(s_codes[1], qmap2, table2);
    __syncthreads();
    const float scale1 = max1[0], scale2 = state2 != nullptr ? max2[0] : 0.0f;
    const float next1 = phase == 1 ? new_max1[0] : 0.0f;
    const float next2 = phase == 1 && state2 != nullptr ? new_max2[0] : 0.0f;
    const float clip = phase == 1 ? trust_ratio(norms, max_unorm) : 1.0f;
    if (phase == 1 && max_unorm > 0.0f && unorm_vec != nullptr && blockIdx.x == 0 && threadIdx.x == 0)
        unorm_vec[0] = norms[1];
    float top1 = 0.0f, top2 = 0.0f, sum_p = 0.0f, sum_u = 0.0f;
    // One element per thread per step (coalesced 4-byte loads): two passes of the whole
    // rule keep enough registers busy that four elements at a time spill on sm_90.
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += stride) {
        const float gv = to_float(g[e]);
        float pv = to_float(p[e]);
        float m1 = __fmul_rn(s_codes[0].values[state1[e]], scale1), m2 = 0.0f;
        float v = state2 != nullptr ? __fmul_rn(s_codes[1].values[state2[e]], scale2) : 0.0f;
        const float u = update_direction(s, working_gradient(s, gv, pv), m1, m2, v);
        if (phase == 0) {
            top1 = max_nan(top1, fabsf(m1));
            top2 = max_nan(top2, fabsf(v));
            sum_p = __fadd_rn(sum_p, __fmul_rn(pv, pv));
            sum_u = __fadd_rn(sum_u, __fmul_rn(u, u));
            continue;
        }
        p[e] = from_float<T>(apply_update(s, pv, u, clip));
        state1[e] = encode(s_codes[0], m1, next1);
        if (state2 != nullptr) state2[e] = encode(s_codes[1], v, next2);
    }
    if (phase == 0) {
        top1 = group_max_nan(top1, KBIT_WARP);
        top2 = group_max_nan(top2, KBIT_WARP);
        if ((threadIdx.x & 31) == 0) {
            atomicMax(reinterpret_cast<unsigned*>(new_max1), __float_as_uint(top1));
            if (state2 != nullptr) atomicMax(reinterpret_cast<unsigned*>(new_max2), __float_as_uint(top2));
        }
        if (max_unorm > 0.0f) {
            block_sum_into(sum_p, norms, s_partial);
            block_sum_into(sum_u, norms + 1, s_partial);
        }
    }
}

// ------------------------------------------------------------------ percentile clipping
// Partial sums of g^2 per block (partial[blockIdx.x]); the host adds the few partials.
template <typename T>
__device__ void sum_of_squares(const T* __restrict__ g, long long n, float* __restrict__ partial)
{
    __shared__ float s_partial[8];
    float sum = 0.0f;
    const long long stride = 4LL * gridDim.x * blockDim.x;
    for (long long i = 4LL * ((long long)blockIdx.x * blockDim.x + threadIdx.x); i < n; i += stride) {
        float v[4];
        load4(g, i, n, false, 0.0f, v);
#pragma unroll
        for (int j = 0; j < 4; ++j) sum = __fadd_rn(sum, __fmul_rn(v[j], v[j]));
    }
    sum = warp_sum(sum);
    if ((threadIdx.x & 31) == 0) s_partial[threadIdx.x >> 5] = sum;
    __syncthreads();
    if (threadIdx.x == 0) {
        float total = 0.0f;
        for (int w = 0; w < (int)(blockDim.x >> 5); ++w) total = __fadd_rn(total, s_partial[w]);
        partial[blockIdx.x] = total;
    }
}

}  // namespace kbit

#define KBIT_STEP_PARAMS                                                                                     \
    int rule, int first_step, int decoupled_decay, int skip_zeros, float beta1, float beta2, float beta3,    \
        float alpha, float eps, float weight_decay, float lr, float gnorm_scale, float rest1, float rest2,    \
        float rest3, float decay, float bias1, float bias2
#define KBIT_STEP_ARGS                                                                                       \
    kbit::make_step(rule, first_step, decoupled_decay, skip_zeros, beta1, beta2, beta3, alpha, eps,          \
                    weight_decay, lr, gnorm_scale, rest1, rest2, rest3, decay, bias1, bias2)

#define KBIT_OPTIMIZER_KERNELS(SUFFIX, T)                                                                    \
    extern "C" __global__ void __launch_bounds__(256) optimizer_32bit_##SUFFIX(                              \
        KBIT_STEP_PARAMS, int phase, const T* g, T* p, float* state1, float* state2, long long n,             \
        float max_unorm, float* norms, float* unorm_vec)                                                     \
    {                                                                                                        \
        kbit::step_32bit<T>(KBIT_STEP_ARGS, phase, g, p, state1, state2, n, max_unorm, norms, unorm_vec);    \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(256) optimizer_8bit_blockwise_##SUFFIX(                     \
        KBIT_STEP_PARAMS, const T* g, T* p, unsigned char* state1, unsigned char* state2, const float* qmap1, \
        const float* qmap2, const kbit::CodeTable* table1, const kbit::CodeTable* table2, float* absmax1,    \
        float* absmax2, long long n)                                                                         \
    {                                                                                                        \
        kbit::step_8bit_blockwise<T>(KBIT_STEP_ARGS, g, p, state1, state2, qmap1, qmap2, table1, table2,     \
                                     absmax1, absmax2, n);                                                   \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(256) optimizer_8bit_tensor_##SUFFIX(                        \
        KBIT_STEP_PARAMS, int phase, const T* g, T* p, unsigned char* state1, unsigned char* state2,          \
        const float* qmap1, const float* qmap2, const kbit::CodeTable* table1, const kbit::CodeTable* table2, \
        const float* max1, const float* max2, float* new_max1, float* new_max2, long long n, float max_unorm, \
        float* norms, float* unorm_vec)                                                                      \
    {                                                                                                        \
        kbit::step_8bit_tensor<T>(KBIT_STEP_ARGS, phase, g, p, state1, state2, qmap1, qmap2, table1, table2, \
                                  max1, max2, new_max1, new_max2, n, max_unorm, norms, unorm_vec);           \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(256)                                                        \
        sum_of_squares_##SUFFIX(const T* g, long long n, float* partial)                                     \
    {                                                                                                        \
        kbit::sum_of_squares<T>(g, n, partial);                                                              \
    }
KBIT_OPTIMIZER_KERNELS(f32, float)
KBIT_OPTIMIZER_KERNELS(f16, __half)
KBIT_OPTIMIZER_KERNELS(bf16, __nv_bfloat16)
