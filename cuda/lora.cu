// The LoRA down projection for small M: xa = x A^T (M x r, float32), the prologue of the fused
// 4-bit GEMV with a LoRA epilogue (gemv_4bit.cu) and of the LLM.int8() LoRA epilogue (int8.cu).
//
// One warp computes one adapter row j (a row of A, K elements) for MT rows of x; a block of
// kLoraWarps warps takes consecutive j. Lane l reads 8 consecutive elements (16 bytes of a
// 16-bit type, 32 of float32) at k = 8 l, 8 l + 256, ..., so each warp load is contiguous.
// Accumulation is float32 (fmaf per product, then one warp sum); xa is not rounded to the
// activations' dtype, so the epilogue sees it at float32 precision.
//
// Multi-adapter serving: A is stacked (L, r, K) and `adapter` (M,) gives each row's adapter;
// a row whose adapter is negative or >= L gets xa = 0 (the base output only). With `adapter`
// null every row uses adapter 0, and each chunk of A is loaded once for all rows of the tile.
//
// Requires K % 8 == 0 and x, A 16-byte aligned.
#include "nybble_common.cuh"

using namespace nybble;

constexpr int kLoraWarps = 4;  // adapter rows per thread block
constexpr int kLoraVec = 8;    // elements per lane per step

template <typename T>
__device__ __forceinline__ void load8(const T* __restrict__ p, float* v) {
    constexpr int kPerVec = 16 / sizeof(T);
    const uint4* q = reinterpret_cast<const uint4*>(p);
#pragma unroll
    for (int i = 0; i < kLoraVec / kPerVec; ++i) {
        const uint4 raw = q[i];
        const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int k = 0; k < kPerVec; ++k) v[i * kPerVec + k] = Cvt<T>::to_f(e[k]);
    }
}

template <typename T, int MT>
__device__ __forceinline__ void lora_down(const T* __restrict__ x, const T* __restrict__ a,
                                          const int* __restrict__ adapter, float* __restrict__ xa,
                                          int M, int R, int K, int adapters) {
    const int lane = threadIdx.x % kWarp;
    const int j = blockIdx.x * kLoraWarps + threadIdx.x / kWarp;
    const int m0 = blockIdx.y * MT;
    if (j >= R) return;  // the whole warp
    const int rows = min(MT, M - m0);

    // Rows past M (the last tile's ragged end) repeat row M - 1 and are never written.
    float acc[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[m] = 0.0f;
    if (adapter == nullptr) {
        const T* a_row = a + (long long)j * K;
        for (int k0 = lane * kLoraVec; k0 < K; k0 += kWarp * kLoraVec) {
            float av[kLoraVec];
            load8<T>(a_row + k0, av);  // once for all rows
#pragma unroll
            for (int m = 0; m < MT; ++m) {
                float xv[kLoraVec];
                load8<T>(x + (long long)min(m0 + m, M - 1) * K + k0, xv);
#pragma unroll
                for (int i = 0; i < kLoraVec; ++i) acc[m] = fmaf(xv[i], av[i], acc[m]);
            }
        }
    } else {
        // An adapter per row (invalid ones read adapter 0 and are zeroed at the end).
        const T* a_row[MT];
        const T* x_row[MT];
#pragma unroll
        for (int m = 0; m < MT; ++m) {
            const int row = min(m0 + m, M - 1);
            const int ad = adapter[row];
            a_row[m] = a + ((long long)((ad >= 0 && ad < adapters) ? ad : 0) * R + j) * K;
            x_row[m] = x + (long long)row * K;
        }
        for (int k0 = lane * kLoraVec; k0 < K; k0 += kWarp * kLoraVec) {
#pragma unroll
            for (int m = 0; m < MT; ++m) {
                float av[kLoraVec], xv[kLoraVec];
                load8<T>(a_row[m] + k0, av);
                load8<T>(x_row[m] + k0, xv);
#pragma unroll
                for (int i = 0; i < kLoraVec; ++i) acc[m] = fmaf(xv[i], av[i], acc[m]);
            }
        }
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
        const float s = warp_sum(acc[m]);
        if (lane == 0 && m < rows) {
            const int ad = adapter != nullptr ? adapter[m0 + m] : 0;
            xa[(long long)(m0 + m) * R + j] = (ad >= 0 && ad < adapters) ? s : 0.0f;
        }
    }
}

#define NYBBLE_LORA_DOWN(T, TN, MT)                                                          \
    extern "C" __global__ void __launch_bounds__(kLoraWarps * kWarp)                         \
        nybble_lora_down_##TN##_m##MT(                                                       \
            const T* __restrict__ x, const T* __restrict__ a, const int* __restrict__ adapter, \
            float* __restrict__ xa, int M, int R, int K, int adapters) {                     \
        lora_down<T, MT>(x, a, adapter, xa, M, R, K, adapters);                              \
    }

// Row tiles: the loader picks the smallest tile >= M, several tiles of 8 beyond 8 (A is
// small and stays in L2; a 16-row tile spills on sm_80).
NYBBLE_FOR_EACH_FLOAT(NYBBLE_LORA_DOWN, 1)
NYBBLE_FOR_EACH_FLOAT(NYBBLE_LORA_DOWN, 2)
NYBBLE_FOR_EACH_FLOAT(NYBBLE_LORA_DOWN, 4)
NYBBLE_FOR_EACH_FLOAT(NYBBLE_LORA_DOWN, 8)
