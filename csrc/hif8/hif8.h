// HiFloat8 (HiF8) codec: header-only, dependency-free C++17.
//
// Format reference: docs/hif8.md (bit layout, rounding).  This header is the single C++ source of the
// format: the CPU torch ops (csrc/ops/hif8_ops.cpp) and the Ascend C kernels include it, so the NPU code's
// core logic is exercised by the CPU test-suite.  Nothing here allocates, throws or touches the standard
// library beyond <cstdint>/<cstring>.
//
// Layout of a code (bit 7 = sign, a = code & 0x7F):
//   11 es e2 e1 e0 m0     |E| = 8 + e          1 mantissa bit     0x60-0x7F
//   10 es e1 e0 m1 m0     |E| = 4 + e          2 mantissa bits    0x40-0x5F
//   01 es e0 m2 m1 m0     |E| = 2 + e          3 mantissa bits    0x20-0x3F
//   001 es m2 m1 m0       |E| = 1              3 mantissa bits    0x10-0x1F
//   0001 m2 m1 m0          E  = 0              3 mantissa bits    0x08-0x0F
//   0000 m2 m1 m0         denormal 2^(M - 23), M = 1..7           0x01-0x07
// Specials: 0x00 zero, 0x80 NaN, 0x6F / 0xEF = +/-Inf (the slot of 1.5 * 2^15).
#pragma once

#include <cstdint>
#include <cstring>

#ifndef OSPFN_HD
#define OSPFN_HD  // host/device qualifier hook (e.g. __aicore__ for Ascend C); empty on the CPU
#endif

namespace ospfn {
namespace hif8 {

constexpr uint8_t kZero = 0x00;
constexpr uint8_t kNaN = 0x80;
constexpr uint8_t kPosInf = 0x6F;
constexpr uint8_t kNegInf = 0xEF;

// fp32 bit patterns of the encoding thresholds (magnitudes).
constexpr uint32_t kF32ExpMask = 0x7F800000u;   // +Inf
constexpr uint32_t kOverflowBits = 0x47200000u; // 40960 = 1.25 * 2^15: ties away from zero -> Inf
constexpr uint32_t kUnderflowBits = 0x34000000u; // 2^-23: below -> 0, at or above -> 2^-22

OSPFN_HD inline uint32_t f32_bits(float x) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof(b));
  return b;
}

OSPFN_HD inline float f32_from_bits(uint32_t b) {
  float x;
  std::memcpy(&x, &b, sizeof(x));
  return x;
}

// Number of mantissa bits HiF8 keeps in the binade [2^E, 2^(E+1)).
OSPFN_HD inline int mantissa_bits(int E) {
  const int ae = E < 0 ? -E : E;
  return ae <= 3 ? 3 : ae <= 7 ? 2 : ae <= 15 ? 1 : 0;
}

// The 7-bit magnitude code of the value 2^E * (1 + M / 2^m), E in [-22, 15], M < 2^mantissa_bits(E).
OSPFN_HD inline uint8_t magnitude_code(int E, uint32_t M) {
  if (E <= -16) return static_cast<uint8_t>(E + 23);  // denormal band: powers of two only
  const uint32_t es = E < 0 ? 1u : 0u;
  const uint32_t ae = static_cast<uint32_t>(E < 0 ? -E : E);
  if (ae >= 8) return static_cast<uint8_t>(0x60u | (es << 4) | ((ae - 8) << 1) | M);
  if (ae >= 4) return static_cast<uint8_t>(0x40u | (es << 4) | ((ae - 4) << 2) | M);
  if (ae >= 2) return static_cast<uint8_t>(0x20u | (es << 4) | ((ae - 2) << 3) | M);
  if (ae == 1) return static_cast<uint8_t>(0x10u | (es << 3) | M);
  return static_cast<uint8_t>(0x08u | M);
}

// Encode the magnitude |x| given as fp32 bits with the sign cleared (NaN excluded by the caller).
// Round to nearest, ties away from zero: only the bit right below the kept mantissa decides, so the
// result depends on the top 12 bits of the pattern (exponent + 4 mantissa bits) alone.
OSPFN_HD inline uint8_t encode_magnitude_bits(uint32_t a) {
  if (a >= kOverflowBits) return kPosInf;  // [40960, Inf]
  if (a < kUnderflowBits) return kZero;    // [0, 2^-23), fp32 subnormals included
  int E = static_cast<int>(a >> 23) - 127;
  if (E == -23) return 0x01;               // [2^-23, 2^-22) -> 2^-22
  const int m = mantissa_bits(E);
  const uint32_t sig = (a & 0x007FFFFFu) | 0x00800000u;  // 1.f as a 24-bit integer
  const int shift = 23 - m;
  uint32_t q = (sig >> shift) + ((sig >> (shift - 1)) & 1u);  // in [2^m, 2^(m+1)]
  if (q >> (m + 1)) {  // rounded up to the next power of two: exactly representable in binade E + 1
    E += 1;
    q = 1u << m;
  }
  return magnitude_code(E, q - (1u << m));
}

// fp32 bit pattern -> code.
OSPFN_HD inline uint8_t encode_bits(uint32_t b) {
  const uint32_t a = b & 0x7FFFFFFFu;
  if (a > kF32ExpMask) return kNaN;
  const uint8_t mag = encode_magnitude_bits(a);
  const uint8_t sign = (mag != kZero && (b >> 31)) ? 0x80 : 0x00;
  return static_cast<uint8_t>(mag | sign);
}

OSPFN_HD inline uint8_t encode(float x) { return encode_bits(f32_bits(x)); }

// Convert a double to float rounding toward zero.  Rounding toward zero preserves the side of every
// fp32-representable point (all HiF8 values and midpoints are), so encode(to_f32_rz(x)) is the correctly
// rounded HiF8 value of the double x; a round-to-nearest conversion would round twice.
OSPFN_HD inline float to_f32_rz(double x) {
  float f = static_cast<float>(x);
  const double af = f < 0 ? -static_cast<double>(f) : static_cast<double>(f);
  const double ax = x < 0 ? -x : x;
  if (af > ax) {  // rounded away from zero (Inf included): step one ulp back toward zero
    f = f32_from_bits(f32_bits(f) - 1u);
  }
  return f;
}

OSPFN_HD inline uint8_t encode(double x) { return encode(to_f32_rz(x)); }

// code -> fp32 bit pattern (exact; canonical quiet NaN 0x7FC00000 for 0x80).
OSPFN_HD inline uint32_t decode_bits(uint8_t c) {
  const uint32_t sign = static_cast<uint32_t>(c & 0x80u) << 24;
  const uint32_t a = c & 0x7Fu;
  if (a == 0) return sign ? 0x7FC00000u : 0u;  // 0x80 = NaN, 0x00 = +0
  if (a == kPosInf) return sign | kF32ExpMask;
  int E;
  int m;
  uint32_t M;
  if (a >= 0x60) {
    E = 8 + static_cast<int>((a >> 1) & 7u); m = 1; M = a & 1u;
    if (a & 0x10u) E = -E;
  } else if (a >= 0x40) {
    E = 4 + static_cast<int>((a >> 2) & 3u); m = 2; M = a & 3u;
    if (a & 0x10u) E = -E;
  } else if (a >= 0x20) {
    E = 2 + static_cast<int>((a >> 3) & 1u); m = 3; M = a & 7u;
    if (a & 0x10u) E = -E;
  } else if (a >= 0x10) {
    E = (a & 0x08u) ? -1 : 1; m = 3; M = a & 7u;
  } else if (a >= 0x08) {
    E = 0; m = 3; M = a & 7u;
  } else {
    E = static_cast<int>(a) - 23; m = 0; M = 0;  // denormal band
  }
  return sign | (static_cast<uint32_t>(E + 127) << 23) | (M << (23 - m));
}

OSPFN_HD inline float decode(uint8_t c) { return f32_from_bits(decode_bits(c)); }

// Nearest HiF8 value (fp32 in, fp32 out).
OSPFN_HD inline float round(float x) { return decode(encode(x)); }

// Table-driven fast path.  encode_magnitude_bits(a) depends only on a >> 19 (see above), so a 4096-entry
// table indexed by the top 12 bits of |x| encodes with one load.
struct EncodeTable {
  uint8_t mag[4096];
};

inline void fill_encode_table(EncodeTable& t) {
  for (uint32_t i = 0; i < 4096; ++i) t.mag[i] = encode_magnitude_bits(i << 19);
}

OSPFN_HD inline uint8_t encode_bits_table(const EncodeTable& t, uint32_t b) {
  const uint32_t a = b & 0x7FFFFFFFu;
  const uint8_t mag = t.mag[a >> 19];
  const uint8_t sign = (mag != kZero && (b >> 31)) ? 0x80 : 0x00;
  return a > kF32ExpMask ? kNaN : static_cast<uint8_t>(mag | sign);
}

}  // namespace hif8
}  // namespace ospfn
