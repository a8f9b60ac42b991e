// Portable float bit casts and IEEE binary16 / bfloat16 <-> float conversions on raw 16-bit values, for
// code shared by CPU and CUDA kernels (SF_HD): the scalar paths of the CPU kernels and the tails of
// their SIMD paths, GPTQ scale loads on both devices, the binary kernels' sign flips. Torch- and
// CUDA-free. 16 bits -> float is exact (subnormals, inf and NaN included); float -> 16 bits rounds to
// nearest even (overflow to inf, subnormals, NaN kept and quiet), as the hardware conversions do.
//
// CPU kernels with `#pragma GCC target` regions include this before their region (from their
// prelude), so that no AVX copy of these inline functions can be the one the linker keeps.
#pragma once
#include <math.h>
#include <stdint.h>

#include "common/hostdev.h"

namespace slimformer {

SF_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  union {
    float f;
    uint32_t u;
  } c{f};
  return c.u;
#endif
}

SF_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  union {
    uint32_t u;
    float f;
  } c{u};
  return c.f;
#endif
}

// IEEE binary16 bits -> float.
SF_HD float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t out;
  if (exp == 0x1fu) {
    out = sign | 0x7f800000u | (man << 13);  // inf / nan
  } else if (exp != 0) {
    out = sign | ((exp + 112u) << 23) | (man << 13);  // normal: rebias 15 -> 127
  } else if (man == 0) {
    out = sign;  // +-0
  } else {  // subnormal half: normalise
    exp = 113u;
    while ((man & 0x400u) == 0) {
      man <<= 1;
      --exp;
    }
    out = sign | (exp << 23) | ((man & 0x3ffu) << 13);
  }
  union {
    uint32_t u;
    float f;
  } cvt{out};
  return cvt.f;
}

SF_HD float bf16_bits_to_float(uint16_t b) {
  union {
    uint32_t u;
    float f;
  } cvt{static_cast<uint32_t>(b) << 16};
  return cvt.f;
}

// float -> binary16 bits, round to nearest even.
SF_HD uint16_t float_to_half_bits(float f) {
  uint32_t x = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  x &= 0x7FFFFFFFu;
  if (x >= 0x7F800000u) return sign | 0x7C00u | (x > 0x7F800000u ? 0x200u | ((x >> 13) & 0x3FFu) : 0u);
  if (x >= 0x477FF000u) return sign | 0x7C00u;  // >= 65520: rounds to inf
  if (x < 0x38800000u) {                        // below 2^-14: a subnormal (or 0) of binary16
    return sign | static_cast<uint16_t>(nearbyintf(bits_float(x) * 16777216.0f));  // exact scale; RNE
  }
  x += 0xC8000FFFu + ((x >> 13) & 1u);  // rebias the exponent (-112 << 23) and round to nearest even
  return sign | static_cast<uint16_t>(x >> 13);
}

// float -> bfloat16 bits, round to nearest even.
SF_HD uint16_t float_to_bf16_bits(float f) {
  const uint32_t x = float_bits(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);
  return static_cast<uint16_t>((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

}  // namespace slimformer
