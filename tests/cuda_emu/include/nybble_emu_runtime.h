// The CUDA device API the nybble kernels use, for compiling them with a host C++ compiler.
// Force-included (-include) before every kernel source, as NVRTC makes these names built-ins.
//
// Execution model (see launcher.cpp): blocks run one after another; each thread of a block is
// an OS thread, so __syncthreads and warp operations are real barriers between real threads.
// __shared__ variables are function-local statics, which is sound because only one block runs
// at a time. Float intrinsics map to host IEEE float operations: with -ffp-contract=off and
// SSE arithmetic, each one is a single correctly rounded operation, like the _rn intrinsics.
#pragma once

#include <math.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

// ---------------------------------------------------------------------------- qualifiers

#ifdef NYBBLE_EMU_SCAN
// Kernel discovery (the emulator preprocesses each source with this defined): keep markers in
// the output so kernels and their launch bounds can be found by a regular expression.
#define __global__ __nybble_emu_global__
#define __launch_bounds__(...) __nybble_emu_launch_bounds__(__VA_ARGS__)
#else
#define __global__
#define __launch_bounds__(...)
#endif
#define __device__
#define __host__
#define __constant__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
// One block runs at a time, so a static is exactly one copy of the block's shared memory.
#define __shared__ static

// ---------------------------------------------------------------------------- vector types

struct uint3 {
    unsigned int x, y, z;
};

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};

// CUDA's vector types carry their size as alignment; the alignment sanitizer checks it.
struct alignas(8) uint2 {
    unsigned int x, y;
};
struct alignas(16) uint4 {
    unsigned int x, y, z, w;
};
struct alignas(8) int2 {
    int x, y;
};
struct alignas(16) int4 {
    int x, y, z, w;
};
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};

// Per emulated thread; set by the launcher before the kernel runs.
extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
// Per launch (one launch at a time).
extern dim3 blockDim;
extern dim3 gridDim;

enum : int { warpSize = 32 };

// ---------------------------------------------------------------------------- synchronization

namespace nybble_emu {

enum class WarpOp : int { kShuffle, kShuffleXor, kShuffleUp, kShuffleDown, kAny, kAll, kBallot, kSyncWarp };

// Every lane of the calling thread's warp publishes `value`; returns the 32 published values
// (index = lane) once all lanes arrived. Fails the launch unless `mask` is the full warp, all
// 32 lanes are alive and all call the same operation. Valid until this lane's next call.
const std::uint64_t* warp_exchange(unsigned mask, WarpOp op, std::uint64_t value);

// The calling thread's lane (linear thread index % 32).
unsigned lane_id();

template <typename T>
std::uint64_t to_bits64(T v) {
    static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "warp operations move up to 8 bytes");
    std::uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    return bits;
}

template <typename T>
T from_bits64(std::uint64_t bits) {
    T v;
    std::memcpy(&v, &bits, sizeof(T));
    return v;
}

// The source lane of a shuffle, or -1 when CUDA returns the caller's own value.
inline int shuffle_source(WarpOp op, int lane, int arg, int width) {
    const int segment = lane & ~(width - 1);
    switch (op) {
        case WarpOp::kShuffle:
            return segment + (arg & (width - 1));
        case WarpOp::kShuffleXor: {
            const int src = lane ^ arg;
            return src < segment + width ? src : -1;  // later groups are out of reach
        }
        case WarpOp::kShuffleUp:
            return (lane - segment) >= arg ? lane - arg : -1;
        case WarpOp::kShuffleDown:
            return (lane - segment) + arg < width ? lane + arg : -1;
        default:
            return -1;
    }
}

template <typename T>
T shuffle(WarpOp op, unsigned mask, T var, int arg, int width) {
    const std::uint64_t* all = warp_exchange(mask, op, to_bits64(var));
    const int src = shuffle_source(op, static_cast<int>(lane_id()), arg, width);
    return src < 0 ? var : from_bits64<T>(all[src]);
}

}  // namespace nybble_emu

void __syncthreads();

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
    return nybble_emu::shuffle(nybble_emu::WarpOp::kShuffle, mask, var, src_lane, width);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
    return nybble_emu::shuffle(nybble_emu::WarpOp::kShuffleXor, mask, var, lane_mask, width);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
    return nybble_emu::shuffle(nybble_emu::WarpOp::kShuffleUp, mask, var, static_cast<int>(delta), width);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
    return nybble_emu::shuffle(nybble_emu::WarpOp::kShuffleDown, mask, var, static_cast<int>(delta), width);
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
    const std::uint64_t* all = nybble_emu::warp_exchange(mask, nybble_emu::WarpOp::kBallot, predicate != 0);
    unsigned bits = 0;
    for (int l = 0; l < warpSize; ++l) bits |= static_cast<unsigned>(all[l] != 0) << l;
    return bits;
}
inline int __any_sync(unsigned mask, int predicate) {
    const std::uint64_t* all = nybble_emu::warp_exchange(mask, nybble_emu::WarpOp::kAny, predicate != 0);
    for (int l = 0; l < warpSize; ++l)
        if (all[l]) return 1;
    return 0;
}
inline int __all_sync(unsigned mask, int predicate) {
    const std::uint64_t* all = nybble_emu::warp_exchange(mask, nybble_emu::WarpOp::kAll, predicate != 0);
    for (int l = 0; l < warpSize; ++l)
        if (!all[l]) return 0;
    return 1;
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    nybble_emu::warp_exchange(mask, nybble_emu::WarpOp::kSyncWarp, 0);
}

// ---------------------------------------------------------------------------- float intrinsics

// Correctly rounded single operations (IEEE round-to-nearest-even, the host's default mode).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }

inline float __int_as_float(int v) { return nybble_emu::from_bits64<float>(static_cast<std::uint32_t>(v)); }
inline float __uint_as_float(unsigned v) { return nybble_emu::from_bits64<float>(v); }
inline int __float_as_int(float v) { return static_cast<int>(nybble_emu::to_bits64(v)); }
inline unsigned __float_as_uint(float v) { return static_cast<unsigned>(nybble_emu::to_bits64(v)); }

// cvt.rni.s32.f32: half to even, NaN -> 0, saturating (a host cast of an out-of-range float is UB).
inline int __float2int_rn(float v) {
    if (std::isnan(v)) return 0;
    const float r = std::nearbyint(v);
    if (r >= 2147483648.0f) return 2147483647;
    if (r < -2147483648.0f) return -2147483647 - 1;
    return static_cast<int>(r);
}
// cvt.rzi.s32.f32: toward zero, same saturation.
inline int __float2int_rz(float v) {
    if (std::isnan(v)) return 0;
    if (v >= 2147483648.0f) return 2147483647;
    if (v < -2147483648.0f) return -2147483647 - 1;
    return static_cast<int>(v);
}

// CUDA's integer min / max overloads (float ones go through fminf / fmaxf, NaN-ignoring).
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
