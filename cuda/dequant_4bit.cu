// NF4 / FP4 dequantization and double-quant absmax decoding.
//
// Layout (DESIGN.md): the tensor is flattened row-major, two codes per byte with element 2j in
// the HIGH nibble, one float32 absmax per block of `blocksize` elements (a multiple of 32).
// Every product is a single float32 multiply followed by one rounding to the output type, so
// results are bit-identical to the CPU core.
#include "nybble_common.cuh"

using namespace nybble;

// Each thread decodes 8 elements: one 4-byte load and one 16-byte store (two for float32),
// both fully coalesced across the warp. 8 aligned elements never straddle a block because
// blocksize is a multiple of 32. Requires `packed` 4-byte and `out` 16-byte aligned.
template <int QT, typename T>
__device__ __forceinline__ void dequant_4bit(const u8* __restrict__ packed,
                                             const float* __restrict__ absmax,
                                             T* __restrict__ out, long long n, int blocksize) {
    __shared__ float table[16];
    load_code_table<QT>(table);
    __syncthreads();
    const long long unit = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long first = unit * 8;
    if (first >= n) return;
    const float scale = absmax[first / blocksize];
    if (first + 8 <= n) {
        const u32 bytes = *reinterpret_cast<const u32*>(packed + unit * 4);
        Vec8<T> o;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const u32 b = (bytes >> (8 * j)) & 0xffu;  // little-endian: byte j is elements 2j, 2j+1
            o.v[2 * j] = Cvt<T>::from_f(table[b >> 4] * scale);
            o.v[2 * j + 1] = Cvt<T>::from_f(table[b & 15u] * scale);
        }
        *reinterpret_cast<Vec8<T>*>(out + first) = o;
    } else {
        // The ragged tail (n % 8 elements): byte-wise, the last odd element uses its high nibble.
        for (long long i = first; i < n; ++i) {
            const u32 b = packed[i >> 1];
            const u32 c = (i & 1) ? (b & 15u) : (b >> 4);
            out[i] = Cvt<T>::from_f(table[c] * scale);
        }
    }
}

#define NYBBLE_DEQUANT_4BIT(T, TN, QN, QT)                                                   \
    extern "C" __global__ void __launch_bounds__(256)                                        \
        nybble_dequant_4bit_##QN##_##TN(const u8* __restrict__ packed,                       \
                                        const float* __restrict__ absmax,                    \
                                        T* __restrict__ out, long long n, int blocksize) {   \
        dequant_4bit<QT, T>(packed, absmax, out, n, blocksize);                              \
    }

NYBBLE_FOR_EACH_FLOAT(NYBBLE_DEQUANT_4BIT, nf4, kQuantNF4)
NYBBLE_FOR_EACH_FLOAT(NYBBLE_DEQUANT_4BIT, fp4, kQuantFP4)

// Double quantization: absmax[i] = code[q[i]] * nested_absmax[i / nested_blocksize] + offset,
// as two separately rounded float32 operations (no FMA contraction), like the CPU core.
// The offset is read from device memory: the modules keep it in a GPU buffer, and passing it
// by value would cost a device-to-host sync per layer per forward.
extern "C" __global__ void __launch_bounds__(256)
    nybble_decode_absmax(const u8* __restrict__ codes, const float* __restrict__ nested_absmax,
                         const float* __restrict__ nested_code, const float* __restrict__ offset,
                         float* __restrict__ out, long long n, int nested_blocksize) {
    __shared__ float code[256];
    for (int i = threadIdx.x; i < 256; i += blockDim.x) code[i] = nested_code[i];
    __syncthreads();
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    out[i] = __fadd_rn(__fmul_rn(code[codes[i]], nested_absmax[i / nested_blocksize]), *offset);
}
