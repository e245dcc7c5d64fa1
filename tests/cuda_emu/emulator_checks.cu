// Kernels that check the emulator itself (tests/test_kernels_emulated.py): the 16-bit float
// conversions and warp operations against CUDA's documented semantics, and the launch errors
// it must report instead of computing something or hanging.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define GRID_STRIDE(i, n) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (long long)gridDim.x * blockDim.x)

extern "C" __global__ void check_float_to_half(const float* x, unsigned short* out, long long n) {
    GRID_STRIDE(i, n) out[i] = __half_as_ushort(__float2half_rn(x[i]));
}

extern "C" __global__ void check_half_to_float(const unsigned short* h, float* out, long long n) {
    GRID_STRIDE(i, n) out[i] = __half2float(__ushort_as_half(h[i]));
}

extern "C" __global__ void check_float_to_bf16(const float* x, unsigned short* out, long long n) {
    GRID_STRIDE(i, n) out[i] = __bfloat16_as_ushort(__float2bfloat16_rn(x[i]));
}

extern "C" __global__ void check_bf16_to_float(const unsigned short* b, float* out, long long n) {
    GRID_STRIDE(i, n) out[i] = __bfloat162float(__ushort_as_bfloat16(b[i]));
}

extern "C" __global__ void check_float_to_int_rn(const float* x, int* out, long long n) {
    GRID_STRIDE(i, n) out[i] = __float2int_rn(x[i]);
}

// Eight results per thread: every warp operation with arguments that reach across the warp,
// and a block-wide reduction through shared memory.
extern "C" __global__ void check_warp_ops(int* out) {
    __shared__ int warp_totals[32];
    const int t = threadIdx.x, lane = t % 32;
    int* o = out + 8 * ((long long)blockIdx.x * blockDim.x + t);
    o[0] = __shfl_sync(0xffffffffu, t, (lane * 7) % 32);
    o[1] = __shfl_xor_sync(0xffffffffu, t, 5);
    o[2] = __shfl_up_sync(0xffffffffu, t, 3);
    o[3] = __shfl_down_sync(0xffffffffu, t, 3, 16);
    o[4] = (int)__ballot_sync(0xffffffffu, lane % 3 == 0);
    o[5] = __any_sync(0xffffffffu, t == 37) + 2 * __all_sync(0xffffffffu, lane < 31);
    int v = t;
    for (int s = 16; s > 0; s >>= 1) v += __shfl_xor_sync(0xffffffffu, v, s);
    if (lane == 0) warp_totals[t / 32] = v;
    __syncthreads();
    int total = 0;
    for (int w = 0; w < (int)(blockDim.x / 32); ++w) total += warp_totals[w];
    o[6] = total;
    o[7] = blockIdx.x;
}

// Lane 5 returns, then the rest of its warp shuffles with the full mask: undefined on a GPU.
extern "C" __global__ void check_shuffle_after_return(int* out) {
    if (threadIdx.x == 5) return;
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, (int)threadIdx.x, 1);
}

// Lane 0 waits at __syncthreads for lanes that wait in a shuffle for lane 0: a deadlock.
extern "C" __global__ void check_deadlock(int* out) {
    if (threadIdx.x == 0) {
        __syncthreads();
    } else {
        out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 1);
    }
}

extern "C" __global__ void check_partial_mask(int* out) {
    out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, (int)threadIdx.x, 1);
}

// A 16-byte load from an address that is only 4-byte aligned faults on a GPU.
extern "C" __global__ void check_misaligned_load(const unsigned char* p, unsigned* out) {
    const uint4 v = *reinterpret_cast<const uint4*>(p + 4);
    out[threadIdx.x] = v.x;
}

// Sized for 16 threads; launched with more, it writes past the shared array.
extern "C" __global__ void check_shared_overflow(float* out) {
    __shared__ float scratch[16];
    scratch[threadIdx.x] = 1.0f;
    __syncthreads();
    out[threadIdx.x] = scratch[threadIdx.x];
}

extern "C" __global__ void __launch_bounds__(64) check_launch_bounds(int* out) { out[threadIdx.x] = 1; }
