// Fused AdamW steps on the GPU, the same math as rust/core/src/optim.rs:
//   p *= 1 - lr wd; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
//   p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)
// with 32-bit states, or 8-bit block-wise states (bitsandbytes' AdamW8bit: signed dynamic
// map for m, unsigned for v, one float32 absmax per block of 256 elements). The parameter
// update uses the float32 states before they are re-encoded against the new block absmax.
//
// Every float operation is an explicitly rounded intrinsic (no FMA contraction), so a step
// gives the same bits as the CPU core. The per-step constants are computed by the caller
// (float64, rounded to float32) exactly as the CPU core computes them.

#include "nybble_common.cuh"

namespace {

using nybble::Cvt;

enum : int { kStateBlock = 256 };  // elements per absmax block == threads per CUDA block
#define NYBBLE_MIN_ABSMAX 1e-38f

template <typename T>
__device__ __forceinline__ float load_f(const T* p, long long i) { return Cvt<T>::to_f(p[i]); }
template <typename T>
__device__ __forceinline__ void store_f(T* p, long long i, float v) { p[i] = Cvt<T>::from_f(v); }

struct Consts {
  float beta1, beta2, omb1, omb2, decay, step_size, bc2_sqrt, eps;
};

__device__ __forceinline__ void adam_update(const Consts& c, float& p, float g, float& m, float& v) {
  p = __fmul_rn(p, c.decay);
  m = __fadd_rn(__fmul_rn(m, c.beta1), __fmul_rn(g, c.omb1));
  v = __fadd_rn(__fmul_rn(v, c.beta2), __fmul_rn(__fmul_rn(g, g), c.omb2));
  const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), c.bc2_sqrt), c.eps);
  p = __fsub_rn(p, __fmul_rn(c.step_size, __fdiv_rn(m, denom)));
}

// Nearest entry of an ascending 256-entry table, ties to the lower index (as the CPU core).
__device__ __forceinline__ unsigned char nearest_code(const float* code, float s) {
  int lo = 0, hi = 256;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (code[mid] <= s) lo = mid + 1; else hi = mid;
  }
  int idx = lo > 0 ? lo - 1 : 0;
  if (idx + 1 < 256 && fabsf(__fsub_rn(s, code[idx + 1])) < fabsf(__fsub_rn(s, code[idx]))) ++idx;
  return static_cast<unsigned char>(idx);
}

using nybble::warp_max;  // max of non-negative values (|m|, |v|)

// One CUDA block (256 threads) per state block; thread t owns element block*256 + t.
template <typename T>
__device__ void adamw_8bit(T* __restrict__ p, const T* __restrict__ g, unsigned char* __restrict__ s1,
                           unsigned char* __restrict__ s2, float* __restrict__ absmax1, float* __restrict__ absmax2,
                           const float* __restrict__ code1, const float* __restrict__ code2, long long n,
                           const Consts c) {
  __shared__ float q1[256], q2[256];
  __shared__ float red1[kStateBlock / 32], red2[kStateBlock / 32];
  const int tid = threadIdx.x;
  q1[tid] = code1[tid];
  q2[tid] = code2[tid];
  const long long block = blockIdx.x;
  const long long i = block * kStateBlock + tid;
  const bool valid = i < n;
  const float a1 = absmax1[block], a2 = absmax2[block];
  __syncthreads();
  float m = 0.0f, v = 0.0f;
  if (valid) {
    float pv = load_f(p, i);
    const float gv = load_f(g, i);
    m = __fmul_rn(q1[s1[i]], a1);
    v = __fmul_rn(q2[s2[i]], a2);
    adam_update(c, pv, gv, m, v);
    store_f(p, i, pv);
  }
  float am1 = warp_max(fabsf(m)), am2 = warp_max(fabsf(v));
  const int lane = tid & 31, warp = tid >> 5;
  if (lane == 0) { red1[warp] = am1; red2[warp] = am2; }
  __syncthreads();  // also orders every thread's read of absmax[block] before the write below
  if (warp == 0) {
    am1 = lane < kStateBlock / 32 ? red1[lane] : 0.0f;
    am2 = lane < kStateBlock / 32 ? red2[lane] : 0.0f;
    am1 = warp_max(am1);
    am2 = warp_max(am2);
    if (lane == 0) { red1[0] = am1; red2[0] = am2; }
  }
  __syncthreads();
  const float new1 = red1[0], new2 = red2[0];
  if (valid) {
    s1[i] = nearest_code(q1, __fdiv_rn(m, fmaxf(new1, NYBBLE_MIN_ABSMAX)));
    s2[i] = nearest_code(q2, __fdiv_rn(v, fmaxf(new2, NYBBLE_MIN_ABSMAX)));
  }
  if (tid == 0) { absmax1[block] = new1; absmax2[block] = new2; }
}

template <typename T>
__device__ void adamw_32bit(T* __restrict__ p, const T* __restrict__ g, float* __restrict__ m,
                            float* __restrict__ v, long long n, const Consts c) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
    float pv = load_f(p, i), mv = m[i], vv = v[i];
    adam_update(c, pv, load_f(g, i), mv, vv);
    store_f(p, i, pv);
    m[i] = mv;
    v[i] = vv;
  }
}

}  // namespace

#define NYBBLE_CONSTS float beta1, float beta2, float omb1, float omb2, float decay, float step_size, float bc2_sqrt, float eps
#define NYBBLE_MAKE_CONSTS Consts{beta1, beta2, omb1, omb2, decay, step_size, bc2_sqrt, eps}

#define NYBBLE_OPTIM_KERNELS(T, SUFFIX, UNUSED)                                                                   \
  extern "C" __global__ void __launch_bounds__(kStateBlock) nybble_adamw_8bit_##SUFFIX(                           \
      T* p, const T* g, unsigned char* s1, unsigned char* s2, float* absmax1, float* absmax2, const float* code1, \
      const float* code2, long long n, NYBBLE_CONSTS) {                                                           \
    adamw_8bit<T>(p, g, s1, s2, absmax1, absmax2, code1, code2, n, NYBBLE_MAKE_CONSTS);                           \
  }                                                                                                               \
  extern "C" __global__ void __launch_bounds__(kStateBlock) nybble_adamw_32bit_##SUFFIX(                          \
      T* p, const T* g, float* m, float* v, long long n, NYBBLE_CONSTS) {                                         \
    adamw_32bit<T>(p, g, m, v, n, NYBBLE_MAKE_CONSTS);                                                            \
  }

NYBBLE_FOR_EACH_FLOAT(NYBBLE_OPTIM_KERNELS, adamw)
