// Counter-based Gumbel noise of the randomness contract (docs/design.md, reference.py):
// element (row r, column c) uses Philox4x32-10 with key (seed & 0xffffffff, seed >> 32) and
// counter (c >> 2, r & 0xffffffff, r >> 32, 0), takes output word c & 3,
// u = (2 * (word >> 9) + 1) * 2^-24 in (0, 1) and g = -log(-log(u)) in float32.
//
// One Philox call gives the four words of four consecutive columns, so the noise is made for
// groups of four columns, many counters at a time, in plain loops over uint32 arrays that GCC
// vectorises (the 32x32->64 bit products become vpmuludq).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "fast_math.h"

namespace rlgaf_fast {
namespace cpu {

constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

// Philox4x32-10 of the `count` counters (first_c0 + i, c1, c2, c3), i in [0, count), under the key
// of `seed`; word j of counter i goes to word[j][i].
// The 32-bit state is held in 64-bit lanes (always < 2^32): with uint32 lanes GCC widens every
// 32x32->64 product to a 64-bit multiply and then repacks the halves, which runs at half the
// speed of this form.
static inline void philox4x32_10(uint32_t first_c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                 uint64_t seed, int count, uint32_t* word0, uint32_t* word1,
                                 uint32_t* word2, uint32_t* word3) {
  const uint64_t low32 = 0xffffffffu;
  const uint64_t key0 = seed & low32;
  const uint64_t key1 = seed >> 32;
  for (int i = 0; i < count; ++i) {
    uint64_t x0 = (first_c0 + static_cast<uint32_t>(i)), x1 = c1, x2 = c2, x3 = c3;
    uint64_t k0 = key0, k1 = key1;
    for (int round = 0; round < kPhiloxRounds; ++round) {
      const uint64_t product_a = (x0 & low32) * kPhiloxRoundA;
      const uint64_t product_b = (x2 & low32) * kPhiloxRoundB;
      x0 = (product_b >> 32) ^ x1 ^ k0;
      x2 = (product_a >> 32) ^ x3 ^ k1;
      x1 = product_b & low32;
      x3 = product_a & low32;
      k0 = (k0 + kPhiloxKeyA) & low32;
      k1 = (k1 + kPhiloxKeyB) & low32;
    }
    word0[i] = static_cast<uint32_t>(x0);
    word1[i] = static_cast<uint32_t>(x1);
    word2[i] = static_cast<uint32_t>(x2);
    word3[i] = static_cast<uint32_t>(x3);
  }
}

// The uniform sample in (0, 1) of one Philox word: exact in float32.
static inline float philox_uniform(uint32_t word) {
  return static_cast<float>(static_cast<int32_t>((word >> 9) * 2u + 1u)) * 0x1p-24f;
}

constexpr int kNoiseCounters = 64;  // Philox counters per batch: 256 columns, kept in L1

// Philox words of row `row` for columns [col_begin, col_begin + count), col_begin a multiple of
// 4, in batches of at most kNoiseCounters counters: emit(start, n, word) gets the words of
// columns col_begin + start + [0, 4 n), word[j][i] for column start + 4 i + j.
template <typename Emit>
static inline void philox_row_batches(uint64_t seed, int64_t row, int64_t col_begin,
                                      int64_t count, Emit&& emit) {
  uint32_t word[4][kNoiseCounters];
  const uint32_t row_lo = static_cast<uint32_t>(row);
  const uint32_t row_hi = static_cast<uint32_t>(static_cast<uint64_t>(row) >> 32);
  for (int64_t start = 0; start < count; start += 4 * kNoiseCounters) {
    const int n = static_cast<int>(std::min<int64_t>(kNoiseCounters, (count - start + 3) / 4));
    const uint32_t first_c0 = static_cast<uint32_t>((col_begin + start) >> 2);
    philox4x32_10(first_c0, row_lo, row_hi, 0u, seed, n, word[0], word[1], word[2], word[3]);
    emit(start, n, word);
  }
}

// Gumbel noise of row `row`, columns [col_begin, col_begin + count), into g[0, count) and, when
// count is not a multiple of 4, up to g[round_up(count, 4)) (the rest of the last group: g must
// have room for it). col_begin must be a multiple of 4. Uses fast_logf: within ~1e-6 of the
// reference's float32 noise.
static inline void gumbel_noise(uint64_t seed, int64_t row, int64_t col_begin, int64_t count,
                                float* g) {
  philox_row_batches(seed, row, col_begin, count,
                     [g](int64_t start, int n, const uint32_t (&word)[4][kNoiseCounters]) {
    float noise[4][kNoiseCounters];
    for (int j = 0; j < 4; ++j) {
      for (int i = 0; i < n; ++i) {
        noise[j][i] = -fast_logf(-fast_logf(philox_uniform(word[j][i])));
      }
    }
    float* out = g + start;
    for (int i = 0; i < n; ++i) {
      out[4 * i + 0] = noise[0][i];
      out[4 * i + 1] = noise[1][i];
      out[4 * i + 2] = noise[2][i];
      out[4 * i + 3] = noise[3][i];
    }
  });
}

// gumbel_noise with the logarithms taken in double and rounded to float at the same two points
// as the reference's float32 -log(-log(u)): bit-identical to it wherever torch's float32 log is
// correctly rounded. Slow; used by the float64 kernels, where exactness matters more than speed.
static inline void gumbel_noise_accurate(uint64_t seed, int64_t row, int64_t col_begin,
                                         int64_t count, float* g) {
  philox_row_batches(seed, row, col_begin, count,
                     [g](int64_t start, int n, const uint32_t (&word)[4][kNoiseCounters]) {
    for (int i = 0; i < n; ++i) {
      for (int j = 0; j < 4; ++j) {
        const double u = philox_uniform(word[j][i]);
        const float minus_log_u = static_cast<float>(-std::log(u));
        g[start + 4 * i + j] = static_cast<float>(-std::log(static_cast<double>(minus_log_u)));
      }
    }
  });
}

}  // namespace cpu
}  // namespace rlgaf_fast
