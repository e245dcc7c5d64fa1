// __nv_bfloat16 for the CPU emulator: the storage type and CUDA's conversions, bit-exact
// (round to nearest even; NaN to the canonical 0x7fff, as CUDA's __float2bfloat16_rn).
#pragma once

#include "nybble_emu_runtime.h"

namespace nybble_emu {

inline std::uint16_t f32_to_bf16_bits(float f) {
    std::uint32_t x;
    std::memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
    return static_cast<std::uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);  // overflow -> Inf
}

inline float bf16_bits_to_f32(std::uint16_t b) {
    const std::uint32_t x = static_cast<std::uint32_t>(b) << 16;
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}

}  // namespace nybble_emu

struct __nv_bfloat16 {
    std::uint16_t __x;
    __nv_bfloat16() = default;
    __nv_bfloat16(float f) : __x(nybble_emu::f32_to_bf16_bits(f)) {}
    operator float() const { return nybble_emu::bf16_bits_to_f32(__x); }
};
static_assert(sizeof(__nv_bfloat16) == 2 && std::is_trivially_copyable_v<__nv_bfloat16>);

inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short bits) {
    __nv_bfloat16 b;
    b.__x = bits;
    return b;
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __ushort_as_bfloat16(nybble_emu::f32_to_bf16_bits(f)); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return nybble_emu::bf16_bits_to_f32(b.__x); }
