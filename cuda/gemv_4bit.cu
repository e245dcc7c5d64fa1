// Fused dequantize + matmul for small M (decode, M = 1..64): out = x @ W^T (+ bias), where W
// (N x K) is NF4 / FP4 packed. The packed weight is read once per tile of MT rows of x.
//
// One warp computes one output column n for MT rows of x. Lane l reads 16 packed bytes (32
// codes) per step at byte offset 16 * l, so a warp load covers 512 consecutive bytes of the
// weight row. Codes decode through a shared 16-entry table; the block's absmax multiplies the
// 32-element partial sum once instead of every weight. Weights are therefore used at full
// float32 precision (code * absmax), not rounded to the compute dtype first: the result may
// differ from dequantize-then-matmul by the weight rounding, never more.
//
// Requires K % 32 == 0 (so a 32-code chunk is 16-byte aligned and lies inside one
// quantization block, blocksize being a multiple of 32) and 16-byte aligned x and packed.
#include "nybble_common.cuh"

using namespace nybble;

constexpr int kGemvWarps = 4;  // output columns per thread block
constexpr int kChunk = 32;     // codes per lane per step

// Loads 32 consecutive elements of x (64 bytes for 16-bit types) as float.
template <typename T>
__device__ __forceinline__ void load_x32(const T* __restrict__ p, float* v) {
    const uint4* q = reinterpret_cast<const uint4*>(p);
    constexpr int kPerVec = 16 / sizeof(T);
#pragma unroll
    for (int j = 0; j < kChunk / kPerVec; ++j) {
        const uint4 raw = q[j];
        const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int k = 0; k < kPerVec; ++k) v[j * kPerVec + k] = Cvt<T>::to_f(e[k]);
    }
}

template <int QT, typename T, int MT>
__device__ __forceinline__ void gemv_4bit(const T* __restrict__ x, const u8* __restrict__ packed,
                                          const float* __restrict__ absmax,
                                          const T* __restrict__ bias, T* __restrict__ out, int M,
                                          int N, int K, int blocksize) {
    __shared__ float table[16];
    load_code_table<QT>(table);
    __syncthreads();
    const int lane = threadIdx.x % kWarp;
    const int n = blockIdx.x * kGemvWarps + threadIdx.x / kWarp;
    const int m0 = blockIdx.y * MT;
    if (n >= N) return;
    const int rows = min(MT, M - m0);

    float acc[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[m] = 0.0f;

    const long long row_flat = (long long)n * K;
    const u8* w_row = packed + row_flat / 2;
    for (int k0 = lane * kChunk; k0 < K; k0 += kWarp * kChunk) {
        const uint4 w = *reinterpret_cast<const uint4*>(w_row + k0 / 2);
        const float scale = absmax[(row_flat + k0) / blocksize];
        const u32 words[4] = {w.x, w.y, w.z, w.w};
        float wv[kChunk];
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            const u32 b = (words[j / 4] >> (8 * (j % 4))) & 0xffu;
            wv[2 * j] = table[b >> 4];
            wv[2 * j + 1] = table[b & 15u];
        }
#pragma unroll
        for (int m = 0; m < MT; ++m) {
            if (m < rows) {
                float xv[kChunk];
                load_x32<T>(x + (long long)(m0 + m) * K + k0, xv);
                float partial = 0.0f;
#pragma unroll
                for (int j = 0; j < kChunk; ++j) partial = fmaf(wv[j], xv[j], partial);
                acc[m] = fmaf(partial, scale, acc[m]);
            }
        }
    }
    const float b = bias != nullptr ? Cvt<T>::to_f(bias[n]) : 0.0f;
#pragma unroll
    for (int m = 0; m < MT; ++m) {
        const float s = warp_sum(acc[m]);
        if (lane == 0 && m < rows) out[(long long)(m0 + m) * N + n] = Cvt<T>::from_f(s + b);
    }
}

#define NYBBLE_GEMV_4BIT(T, TN, QN, QT, MT)                                                  \
    extern "C" __global__ void __launch_bounds__(kGemvWarps * kWarp)                         \
        nybble_gemv_4bit_##QN##_##TN##_m##MT(                                                \
            const T* __restrict__ x, const u8* __restrict__ packed,                          \
            const float* __restrict__ absmax, const T* __restrict__ bias,                    \
            T* __restrict__ out, int M, int N, int K, int blocksize) {                       \
        gemv_4bit<QT, T, MT>(x, packed, absmax, bias, out, M, N, K, blocksize);              \
    }

#define NYBBLE_GEMV_4BIT_TILES(QN, QT, MT)                   \
    NYBBLE_FOR_EACH_FLOAT(NYBBLE_GEMV_4BIT, QN, QT, MT)

// Row tiles: the loader picks the smallest tile >= M (16 for M > 8, over ceil(M / 16) tiles).
NYBBLE_GEMV_4BIT_TILES(nf4, kQuantNF4, 1)
NYBBLE_GEMV_4BIT_TILES(nf4, kQuantNF4, 2)
NYBBLE_GEMV_4BIT_TILES(nf4, kQuantNF4, 4)
NYBBLE_GEMV_4BIT_TILES(nf4, kQuantNF4, 8)
NYBBLE_GEMV_4BIT_TILES(nf4, kQuantNF4, 16)
NYBBLE_GEMV_4BIT_TILES(fp4, kQuantFP4, 1)
NYBBLE_GEMV_4BIT_TILES(fp4, kQuantFP4, 2)
NYBBLE_GEMV_4BIT_TILES(fp4, kQuantFP4, 4)
NYBBLE_GEMV_4BIT_TILES(fp4, kQuantFP4, 8)
NYBBLE_GEMV_4BIT_TILES(fp4, kQuantFP4, 16)
