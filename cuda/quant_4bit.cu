// NF4 / FP4 block-wise quantization on the GPU, bit-identical to the CPU core: float32 absmax
// per block, full blocks scaled by the correctly rounded reciprocal and the trailing partial
// block divided (as bitsandbytes does), nearest code with ties to the lower code.
#include "nybble_common.cuh"

using namespace nybble;

// bitsandbytes clamps the divisor so an all-zero block scales to zeros instead of NaN.
constexpr float kMinAbsmax = 1e-38f;

// The FP4 magnitude code of the k-th smallest magnitude (0, 0.0625, 2, 3, 4, 6, 8, 12, all
// / 12): codes 0, 1, 6, 7, 4, 5, 2, 3, read as nibbles of one constant so no local array
// (and no stack frame) is needed.
__device__ __forceinline__ u32 fp4_sorted_code(u32 k) { return (0x32547610u >> (4 * k)) & 15u; }

// Decision bounds: the midpoints between sorted neighbours, in float32. NF4 uses 15 bounds
// over the signed table; FP4 uses 7 bounds over its magnitudes sorted ascending.
template <int QT>
__device__ __forceinline__ void load_bounds(float* bounds) {
    const int t = threadIdx.x;
    if (QT == kQuantNF4) {
        if (t < 15) bounds[t] = __fmul_rn(__fadd_rn(nf4_value(t), nf4_value(t + 1)), 0.5f);
    } else {
        if (t < 7)
            bounds[t] = __fmul_rn(
                __fadd_rn(fp4_magnitude(fp4_sorted_code(t)), fp4_magnitude(fp4_sorted_code(t + 1))),
                0.5f);
    }
}

template <int QT>
__device__ __forceinline__ u32 encode(const float* bounds, float s) {
    if (QT == kQuantNF4) {
        u32 k = 0;
#pragma unroll
        for (int j = 0; j < 15; ++j) k += s > bounds[j];
        return k;
    } else {
        const float m = fabsf(s);
        u32 k = 0;
#pragma unroll
        for (int j = 0; j < 7; ++j) k += m > bounds[j];
        // Negative inputs get the sign bit; -0.0 encodes as +0.
        return fp4_sorted_code(k) | (s < 0.0f ? 8u : 0u);
    }
}

template <int QT>
__device__ __forceinline__ float scale_value(float v, bool full, float inv, float divisor) {
    return full ? __fmul_rn(v, inv) : __fdiv_rn(v, divisor);
}

// One warp per quantization block; lane l handles element pairs 2l, 2l + 64, ... so each warp
// load covers 64 consecutive elements. A block with a NaN or Inf gets a NaN absmax, which the
// caller checks (cheap: one value per block) to raise like the CPU core does.
template <int QT, typename T>
__device__ __forceinline__ void quant_4bit(const T* __restrict__ x, u8* __restrict__ packed,
                                           float* __restrict__ absmax, long long n,
                                           int blocksize) {
    __shared__ float bounds[15];
    load_bounds<QT>(bounds);
    __syncthreads();
    const int lane = threadIdx.x % kWarp;
    const long long block = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / kWarp;
    const long long start = block * blocksize;
    if (start >= n) return;
    const long long end = min(start + (long long)blocksize, n);

    float amax = 0.0f;
    bool bad = false;
    for (long long i = start + 2 * lane; i < end; i += 2 * kWarp) {
#pragma unroll
        for (int k = 0; k < 2; ++k) {
            if (i + k < end) {
                const float a = fabsf(Cvt<T>::to_f(x[i + k]));
                amax = a > amax ? a : amax;
                bad |= !(a <= 3.402823466e+38f);  // NaN compares false, so it counts as bad
            }
        }
    }
    amax = warp_max(amax);
    bad = __any_sync(0xffffffffu, bad);
    if (lane == 0) absmax[block] = bad ? __int_as_float(0x7fc00000) : amax;

    const float divisor = fmaxf(amax, kMinAbsmax);
    const float inv = __frcp_rn(divisor);
    const bool full = end - start == blocksize;
    for (long long i = start + 2 * lane; i < end; i += 2 * kWarp) {
        const u32 hi = encode<QT>(bounds, scale_value<QT>(Cvt<T>::to_f(x[i]), full, inv, divisor));
        const u32 lo = i + 1 < end
                           ? encode<QT>(bounds, scale_value<QT>(Cvt<T>::to_f(x[i + 1]), full, inv, divisor))
                           : zero_code<QT>();
        packed[i >> 1] = (u8)((hi << 4) | lo);
    }
}

#define NYBBLE_QUANT_4BIT(T, TN, QN, QT)                                                     \
    extern "C" __global__ void __launch_bounds__(256)                                        \
        nybble_quant_4bit_##QN##_##TN(const T* __restrict__ x, u8* __restrict__ packed,      \
                                      float* __restrict__ absmax, long long n,               \
                                      int blocksize) {                                       \
        quant_4bit<QT, T>(x, packed, absmax, n, blocksize);                                  \
    }

NYBBLE_FOR_EACH_FLOAT(NYBBLE_QUANT_4BIT, nf4, kQuantNF4)
NYBBLE_FOR_EACH_FLOAT(NYBBLE_QUANT_4BIT, fp4, kQuantFP4)
