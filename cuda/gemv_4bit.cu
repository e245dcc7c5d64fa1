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
//
// The LoRA variant (nybble_gemv_4bit_lora_*) adds s * (x_lora A^T) B^T in the epilogue, from
// xa = x_lora A^T (M x r, float32, computed first by lora.cu's nybble_lora_down_*): before the
// warp reduction, lane l adds xa[m, j] * (s B[n, j]) for j = l, l + 32, ... to its partial sum,
// so the one warp_sum per row reduces the base and the LoRA term together and the output is
// rounded once. B is (N, r), or stacked (L, N, r) with `adapter` giving each row's adapter
// (negative or >= L: no LoRA term for that row) and `adapter_scale` (L,) each adapter's
// factor (null: 1). The packed weight is still read once per tile of rows.
#include "nybble_common.cuh"

using namespace nybble;

constexpr int kGemvWarps = 4;  // output columns per thread block
constexpr int kChunk = 32;     // codes per lane per step

// Loads 8 consecutive elements of x (16 bytes for 16-bit types, 32 for float32) as float.
template <typename T>
__device__ __forceinline__ void load_x8(const T* __restrict__ p, float* v) {
    const uint4* q = reinterpret_cast<const uint4*>(p);
    constexpr int kPerVec = 16 / sizeof(T);
#pragma unroll
    for (int j = 0; j < 8 / kPerVec; ++j) {
        const uint4 raw = q[j];
        const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int k = 0; k < kPerVec; ++k) v[j * kPerVec + k] = Cvt<T>::to_f(e[k]);
    }
}

// The LoRA epilogue's operands (all null / zero for the plain GEMV).
template <typename T>
struct LoraEpilogue {
    const float* xa;            // (M, r) float32
    const T* b;                 // (L, N, r)
    const int* adapter;         // (M,) or null: adapter 0 for every row
    const float* adapter_scale; // (L,) or null
    float scale;
    int r;
    int adapters;               // L
};

template <int QT, typename T, int MT, bool LORA>
__device__ __forceinline__ void gemv_4bit(const T* __restrict__ x, const u8* __restrict__ packed,
                                          const float* __restrict__ absmax,
                                          const T* __restrict__ bias, T* __restrict__ out, int M,
                                          int N, int K, int blocksize, const LoraEpilogue<T> lora) {
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

    const int block_shift = log2_pow2(blocksize);
    const long long row_flat = (long long)n * K;
    const u8* w_row = packed + row_flat / 2;
    for (int k0 = lane * kChunk; k0 < K; k0 += kWarp * kChunk) {
        const uint4 w = *reinterpret_cast<const uint4*>(w_row + k0 / 2);
        const float scale = absmax[(row_flat + k0) >> block_shift];
        const u32 words[4] = {w.x, w.y, w.z, w.w};
        // The 32 codes in four groups of 8 (one word each), every row's partial sum chained
        // through them in code order. Rows past M (the last tile's ragged end) repeat row
        // M - 1 and are never written, so no per-row predicate stays live across the loop.
        float partial[MT];
#pragma unroll
        for (int m = 0; m < MT; ++m) partial[m] = 0.0f;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            float wv[8];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const u32 b = (words[q] >> (8 * j)) & 0xffu;  // little-endian: byte j is codes 2j, 2j + 1
                wv[2 * j] = table[b >> 4];
                wv[2 * j + 1] = table[b & 15u];
            }
#pragma unroll
            for (int m = 0; m < MT; ++m) {
                float xv[8];
                load_x8<T>(x + (long long)min(m0 + m, M - 1) * K + k0 + 8 * q, xv);
#pragma unroll
                for (int j = 0; j < 8; ++j) partial[m] = fmaf(wv[j], xv[j], partial[m]);
            }
        }
#pragma unroll
        for (int m = 0; m < MT; ++m) acc[m] = fmaf(partial[m], scale, acc[m]);
    }
    if (LORA && lora.adapter == nullptr) {
        // One adapter: lane l adds xa[m, j] * (s B[n, j]) over j = l, l + 32, ... to its
        // partial sums, each B element loaded (and scaled) once for all rows.
        const float s = lora.adapter_scale != nullptr ? lora.scale * lora.adapter_scale[0] : lora.scale;
        for (int j = lane; j < lora.r; j += kWarp) {
            const float sb = s * Cvt<T>::to_f(lora.b[(long long)n * lora.r + j]);
#pragma unroll
            for (int m = 0; m < MT; ++m) acc[m] = fmaf(lora.xa[(long long)min(m0 + m, M - 1) * lora.r + j], sb, acc[m]);
        }
    } else if (LORA) {
        // An adapter per row: the same sums, each row against its own B.
#pragma unroll
        for (int m = 0; m < MT; ++m) {
            const int row = min(m0 + m, M - 1);
            const int a = lora.adapter[row];
            if (a >= 0 && a < lora.adapters) {
                const T* b_row = lora.b + ((long long)a * N + n) * lora.r;
                const float* xa_row = lora.xa + (long long)row * lora.r;
                const float s = lora.adapter_scale != nullptr ? lora.scale * lora.adapter_scale[a] : lora.scale;
                for (int j = lane; j < lora.r; j += kWarp) acc[m] = fmaf(xa_row[j], s * Cvt<T>::to_f(b_row[j]), acc[m]);
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
        const LoraEpilogue<T> none{nullptr, nullptr, nullptr, nullptr, 0.0f, 0, 0};          \
        gemv_4bit<QT, T, MT, false>(x, packed, absmax, bias, out, M, N, K, blocksize, none); \
    }                                                                                        \
    extern "C" __global__ void __launch_bounds__(kGemvWarps * kWarp)                         \
        nybble_gemv_4bit_lora_##QN##_##TN##_m##MT(                                           \
            const T* __restrict__ x, const u8* __restrict__ packed,                          \
            const float* __restrict__ absmax, const T* __restrict__ bias,                    \
            T* __restrict__ out, int M, int N, int K, int blocksize,                         \
            const float* __restrict__ xa, const T* __restrict__ lora_b,                      \
            const int* __restrict__ adapter, const float* __restrict__ adapter_scale,        \
            float scale, int r, int adapters) {                                              \
        const LoraEpilogue<T> lora{xa, lora_b, adapter, adapter_scale, scale, r, adapters};  \
        gemv_4bit<QT, T, MT, true>(x, packed, absmax, bias, out, M, N, K, blocksize, lora);  \
    }

#define NYBBLE_GEMV_4BIT_TILES(QN, QT, MT)                                                   \
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
