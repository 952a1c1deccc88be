// Small kernels for the emulator's own tests: valid CUDA that probes shuffles, votes and
// barriers, and kernels with bugs a compiler cannot see (marked BUG), which the emulator
// must expose (a wrong answer under some schedule) or report (strict mode).

#define FULL_MASK 0xffffffffu

// out[t] = the chosen shuffle of (1000 + t).
extern "C" __global__ void shuffle_probe(int mode, int b, int width, int* out)
{
    const int v = 1000 + (int)threadIdx.x;
    int r;
    switch (mode) {
        case 0: r = __shfl_sync(FULL_MASK, v, b, width); break;
        case 1: r = __shfl_up_sync(FULL_MASK, v, (unsigned)b, width); break;
        case 2: r = __shfl_down_sync(FULL_MASK, v, (unsigned)b, width); break;
        default: r = __shfl_xor_sync(FULL_MASK, v, b, width); break;
    }
    out[blockIdx.x * blockDim.x + threadIdx.x] = r;
}

extern "C" __global__ void vote_probe(const int* predicate, unsigned* ballots, int* counts)
{
    const int t = threadIdx.x;
    const int p = predicate[blockIdx.x * blockDim.x + t];
    const unsigned ballot = __ballot_sync(FULL_MASK, p);
    if ((t & 31) == 0) ballots[(blockIdx.x * blockDim.x + t) >> 5] = ballot;
    const int count = __syncthreads_count(p);
    const int all = __syncthreads_and(p);
    const int any = __syncthreads_or(p);
    if (t == 0) {
        counts[3 * blockIdx.x + 0] = count;
        counts[3 * blockIdx.x + 1] = all;
        counts[3 * blockIdx.x + 2] = any;
    }
}

// BUG: no barrier between the shared-memory write and the neighbour's read.
extern "C" __global__ void neighbour_sum_racy(const float* in, float* out, int offset)
{
    __shared__ float s[256];
    const int t = threadIdx.x, i = blockIdx.x * 256 + t;
    s[t] = in[i];
    out[i] = s[t] + s[(t + offset) & 255];
}

extern "C" __global__ void neighbour_sum(const float* in, float* out, int offset)
{
    __shared__ float s[256];
    const int t = threadIdx.x, i = blockIdx.x * 256 + t;
    s[t] = in[i];
    __syncthreads();
    out[i] = s[t] + s[(t + offset) & 255];
}

// BUG: two different barriers for the two halves of the block.
extern "C" __global__ void divergent_barrier(float* out)
{
    if (threadIdx.x < 16) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 1.0f;
}

// BUG: threads past n leave before the barrier the others wait at.
extern "C" __global__ void early_return(float* out, int n)
{
    if ((int)threadIdx.x >= n) return;
    __syncthreads();
    out[threadIdx.x] = 1.0f;
}

// BUG: a full-mask shuffle executed by half a warp.
extern "C" __global__ void partial_warp_shuffle(int* out)
{
    int v = threadIdx.x;
    if (threadIdx.x < 16) v = __shfl_xor_sync(FULL_MASK, v, 1);
    out[threadIdx.x] = v;
}

// BUG: warp 0 waits in __syncwarp while the others wait at __syncthreads: a deadlock
// (on hardware too, when the halves never meet).
extern "C" __global__ void mismatched_sync(int* out)
{
    if (threadIdx.x < 16) {
        __syncwarp(0x0000ffffu);
        __syncwarp(FULL_MASK);
    }
    __syncthreads();
    out[threadIdx.x] = 1;
}

// A spin lock across blocks: atomicCAS yields, so the holder makes progress.
extern "C" __global__ void locked_count(int* lock, int* counter)
{
    if (threadIdx.x == 0) {
        while (atomicCAS(lock, 0, 1) != 0) {
        }
        *counter += 1;
        __threadfence();
        atomicExch(lock, 0);
    }
}

extern "C" __global__ void scalar_types(float* out, float a, long long b, unsigned c)
{
    out[0] = a;
    out[1] = (float)b;
    out[2] = (float)c;
}
