// Fast float32 exp and log for the CPU kernels, written so that GCC auto-vectorises loops that
// call them (-O3 -march=native): straight-line arithmetic, bit casts through memcpy, selects
// written as ?: (which become blends), no calls, no branches, no -ffast-math needed.
//
// Accuracy: a few float ulp (relative error about 1e-7). The polynomial coefficients were fitted
// for this file (relative-error least squares, reweighted towards minimax) on the reduced
// ranges below.
//
// The reductions over arrays are `#pragma omp simd reduction` loops: that pragma (-fopenmp or
// -fopenmp-simd) is what allows GCC to vectorise a float sum or maximum without -ffast-math;
// without it they still compute the right thing, one element at a time.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace rlgaf_fast {
namespace cpu {

constexpr float kLn2Hi = 0.693145751953125f;  // ln 2 with its low bits cleared: n * kLn2Hi is exact
constexpr float kLn2Lo = 1.428606765330187e-06f;  // ln 2 - kLn2Hi
constexpr float kLog2E = 1.4426950216293335f;

static inline uint32_t float_bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
}

static inline float bits_float(uint32_t bits) {
  float x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
}

// Natural logarithm of a positive, normal, finite float (not for 0, denormals, inf, NaN or
// negative numbers: the callers only pass such values). Relative error < 2e-7.
static inline float fast_logf(float x) {
  // x = 2^e * m with m in [sqrt(1/2), sqrt(2)), so that f = m - 1 is small on both sides of 0
  // and exact; subtracting the bits of sqrt(1/2) moves that interval onto one binade.
  const uint32_t sqrt_half_bits = 0x3f3504f3u;
  const uint32_t shifted = float_bits(x) - sqrt_half_bits;
  const float e = static_cast<float>(static_cast<int32_t>(shifted) >> 23);
  const float f = bits_float((shifted & 0x007fffffu) + sqrt_half_bits) - 1.0f;
  // log1p(f) = f - f^2/2 + f^3 * p(f) on [sqrt(1/2) - 1, sqrt(2) - 1]; p in Estrin's form,
  // whose shorter dependency chains run faster than Horner's rule here.
  const float f2 = f * f;
  const float f4 = f2 * f2;
  const float p01 = 0.3333390951156616f - 0.2500133812427521f * f;
  const float p23 = 0.19963061809539795f - 0.1657758504152298f * f;
  const float p45 = 0.1491478830575943f - 0.1426747888326645f * f;
  const float p6 = 0.08700361847877502f;
  const float p = (p01 + f2 * p23) + f4 * (p45 + f2 * p6);
  const float log1p_f = f + f2 * (f * p - 0.5f);
  return e * kLn2Hi + (log1p_f + e * kLn2Lo);
}

// exp(x) for x <= 88: what softmax needs (arguments z - max <= 0). -inf gives exactly 0; results
// below 2^-124 (x < -86, about 4e-38) are flushed to 0 so that no denormal is ever produced;
// NaN gives NaN. Relative error < 2e-7.
static inline float fast_expf(float x) {
  const float lowest = -86.0f;
  const float clamped = x < lowest ? lowest : x;  // keeps NaN, unlike fmaxf
  // n = round(x / ln 2): adding 1.5 * 2^23 rounds to an integer held in the low mantissa bits.
  const float round_magic = 12582912.0f;
  const float shifted = clamped * kLog2E + round_magic;
  const int32_t n = static_cast<int32_t>(float_bits(shifted) - float_bits(round_magic));
  const float nf = shifted - round_magic;
  const float r = (clamped - nf * kLn2Hi) - nf * kLn2Lo;  // |r| <= ln(2) / 2
  // exp(r) = 1 + r + r^2 * q(r)
  float q = 0.0013814611593261361f;
  q = q * r + 0.008368710055947304f;
  q = q * r + 0.04166838899254799f;
  q = q * r + 0.1666652113199234f;
  q = q * r + 0.4999999403953552f;
  const float exp_r = 1.0f + (r + r * r * q);
  const float two_to_n = bits_float(static_cast<uint32_t>(n + 127) << 23);
  const float y = exp_r * two_to_n;
  return x < lowest ? 0.0f : y;
}

// x[i] = exp(x[i] - shift) in place (x[i] - shift <= 88), returns the sum of the new values.
// Float sums of blocks of 256 values are added up in double, so that the sum stays accurate also
// where the loop is not vectorised into partial sums (no OpenMP). Summing every value in double
// instead would halve the vector width of the whole loop.
static inline float exp_shift_sum(float* x, int64_t n, float shift) {
  double total = 0.0;
  for (int64_t begin = 0; begin < n; begin += 256) {
    const int64_t end = std::min<int64_t>(n, begin + 256);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = begin; i < end; ++i) {
      x[i] = fast_expf(x[i] - shift);
      sum += x[i];
    }
    total += sum;
  }
  return static_cast<float>(total);
}

}  // namespace cpu
}  // namespace rlgaf_fast
