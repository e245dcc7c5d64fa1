// Shared by every nybble kernel: the 4-bit code tables, float conversions for the three
// element types, and warp reductions. Only NVRTC's built-in headers are used, so the kernels
// compile at run time without a CUDA toolkit on the machine.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace nybble {

typedef unsigned char u8;
typedef unsigned int u32;
typedef signed char i8;

// Enumerators rather than constexpr variables: unused ones draw no NVRTC warning.
enum : int { kQuantNF4 = 0, kQuantFP4 = 1 };
enum : int { kWarp = 32 };

// NF4 levels, index = 4-bit code (the float32 values of the table in DESIGN.md).
__device__ __forceinline__ float nf4_value(int c) {
    switch (c & 15) {
        case 0: return -1.0f;
        case 1: return -0.6961928009986877f;
        case 2: return -0.5250730514526367f;
        case 3: return -0.39491748809814453f;
        case 4: return -0.28444138169288635f;
        case 5: return -0.18477343022823334f;
        case 6: return -0.09105003625154495f;
        case 7: return 0.0f;
        case 8: return 0.07958029955625534f;
        case 9: return 0.16093020141124725f;
        case 10: return 0.24611230194568634f;
        case 11: return 0.33791524171829224f;
        case 12: return 0.44070982933044434f;
        case 13: return 0.5626170039176941f;
        case 14: return 0.7229568362236023f;
        default: return 1.0f;
    }
}

// FP4 magnitudes in bitsandbytes' order (bit 3 is the sign), divided by 12 in float32.
__device__ __forceinline__ float fp4_magnitude(int c) {
    switch (c & 7) {
        case 0: return 0.0f;
        case 1: return 0.0625f / 12.0f;
        case 2: return 8.0f / 12.0f;
        case 3: return 12.0f / 12.0f;
        case 4: return 4.0f / 12.0f;
        case 5: return 6.0f / 12.0f;
        case 6: return 2.0f / 12.0f;
        default: return 3.0f / 12.0f;
    }
}

template <int QT>
__device__ __forceinline__ float code_value(int c) {
    if (QT == kQuantNF4) return nf4_value(c);
    const float m = fp4_magnitude(c);
    return (c & 8) ? -m : m;
}

// The code a missing last element pads with: the code of 0.0.
template <int QT>
__device__ __forceinline__ u32 zero_code() {
    return QT == kQuantNF4 ? 7u : 0u;
}

// Fills a shared 16-entry decode table; the caller must __syncthreads() before reading it.
// A shared table is indexed by data-dependent nibbles without local-memory spills, and its 16
// words sit in distinct banks.
template <int QT>
__device__ __forceinline__ void load_code_table(float* table) {
    if (threadIdx.x < 16) table[threadIdx.x] = code_value<QT>(threadIdx.x);
}

// Element conversions. Rounding to 16 bits is round-to-nearest-even, as the CPU core does.
template <typename T>
struct Cvt;

template <>
struct Cvt<float> {
    static __device__ __forceinline__ float to_f(float v) { return v; }
    static __device__ __forceinline__ float from_f(float v) { return v; }
};

template <>
struct Cvt<__half> {
    static __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
    static __device__ __forceinline__ __half from_f(float v) { return __float2half_rn(v); }
};

template <>
struct Cvt<__nv_bfloat16> {
    static __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
    static __device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
};

// Eight consecutive elements, stored with 16-byte vector instructions (one for 16-bit types,
// two for float32).
template <typename T>
struct alignas(16) Vec8 {
    T v[8];
};

// log2 of a power of two. Block indices are taken as `flat >> log2(blocksize)`: a 64-bit
// division is a call to a software routine in PTX, whose calling convention costs a stack
// frame and register spills in the hot loop.
__device__ __forceinline__ int log2_pow2(int v) {
    int s = 0;
    while ((1 << s) < v) ++s;
    return s;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Max of non-negative values; NaNs are tracked separately by the callers.
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = kWarp / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

}  // namespace nybble

// One extern "C" kernel per (element type) so the loader finds it by a plain name.
#define NYBBLE_FOR_EACH_FLOAT(X, ...) \
    X(float, f32, __VA_ARGS__)        \
    X(__half, f16, __VA_ARGS__)       \
    X(__nv_bfloat16, bf16, __VA_ARGS__)
