// LLM.int8() kernels: outlier column detection, vector-wise (row) int8 quantization with
// outlier columns zeroed, and the int32 -> float dequantization epilogue of the int8 GEMM.
// Quantization is bit-identical to the CPU core: factor = (1 / absmax) * 127 (correctly
// rounded reciprocal, as torch evaluates 127 / t), round half to even, saturate to int8.
#include "nybble_common.cuh"

using namespace nybble;

constexpr int kRowThreads = 256;

// flags[c] = 1 for every column holding any |x| >= threshold; flags must be zeroed first.
// Concurrent writers all store the same value, so no atomics are needed.
template <typename T>
__device__ __forceinline__ void int8_outlier_flags(const T* __restrict__ x, int* __restrict__ flags,
                                                   long long numel, int cols, float threshold) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < numel; i += stride) {
        if (fabsf(Cvt<T>::to_f(x[i])) >= threshold) flags[i % cols] = 1;
    }
}

// One thread block per row. `col_flags` is null when outlier extraction is off (threshold 0).
template <typename T>
__device__ __forceinline__ void int8_vectorwise_quant(const T* __restrict__ x,
                                                      const int* __restrict__ col_flags,
                                                      i8* __restrict__ q,
                                                      float* __restrict__ row_absmax, int cols,
                                                      float threshold) {
    __shared__ float warp_amax[kRowThreads / kWarp];
    const long long row = blockIdx.x;
    const T* xr = x + row * cols;
    i8* qr = q + row * cols;
    const bool extract = threshold > 0.0f;

    float amax = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float a = fabsf(Cvt<T>::to_f(xr[c]));
        // Outlier elements stay out of the row absmax (they are multiplied in 16-bit).
        if (!(extract && a >= threshold)) amax = fmaxf(amax, a);
    }
    amax = warp_max(amax);
    if (threadIdx.x % kWarp == 0) warp_amax[threadIdx.x / kWarp] = amax;
    __syncthreads();
    amax = 0.0f;
#pragma unroll
    for (int w = 0; w < kRowThreads / kWarp; ++w) amax = fmaxf(amax, warp_amax[w]);
    if (threadIdx.x == 0) row_absmax[row] = amax;

    const float factor = amax > 0.0f ? __fmul_rn(__frcp_rn(amax), 127.0f) : 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        int v = 0;
        if (col_flags == nullptr || col_flags[c] == 0) {
            v = __float2int_rn(__fmul_rn(Cvt<T>::to_f(xr[c]), factor));  // half to even
            v = max(-128, min(127, v));
        }
        qr[c] = (i8)v;
    }
}

// out[i, j] = acc[i, j] * ((row_scale[i] * col_scale[j]) * (1 / 127^2)) + bias[j], each
// operation rounded to float32 in this order (the torch reference uses the same order).
// `acc` may be wider than the output (padded for torch._int_mm): ld_acc is its row stride.
template <typename T>
__device__ __forceinline__ void int8_mm_dequant(const int* __restrict__ acc, long long ld_acc,
                                                const float* __restrict__ row_scale,
                                                const float* __restrict__ col_scale,
                                                const T* __restrict__ bias, T* __restrict__ out,
                                                int rows, int cols) {
    const long long numel = (long long)rows * cols;
    const long long stride = (long long)gridDim.x * blockDim.x;
    constexpr float kInv127Sq = 1.0f / (127.0f * 127.0f);
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < numel; i += stride) {
        const long long r = i / cols;
        const int c = (int)(i - r * cols);
        const float s = __fmul_rn(__fmul_rn(row_scale[r], col_scale[c]), kInv127Sq);
        float v = __fmul_rn((float)acc[r * ld_acc + c], s);
        if (bias != nullptr) v = __fadd_rn(v, Cvt<T>::to_f(bias[c]));
        out[i] = Cvt<T>::from_f(v);
    }
}

// The LLM.int8() linear layer's epilogue with its LoRA term, for small M (one kernel instead
// of dequantize, add outliers, add bias, two adapter GEMMs and an add):
//   v = acc[i, j] * ((row_scale[i] * col_scale[j]) * (1 / 127^2))     as int8_mm_dequant
//   v = v + addend[i, j]          (float32 (rows, cols): the outlier columns' product, or null)
//   v = v + bias[j]               (float32, or null)
//   out[i, j] = v + scale * sum_q xa[i, q] B[j, q]     (xa (rows, r) float32, B (cols, r)),
// rounded once to T. Up to the LoRA term each step rounds to float32 in the order of the
// composition nybble::int8_linear evaluates (bit-identical to it with a zero adapter).
template <typename T>
__device__ __forceinline__ void int8_mm_dequant_lora(const int* __restrict__ acc, long long ld_acc,
                                                     const float* __restrict__ row_scale,
                                                     const float* __restrict__ col_scale,
                                                     const float* __restrict__ addend,
                                                     const float* __restrict__ bias,
                                                     const float* __restrict__ xa,
                                                     const T* __restrict__ lora_b, float scale, int r,
                                                     T* __restrict__ out, int rows, int cols) {
    const long long numel = (long long)rows * cols;
    const long long stride = (long long)gridDim.x * blockDim.x;
    constexpr float kInv127Sq = 1.0f / (127.0f * 127.0f);
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < numel; i += stride) {
        const long long row = i / cols;
        const int c = (int)(i - row * cols);
        const float s = __fmul_rn(__fmul_rn(row_scale[row], col_scale[c]), kInv127Sq);
        float v = __fmul_rn((float)acc[row * ld_acc + c], s);
        if (addend != nullptr) v = __fadd_rn(v, addend[i]);
        if (bias != nullptr) v = __fadd_rn(v, bias[c]);
        const float* xa_row = xa + row * r;
        const T* b_row = lora_b + (long long)c * r;
        float l = 0.0f;
        for (int q = 0; q < r; ++q) l = fmaf(xa_row[q], Cvt<T>::to_f(b_row[q]), l);
        out[i] = Cvt<T>::from_f(fmaf(l, scale, v));
    }
}

#define NYBBLE_INT8_KERNELS(T, TN, UNUSED)                                                    \
    extern "C" __global__ void __launch_bounds__(256) nybble_int8_outlier_flags_##TN(         \
        const T* __restrict__ x, int* __restrict__ flags, long long numel, int cols,          \
        float threshold) {                                                                    \
        int8_outlier_flags<T>(x, flags, numel, cols, threshold);                              \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(kRowThreads) nybble_int8_vectorwise_quant_##TN( \
        const T* __restrict__ x, const int* __restrict__ col_flags, i8* __restrict__ q,       \
        float* __restrict__ row_absmax, int cols, float threshold) {                          \
        int8_vectorwise_quant<T>(x, col_flags, q, row_absmax, cols, threshold);               \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(256) nybble_int8_mm_dequant_##TN(            \
        const int* __restrict__ acc, long long ld_acc, const float* __restrict__ row_scale,   \
        const float* __restrict__ col_scale, const T* __restrict__ bias, T* __restrict__ out, \
        int rows, int cols) {                                                                 \
        int8_mm_dequant<T>(acc, ld_acc, row_scale, col_scale, bias, out, rows, cols);         \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(256) nybble_int8_mm_dequant_lora_##TN(       \
        const int* __restrict__ acc, long long ld_acc, const float* __restrict__ row_scale,   \
        const float* __restrict__ col_scale, const float* __restrict__ addend,                \
        const float* __restrict__ bias, const float* __restrict__ xa,                         \
        const T* __restrict__ lora_b, float scale, int r, T* __restrict__ out, int rows,      \
        int cols) {                                                                           \
        int8_mm_dequant_lora<T>(acc, ld_acc, row_scale, col_scale, addend, bias, xa, lora_b,  \
                                scale, r, out, rows, cols);                                   \
    }

NYBBLE_FOR_EACH_FLOAT(NYBBLE_INT8_KERNELS, 0)
