// The backward pass through a packed 4-bit weight for small M:
//     dX = g W + grad_xa A        (M x K)
// with g (M x N) the output gradient, W (N x K) NF4 / FP4 packed, and for LoRA
// grad_xa = s (g B) (M x r, float32, the gradient reaching x A^T) and A (r x K). This is the
// transposed access of gemv_4bit.cu: the reduction runs over the weight's rows n.
//
// Two kernels, deterministic (no atomics; the same bits whatever the block order):
//  * nybble_gemv_4bit_t_partial_*: a block owns kTCols * kTThreads consecutive columns k
//    (each thread 8 of them: one 4-byte load of packed codes per row, a warp load covering
//    128 contiguous bytes of the row), one range of rows (a "split", gridDim.y of them, so
//    enough blocks run when K is short) and MT rows of g (gridDim.z tiles). It walks its rows
//    in chunks of kTRowChunk: the block stages the chunk of g (converted to float32) in shared
//    memory, then every thread accumulates g[m, n] * w[n, k] for its 8 columns and MT rows in
//    float32 registers. Each split writes its partial sums to a float32 workspace
//    (splits x M x K). The packed weight is read once per tile of MT rows of g.
//  * nybble_gemv_4bit_t_finish_*: dX[m, k] = sum over splits in order, plus
//    sum_j grad_xa[m, j] A[j, k] (the LoRA term, skipped when grad_xa is null), rounded once.
//
// Weights enter at float32 precision (code * absmax, one rounding), as in gemv_4bit.cu.
// Requires K % 8 == 0 (8 aligned codes lie in one quantization block, the blocksize being a
// multiple of 32), packed 4-byte aligned and the workspace 16-byte aligned.
#include "nybble_common.cuh"

using namespace nybble;

constexpr int kTThreads = 128;   // threads per block of the partial kernel
constexpr int kTCols = 8;        // columns per thread
constexpr int kTRowChunk = 32;   // rows of g staged in shared memory at a time
constexpr int kTFinishThreads = 256;

template <int QT, typename T, int MT>
__device__ __forceinline__ void gemv_4bit_t_partial(const T* __restrict__ g, const u8* __restrict__ packed,
                                                    const float* __restrict__ absmax,
                                                    float* __restrict__ ws, int M, int N, int K,
                                                    int blocksize, int rows_per_split) {
    __shared__ float table[16];
    __shared__ float g_tile[kTRowChunk][MT];
    load_code_table<QT>(table);
    const int tid = threadIdx.x;
    const int k = (blockIdx.x * kTThreads + tid) * kTCols;
    const bool active = k < K;  // inactive threads still stage g and meet every barrier
    const int m0 = blockIdx.z * MT;
    const int rows = min(MT, M - m0);
    const int split = blockIdx.y;
    const int n_begin = split * rows_per_split;
    const int n_end = min(N, n_begin + rows_per_split);
    const int block_shift = log2_pow2(blocksize);

    float acc[MT][kTCols];
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int c = 0; c < kTCols; ++c) acc[m][c] = 0.0f;

    for (int nc = n_begin; nc < n_end; nc += kTRowChunk) {
        const int count = min(kTRowChunk, n_end - nc);
        __syncthreads();  // the previous chunk of g is consumed (and the table is loaded)
        for (int i = tid; i < kTRowChunk * MT; i += kTThreads) {
            const int m = i / kTRowChunk, r = i % kTRowChunk;  // r fastest: coalesced reads of g
            g_tile[r][m] = (r < count && m < rows) ? Cvt<T>::to_f(g[(long long)(m0 + m) * N + nc + r]) : 0.0f;
        }
        __syncthreads();
        if (active) {
#pragma unroll 4
            for (int r = 0; r < count; ++r) {
                const long long flat = (long long)(nc + r) * K + k;
                const u32 bytes = *reinterpret_cast<const u32*>(packed + flat / 2);
                const float scale = absmax[flat >> block_shift];
                float w[kTCols];
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const u32 b = (bytes >> (8 * j)) & 0xffu;  // byte j: elements 2j (high), 2j + 1
                    w[2 * j] = table[b >> 4] * scale;
                    w[2 * j + 1] = table[b & 15u] * scale;
                }
#pragma unroll
                for (int m = 0; m < MT; ++m) {
                    const float gv = g_tile[r][m];
#pragma unroll
                    for (int c = 0; c < kTCols; ++c) acc[m][c] = fmaf(gv, w[c], acc[m][c]);
                }
            }
        }
    }
    if (!active) return;
#pragma unroll
    for (int m = 0; m < MT; ++m) {
        if (m < rows) {
            float4* dst = reinterpret_cast<float4*>(ws + ((long long)split * M + m0 + m) * K + k);
            dst[0] = float4{acc[m][0], acc[m][1], acc[m][2], acc[m][3]};
            dst[1] = float4{acc[m][4], acc[m][5], acc[m][6], acc[m][7]};
        }
    }
}

// dX = sum_s ws[s] (+ grad_xa A), one thread per element (grid-stride), in the splits' order.
template <typename T>
__device__ __forceinline__ void gemv_4bit_t_finish(const float* __restrict__ ws, int splits,
                                                   const float* __restrict__ grad_xa,
                                                   const T* __restrict__ lora_a, int r,
                                                   T* __restrict__ out, int M, int K) {
    const long long numel = (long long)M * K;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < numel; i += stride) {
        float v = 0.0f;
        for (int s = 0; s < splits; ++s) v += ws[s * numel + i];
        if (grad_xa != nullptr) {
            const long long m = i / K;
            const long long k = i - m * K;
            float l = 0.0f;
            for (int j = 0; j < r; ++j) l = fmaf(grad_xa[m * r + j], Cvt<T>::to_f(lora_a[j * (long long)K + k]), l);
            v += l;
        }
        out[i] = Cvt<T>::from_f(v);
    }
}

#define NYBBLE_GEMV_4BIT_T(T, TN, QN, QT, MT)                                                \
    extern "C" __global__ void __launch_bounds__(kTThreads)                                  \
        nybble_gemv_4bit_t_partial_##QN##_##TN##_m##MT(                                      \
            const T* __restrict__ g, const u8* __restrict__ packed,                          \
            const float* __restrict__ absmax, float* __restrict__ ws, int M, int N, int K,   \
            int blocksize, int rows_per_split) {                                             \
        gemv_4bit_t_partial<QT, T, MT>(g, packed, absmax, ws, M, N, K, blocksize,            \
                                       rows_per_split);                                      \
    }

#define NYBBLE_GEMV_4BIT_T_TILES(QN, QT, MT) NYBBLE_FOR_EACH_FLOAT(NYBBLE_GEMV_4BIT_T, QN, QT, MT)

NYBBLE_GEMV_4BIT_T_TILES(nf4, kQuantNF4, 1)
NYBBLE_GEMV_4BIT_T_TILES(nf4, kQuantNF4, 2)
NYBBLE_GEMV_4BIT_T_TILES(nf4, kQuantNF4, 4)
NYBBLE_GEMV_4BIT_T_TILES(nf4, kQuantNF4, 8)
NYBBLE_GEMV_4BIT_T_TILES(fp4, kQuantFP4, 1)
NYBBLE_GEMV_4BIT_T_TILES(fp4, kQuantFP4, 2)
NYBBLE_GEMV_4BIT_T_TILES(fp4, kQuantFP4, 4)
NYBBLE_GEMV_4BIT_T_TILES(fp4, kQuantFP4, 8)

#define NYBBLE_GEMV_4BIT_T_FINISH(T, TN, UNUSED)                                             \
    extern "C" __global__ void __launch_bounds__(kTFinishThreads)                            \
        nybble_gemv_4bit_t_finish_##TN(                                                      \
            const float* __restrict__ ws, int splits, const float* __restrict__ grad_xa,     \
            const T* __restrict__ lora_a, int r, T* __restrict__ out, int M, int K) {        \
        gemv_4bit_t_finish<T>(ws, splits, grad_xa, lora_a, r, out, M, K);                    \
    }

NYBBLE_FOR_EACH_FLOAT(NYBBLE_GEMV_4BIT_T_FINISH, 0)
