// __half for the CPU emulator: the storage type and CUDA's conversions, bit-exact (round to
// nearest even, overflow to infinity, subnormals, NaN to the canonical 0x7fff like cvt.rn.f16.f32).
#pragma once

#include "nybble_emu_runtime.h"

namespace nybble_emu {

inline std::uint16_t f32_to_f16_bits(float f) {
    std::uint32_t x;
    std::memcpy(&x, &f, 4);
    const std::uint16_t sign = static_cast<std::uint16_t>((x >> 16) & 0x8000u);
    const std::uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return 0x7fffu;                         // NaN
    if (ax >= 0x477ff000u) return sign | 0x7c00u;                 // >= 65520 rounds to infinity
    if (ax >= 0x38800000u) {                                      // normal half (>= 2^-14)
        const std::uint32_t rounded = ax + 0x0fffu + ((ax >> 13) & 1u);  // RNE at mantissa bit 13
        return sign | static_cast<std::uint16_t>((rounded - 0x38000000u) >> 13);  // rebias 127 -> 15
    }
    // Subnormal half: round |f| / 2^-24 to an integer (1024 becomes the smallest normal).
    const int exponent = static_cast<int>(ax >> 23);
    const int shift = 126 - exponent;  // |f| = m * 2^(exponent - 150) = (m >> shift) * 2^-24
    if (exponent == 0 || shift > 24) return sign;
    const std::uint32_t m = (ax & 0x7fffffu) | 0x800000u;
    std::uint32_t q = m >> shift;
    const std::uint32_t rest = m & ((1u << shift) - 1u), half = 1u << (shift - 1);
    if (rest > half || (rest == half && (q & 1u))) ++q;
    return sign | static_cast<std::uint16_t>(q);
}

inline float f16_bits_to_f32(std::uint16_t h) {
    const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
    const std::uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
    std::uint32_t x;
    if (exponent == 0x1fu) {
        x = sign | 0x7f800000u | (mantissa << 13);  // Inf / NaN (payload kept)
    } else if (exponent != 0) {
        x = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    } else {
        const float magnitude = static_cast<float>(mantissa) * 0x1p-24f;  // exact
        std::memcpy(&x, &magnitude, 4);
        x |= sign;
    }
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}

}  // namespace nybble_emu

struct __half {
    std::uint16_t __x;
    __half() = default;
    // CUDA's implicit conversions (present unless __CUDA_NO_HALF_CONVERSIONS__): round to nearest even.
    __half(float f) : __x(nybble_emu::f32_to_f16_bits(f)) {}
    operator float() const { return nybble_emu::f16_bits_to_f32(__x); }
};
static_assert(sizeof(__half) == 2 && std::is_trivially_copyable_v<__half>);

inline __half __ushort_as_half(unsigned short bits) {
    __half h;
    h.__x = bits;
    return h;
}
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __float2half_rn(float f) { return __ushort_as_half(nybble_emu::f32_to_f16_bits(f)); }
inline __half __float2half(float f) { return __float2half_rn(f); }
inline float __half2float(__half h) { return nybble_emu::f16_bits_to_f32(h.__x); }
