// CUDA kernels of the Gumbel-Softmax family, registered as torch.ops.rlgaf_fast_cuda.*.
//
// Kernel contract: see docs/design.md and the op layer (rlgaf_fast/ops/). Inputs arrive 2-D and
// contiguous; arithmetic is float32 (float64 for float64 logits); the Gumbel noise of element
// (row r, column c) is Philox4x32-10 keyed by the seed with counter (c >> 2, r_lo, r_hi, 0),
// word c & 3, exactly as rlgaf_fast/reference.py. One Philox call gives the noise of four
// consecutive columns, so every kernel works on groups of four columns that start at a multiple
// of four.
//
// This is the second GPU path (Triton is the first): plain, obviously correct kernels.
//   - softmax forward / backward: one block per row, online max and sum in a first sweep,
//     output in a second sweep that regenerates the noise instead of storing it;
//   - embedding forward: per-row max / logsumexp / argmax first, then a tiled kernel that
//     accumulates exp(z - lse) * weight over the vocabulary; no [N, V] buffer is written;
//   - embedding backward: one tiled kernel for grad_logits, one for grad_weight, both
//     regenerating the probabilities from the seed and lse.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../error_format.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <initializer_list>
#include <tuple>
#include <type_traits>
#include <utility>

// A CUDA build of torch ships c10/cuda (current stream, device guard). A CPU build's headers lack
// its generated cuda_cmake_macros.h; there the file still compiles (for checking only) against
// the device of the tensor set by hand and the legacy default stream.
#if __has_include(<c10/cuda/impl/cuda_cmake_macros.h>) && __has_include(<c10/cuda/CUDAStream.h>)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define RLGAF_HAVE_C10_CUDA 1
#else
#define RLGAF_HAVE_C10_CUDA 0
#endif

namespace rlgaf_fast_cuda {
namespace {

using at::Tensor;
using rlgaf_fast::device_str;
using rlgaf_fast::num_str;
using rlgaf_fast::shape_str;

// ------------------------------------------------------------------------------------------------
// Philox4x32-10 and the Gumbel noise of one group of four columns.

constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

// High word of the 64-bit product (compiles to mul.hi on the device; host-callable for checks).
__host__ __device__ __forceinline__ uint32_t mul_hi(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

// Natural log of a positive float, within about 2 ulp whatever the nvcc flags: --use_fast_math
// (which setup.py does not pass, but a user's build may) turns logf into lg2.approx, whose
// absolute error makes -log(u) for u near 1 (the large Gumbel values that decide the argmax)
// and its log wrong by far more than the ~1e-6 the randomness contract allows. log1pf and
// frexpf are not remapped, and m - 1 is exact for m in [0.5, 2], so
// log(m * 2^e) = e * ln2 + log1pf(m - 1) is accurate; ln2 is split so that e * kLn2Hi is exact.
__host__ __device__ __forceinline__ float accurate_logf(float x) {
  constexpr float kLn2Hi = 0.693145751953125f;       // 16 significant bits
  constexpr float kLn2Lo = 1.42860682030941723e-06f;  // ln 2 - kLn2Hi
  int e = 0;
  float m = frexpf(x, &e);  // x = m * 2^e, m in [0.5, 1)
  if (m < 0.70710678f) {
    m *= 2.0f;
    e -= 1;
  }
  const float ef = static_cast<float>(e);
  return ef * kLn2Hi + (ef * kLn2Lo + log1pf(m - 1.0f));
}

// Noise of columns 4 * group .. 4 * group + 3 of `row`: g[j] = -log(-log(u_j)) in float32.
__host__ __device__ __forceinline__ void gumbel4(uint32_t k0, uint32_t k1, uint64_t row,
                                                 uint32_t group, float g[4]) {
  uint32_t c0 = group;
  uint32_t c1 = static_cast<uint32_t>(row);
  uint32_t c2 = static_cast<uint32_t>(row >> 32);
  uint32_t c3 = 0u;
#pragma unroll
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint32_t hi_a = mul_hi(kPhiloxRoundA, c0);
    const uint32_t lo_a = kPhiloxRoundA * c0;
    const uint32_t hi_b = mul_hi(kPhiloxRoundB, c2);
    const uint32_t lo_b = kPhiloxRoundB * c2;
    const uint32_t n0 = hi_b ^ c1 ^ k0;
    const uint32_t n2 = hi_a ^ c3 ^ k1;
    c0 = n0;
    c1 = lo_b;
    c2 = n2;
    c3 = lo_a;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  const uint32_t words[4] = {c0, c1, c2, c3};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    // (2 * (w >> 9) + 1) < 2^24 is exact in float32; u lies strictly inside (0, 1).
    const float u = static_cast<float>((words[j] >> 9) * 2u + 1u) * 5.9604644775390625e-08f;
    g[j] = -accurate_logf(-accurate_logf(u));
  }
}

// ------------------------------------------------------------------------------------------------
// Small numeric helpers.

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using acc_of_t = typename AccOf<T>::type;

__host__ __device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__host__ __device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__host__ __device__ __forceinline__ float log_acc(float x) { return accurate_logf(x); }
__host__ __device__ __forceinline__ double log_acc(double x) { return log(x); }

// Correctly rounded division also under --use_fast_math (which makes float '/' approximate).
__device__ __forceinline__ float div_acc(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_acc(double a, double b) { return a / b; }

template <typename acc_t>
__host__ __device__ __forceinline__ acc_t neg_inf() {
  return -static_cast<acc_t>(INFINITY);
}

// z = (x + g) / tau in the compute type (g is float32, cast as the reference does).
template <typename acc_t>
__device__ __forceinline__ acc_t perturbed(acc_t x, float g, acc_t tau) {
  return div_acc(x + static_cast<acc_t>(g), tau);
}

// Four consecutive elements, loaded or stored as one aligned vector when the caller allows it.
template <typename T>
struct alignas(4 * sizeof(T)) Pack4 {
  T v[4];
};

// Loads columns col .. col + 3 of `row_ptr` (those < V; the others get `fill`).
template <typename T, typename acc_t>
__device__ __forceinline__ void load4(const T* row_ptr, int64_t col, int64_t V, bool vec,
                                      acc_t fill, acc_t out[4]) {
  if (vec) {
    const Pack4<T> p = *reinterpret_cast<const Pack4<T>*>(row_ptr + col);
#pragma unroll
    for (int j = 0; j < 4; ++j) out[j] = static_cast<acc_t>(p.v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) out[j] = col + j < V ? static_cast<acc_t>(row_ptr[col + j]) : fill;
  }
}

template <typename T, typename acc_t>
__device__ __forceinline__ void store4(T* row_ptr, int64_t col, int64_t V, bool vec,
                                       const acc_t val[4]) {
  if (vec) {
    Pack4<T> p;
#pragma unroll
    for (int j = 0; j < 4; ++j) p.v[j] = static_cast<T>(val[j]);
    *reinterpret_cast<Pack4<T>*>(row_ptr + col) = p;
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (col + j < V) row_ptr[col + j] = static_cast<T>(val[j]);
    }
  }
}

// z of columns 4 * group .. + 3 of `row` (columns >= V get -inf).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void perturbed4(const scalar_t* row_ptr, int64_t row, int64_t group,
                                           int64_t V, bool vec, acc_t tau, uint32_t k0,
                                           uint32_t k1, acc_t z[4]) {
  acc_t x[4];
  load4<scalar_t, acc_t>(row_ptr, 4 * group, V, vec, neg_inf<acc_t>(), x);
  float g[4];
  gumbel4(k0, k1, static_cast<uint64_t>(row), static_cast<uint32_t>(group), g);
#pragma unroll
  for (int j = 0; j < 4; ++j) z[j] = perturbed(x[j], g[j], tau);
}

// ------------------------------------------------------------------------------------------------
// Per-row state of the first sweep: online max m and sum s = sum exp(z - m), the weighted sum
// t = sum grad_y * exp(z - m) (backward from logits), and the argmax (first on ties; NaN wins,
// as torch.argmax).

template <typename acc_t>
struct RowState {
  acc_t m;
  acc_t s;
  acc_t t;
  acc_t best;
  long long index;
};

template <typename acc_t>
__host__ __device__ __forceinline__ RowState<acc_t> empty_state() {
  RowState<acc_t> st;
  st.m = neg_inf<acc_t>();
  st.s = 0;
  st.t = 0;
  st.best = neg_inf<acc_t>();
  st.index = LLONG_MAX;
  return st;
}

template <typename acc_t>
__host__ __device__ __forceinline__ bool beats(acc_t v, long long i, acc_t best, long long best_i) {
  if (isnan(v)) return !isnan(best) || i < best_i;
  if (isnan(best)) return false;
  return v > best || (v == best && i < best_i);
}

template <typename acc_t>
__host__ __device__ __forceinline__ void push(RowState<acc_t>& st, acc_t z, acc_t grad, long long col) {
  if (beats(z, col, st.best, st.index)) {
    st.best = z;
    st.index = col;
  }
  if (z == neg_inf<acc_t>()) return;  // contributes nothing, and exp(-inf - -inf) would be NaN
  if (z > st.m) {
    const acc_t scale = exp_acc(st.m - z);
    st.s = st.s * scale + 1;
    st.t = st.t * scale + grad;
    st.m = z;
  } else {
    const acc_t e = exp_acc(z - st.m);
    st.s += e;
    st.t += grad * e;
  }
}

// Commutative, so every lane of a butterfly reduction ends with the same bits.
template <typename acc_t>
__host__ __device__ __forceinline__ RowState<acc_t> combine(const RowState<acc_t>& a,
                                                            const RowState<acc_t>& b) {
  RowState<acc_t> r;
  r.m = a.m > b.m ? a.m : b.m;
  if (r.m == neg_inf<acc_t>()) {
    r.s = 0;
    r.t = 0;
  } else {
    const acc_t ea = exp_acc(a.m - r.m);
    const acc_t eb = exp_acc(b.m - r.m);
    r.s = a.s * ea + b.s * eb;
    r.t = a.t * ea + b.t * eb;
  }
  const bool take_b = beats(b.best, b.index, a.best, a.index);
  r.best = take_b ? b.best : a.best;
  r.index = take_b ? b.index : a.index;
  return r;
}

template <typename acc_t>
__device__ __forceinline__ RowState<acc_t> shfl_xor_state(const RowState<acc_t>& a, int mask) {
  RowState<acc_t> r;
  r.m = __shfl_xor_sync(0xffffffffu, a.m, mask);
  r.s = __shfl_xor_sync(0xffffffffu, a.s, mask);
  r.t = __shfl_xor_sync(0xffffffffu, a.t, mask);
  r.best = __shfl_xor_sync(0xffffffffu, a.best, mask);
  r.index = __shfl_xor_sync(0xffffffffu, a.index, mask);
  return r;
}

// Block-wide reduction; blockDim.x must be a multiple of 32 (at most 1024). Every thread gets
// the result: each warp reduces the per-warp partials itself, which saves a broadcast.
template <typename acc_t>
__device__ RowState<acc_t> block_reduce_state(RowState<acc_t> st) {
  __shared__ RowState<acc_t> partials[32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) st = combine(st, shfl_xor_state(st, offset));
  __syncthreads();  // an earlier call's readers are done with `partials`
  if (lane == 0) partials[warp] = st;
  __syncthreads();
  st = lane < warps ? partials[lane] : empty_state<acc_t>();
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) st = combine(st, shfl_xor_state(st, offset));
  return st;
}

template <typename acc_t>
__device__ acc_t block_reduce_sum(acc_t v) {
  __shared__ acc_t partials[32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  __syncthreads();
  if (lane == 0) partials[warp] = v;
  __syncthreads();
  v = lane < warps ? partials[lane] : acc_t(0);
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// First sweep over one row, done by the whole block: m, s, argmax and, when grad_row is not
// null, t = sum grad * exp(z - m).
template <typename scalar_t, typename acc_t>
__device__ RowState<acc_t> row_state(const scalar_t* row_ptr, const scalar_t* grad_row,
                                     int64_t row, int64_t V, bool vec, acc_t tau, uint32_t k0,
                                     uint32_t k1) {
  RowState<acc_t> st = empty_state<acc_t>();
  const int64_t groups = (V + 3) / 4;
  for (int64_t group = threadIdx.x; group < groups; group += blockDim.x) {
    acc_t z[4];
    perturbed4<scalar_t, acc_t>(row_ptr, row, group, V, vec, tau, k0, k1, z);
    acc_t grad[4] = {0, 0, 0, 0};
    if (grad_row != nullptr) load4<scalar_t, acc_t>(grad_row, 4 * group, V, vec, acc_t(0), grad);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (4 * group + j < V) push(st, z[j], grad[j], 4 * group + j);
    }
  }
  return block_reduce_state(st);
}

// ------------------------------------------------------------------------------------------------
// Softmax kernels: one block per row (grid-stride over rows).

template <typename scalar_t, typename acc_t>
__global__ void gumbel_softmax_fwd_kernel(const scalar_t* __restrict__ logits,
                                          scalar_t* __restrict__ y, int64_t* __restrict__ index,
                                          int64_t N, int64_t V, acc_t tau, bool hard, uint32_t k0,
                                          uint32_t k1, bool vec) {
  const int64_t groups = (V + 3) / 4;
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const scalar_t* x_row = logits + row * V;
    scalar_t* y_row = y + row * V;
    const RowState<acc_t> st = row_state<scalar_t, acc_t>(x_row, nullptr, row, V, vec, tau, k0, k1);
    // softmax(z) is NaN, as torch computes it, where the row holds a NaN (which wins the argmax)
    // or its largest score is infinite (inf - inf, or a row of -inf); the reference's hard
    // sample (one-hot - soft + soft) is then NaN too
    const bool nan_row = isnan(st.best) || isinf(st.m);
    for (int64_t group = threadIdx.x; group < groups; group += blockDim.x) {
      acc_t out[4];
      if (hard) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          out[j] = nan_row ? static_cast<acc_t>(NAN)
                           : (4 * group + j == st.index ? acc_t(1) : acc_t(0));
        }
      } else {
        acc_t z[4];
        perturbed4<scalar_t, acc_t>(x_row, row, group, V, vec, tau, k0, k1, z);
#pragma unroll
        for (int j = 0; j < 4; ++j) out[j] = div_acc(exp_acc(z[j] - st.m), st.s);
      }
      store4<scalar_t, acc_t>(y_row, 4 * group, V, vec, out);
    }
    if (threadIdx.x == 0) index[row] = st.index;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void gumbel_softmax_bwd_kernel(const scalar_t* __restrict__ grad_y,
                                          const scalar_t* __restrict__ y,
                                          scalar_t* __restrict__ grad_logits, int64_t N, int64_t V,
                                          acc_t tau, bool vec) {
  const int64_t groups = (V + 3) / 4;
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const scalar_t* gy_row = grad_y + row * V;
    const scalar_t* y_row = y + row * V;
    acc_t dot = 0;
    for (int64_t group = threadIdx.x; group < groups; group += blockDim.x) {
      acc_t gy[4], yv[4];
      load4<scalar_t, acc_t>(gy_row, 4 * group, V, vec, acc_t(0), gy);
      load4<scalar_t, acc_t>(y_row, 4 * group, V, vec, acc_t(0), yv);
#pragma unroll
      for (int j = 0; j < 4; ++j) dot += gy[j] * yv[j];
    }
    dot = block_reduce_sum(dot);
    for (int64_t group = threadIdx.x; group < groups; group += blockDim.x) {
      acc_t gy[4], yv[4], out[4];
      load4<scalar_t, acc_t>(gy_row, 4 * group, V, vec, acc_t(0), gy);
      load4<scalar_t, acc_t>(y_row, 4 * group, V, vec, acc_t(0), yv);
#pragma unroll
      for (int j = 0; j < 4; ++j) out[j] = div_acc(yv[j] * (gy[j] - dot), tau);
      store4<scalar_t, acc_t>(grad_logits + row * V, 4 * group, V, vec, out);
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void gumbel_softmax_bwd_from_logits_kernel(const scalar_t* __restrict__ grad_y,
                                                      const scalar_t* __restrict__ logits,
                                                      scalar_t* __restrict__ grad_logits,
                                                      int64_t N, int64_t V, acc_t tau,
                                                      uint32_t k0, uint32_t k1, bool vec) {
  const int64_t groups = (V + 3) / 4;
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const scalar_t* x_row = logits + row * V;
    const scalar_t* gy_row = grad_y + row * V;
    const RowState<acc_t> st = row_state<scalar_t, acc_t>(x_row, gy_row, row, V, vec, tau, k0, k1);
    const acc_t dot = div_acc(st.t, st.s);  // sum_v grad_y * y
    for (int64_t group = threadIdx.x; group < groups; group += blockDim.x) {
      acc_t z[4], gy[4], out[4];
      perturbed4<scalar_t, acc_t>(x_row, row, group, V, vec, tau, k0, k1, z);
      load4<scalar_t, acc_t>(gy_row, 4 * group, V, vec, acc_t(0), gy);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const acc_t yv = div_acc(exp_acc(z[j] - st.m), st.s);
        out[j] = div_acc(yv * (gy[j] - dot), tau);
      }
      store4<scalar_t, acc_t>(grad_logits + row * V, 4 * group, V, vec, out);
    }
  }
}

// Per-row argmax and logsumexp of z (first step of the embedding forward).
template <typename scalar_t, typename acc_t>
__global__ void gumbel_row_stats_kernel(const scalar_t* __restrict__ logits,
                                        int64_t* __restrict__ tokens, acc_t* __restrict__ lse,
                                        int64_t N, int64_t V, acc_t tau, uint32_t k0, uint32_t k1,
                                        bool vec) {
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const RowState<acc_t> st =
        row_state<scalar_t, acc_t>(logits + row * V, nullptr, row, V, vec, tau, k0, k1);
    if (threadIdx.x == 0) {
      tokens[row] = st.index;
      lse[row] = st.m + log_acc(st.s);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Embedding kernels. 256 threads; tiles in shared memory; probabilities p = exp(z - lse)
// regenerated from the seed. acc_t: softmax arithmetic (from the logits); sum_t: accumulation of
// the products (float32, float64 if logits or weight are float64).

constexpr int kTileThreads = 256;

// out[n, d] = sum_v p[n, v] * weight[v, d]. Block: kRows rows x kCols columns of out; loops over
// the vocabulary in chunks of kVocab. Thread: column d = tid % kCols, rows tid / kCols + 4 k.
template <typename scalar_t, typename weight_t, typename acc_t, typename sum_t>
__global__ void __launch_bounds__(kTileThreads)
    gumbel_embedding_fwd_kernel(const scalar_t* __restrict__ logits,
                                const weight_t* __restrict__ weight,
                                const acc_t* __restrict__ lse, sum_t* __restrict__ out,
                                int64_t N, int64_t V, int64_t D, acc_t tau, uint32_t k0,
                                uint32_t k1) {
  constexpr int kRows = 16, kVocab = 32, kCols = 64;
  constexpr int kRowsPerThread = kRows * kCols / kTileThreads;  // 4
  constexpr int kRowStride = kTileThreads / kCols;              // 4
  __shared__ sum_t p_tile[kRows][kVocab];
  __shared__ sum_t w_tile[kVocab][kCols];
  const int tid = threadIdx.x;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * kCols;
  const int d = tid % kCols;
  const int r_first = tid / kCols;
  sum_t acc[kRowsPerThread];
#pragma unroll
  for (int k = 0; k < kRowsPerThread; ++k) acc[k] = 0;

  for (int64_t v0 = 0; v0 < V; v0 += kVocab) {
    // Probabilities: kRows * kVocab / 4 = 128 groups of four columns, one per thread.
    if (tid < kRows * kVocab / 4) {
      const int r = tid / (kVocab / 4);
      const int gi = tid % (kVocab / 4);
      const int64_t n = row0 + r;
      const int64_t v = v0 + 4 * gi;
      acc_t p[4] = {0, 0, 0, 0};
      if (n < N && v < V) {
        acc_t z[4];
        perturbed4<scalar_t, acc_t>(logits + n * V, n, v / 4, V, false, tau, k0, k1, z);
        const acc_t row_lse = lse[n];
#pragma unroll
        for (int j = 0; j < 4; ++j) p[j] = v + j < V ? exp_acc(z[j] - row_lse) : acc_t(0);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) p_tile[r][4 * gi + j] = static_cast<sum_t>(p[j]);
    }
    for (int i = tid; i < kVocab * kCols; i += kTileThreads) {
      const int vv = i / kCols;
      const int dd = i % kCols;
      const int64_t v = v0 + vv;
      const int64_t c = col0 + dd;
      w_tile[vv][dd] = v < V && c < D ? static_cast<sum_t>(weight[v * D + c]) : sum_t(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int vv = 0; vv < kVocab; ++vv) {
      const sum_t w = w_tile[vv][d];
#pragma unroll
      for (int k = 0; k < kRowsPerThread; ++k) acc[k] += p_tile[r_first + kRowStride * k][vv] * w;
    }
    __syncthreads();
  }
  const int64_t c = col0 + d;
#pragma unroll
  for (int k = 0; k < kRowsPerThread; ++k) {
    const int64_t n = row0 + r_first + kRowStride * k;
    if (n < N && c < D) out[n * D + c] = acc[k];
  }
}

// grad_logits[n, v] = p[n, v] * (grad_out[n] . weight[v] - row_dot[n]) / tau, with
// row_dot[n] = grad_out[n] . out[n]. Block: kRows rows x kVocab vocabulary entries; loops over D
// in chunks of kDepth. Thread: row tid / 16, columns 4 * (tid % 16) .. + 3 (one Philox call).
template <typename scalar_t, typename weight_t, typename acc_t, typename sum_t>
__global__ void __launch_bounds__(kTileThreads)
    gumbel_embedding_bwd_logits_kernel(const weight_t* __restrict__ grad_out,
                                       const scalar_t* __restrict__ logits,
                                       const weight_t* __restrict__ weight,
                                       const acc_t* __restrict__ lse,
                                       const sum_t* __restrict__ row_dot,
                                       scalar_t* __restrict__ grad_logits, int64_t N, int64_t V,
                                       int64_t D, acc_t tau, uint32_t k0, uint32_t k1) {
  constexpr int kRows = 16, kVocab = 64, kDepth = 32;
  constexpr int kGroupsPerRow = kVocab / 4;  // 16
  static_assert(kRows * kGroupsPerRow == kTileThreads, "one thread per (row, group)");
  __shared__ sum_t g_tile[kRows][kDepth];
  __shared__ sum_t w_tile[kVocab][kDepth + 1];  // +1: threads read columns 4 apart
  const int tid = threadIdx.x;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t v_first = static_cast<int64_t>(blockIdx.y) * kVocab;
  const int r = tid / kGroupsPerRow;
  const int gi = tid % kGroupsPerRow;
  sum_t dy[4] = {0, 0, 0, 0};

  for (int64_t d0 = 0; d0 < D; d0 += kDepth) {
    for (int i = tid; i < kRows * kDepth; i += kTileThreads) {
      const int rr = i / kDepth;
      const int dd = i % kDepth;
      const int64_t n = row0 + rr;
      const int64_t c = d0 + dd;
      g_tile[rr][dd] = n < N && c < D ? static_cast<sum_t>(grad_out[n * D + c]) : sum_t(0);
    }
    for (int i = tid; i < kVocab * kDepth; i += kTileThreads) {
      const int vv = i / kDepth;
      const int dd = i % kDepth;
      const int64_t v = v_first + vv;
      const int64_t c = d0 + dd;
      w_tile[vv][dd] = v < V && c < D ? static_cast<sum_t>(weight[v * D + c]) : sum_t(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int dd = 0; dd < kDepth; ++dd) {
      const sum_t g = g_tile[r][dd];
#pragma unroll
      for (int j = 0; j < 4; ++j) dy[j] += g * w_tile[4 * gi + j][dd];
    }
    __syncthreads();
  }

  const int64_t n = row0 + r;
  const int64_t v = v_first + 4 * gi;
  if (n < N && v < V) {
    acc_t z[4], out[4];
    perturbed4<scalar_t, acc_t>(logits + n * V, n, v / 4, V, false, tau, k0, k1, z);
    const acc_t row_lse = lse[n];
    const acc_t dot = static_cast<acc_t>(row_dot[n]);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const acc_t p = exp_acc(z[j] - row_lse);
      out[j] = div_acc(p * (static_cast<acc_t>(dy[j]) - dot), tau);
    }
    store4<scalar_t, acc_t>(grad_logits + n * V, v, V, false, out);
  }
}

// grad_weight[v, d] = sum_n p[n, v] * grad_out[n, d]. Block: kVocab entries x kCols columns;
// loops over the rows in chunks of kRows. Thread: column d = tid % kCols, entries
// tid / kCols + 4 k.
template <typename scalar_t, typename weight_t, typename acc_t, typename sum_t>
__global__ void __launch_bounds__(kTileThreads)
    gumbel_embedding_bwd_weight_kernel(const weight_t* __restrict__ grad_out,
                                       const scalar_t* __restrict__ logits,
                                       const acc_t* __restrict__ lse,
                                       weight_t* __restrict__ grad_weight, int64_t N, int64_t V,
                                       int64_t D, acc_t tau, uint32_t k0, uint32_t k1) {
  constexpr int kVocab = 16, kRows = 32, kCols = 64;
  constexpr int kEntriesPerThread = kVocab * kCols / kTileThreads;  // 4
  constexpr int kEntryStride = kTileThreads / kCols;                // 4
  __shared__ sum_t p_tile[kRows][kVocab];
  __shared__ sum_t g_tile[kRows][kCols];
  const int tid = threadIdx.x;
  const int64_t v_first = static_cast<int64_t>(blockIdx.x) * kVocab;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * kCols;
  const int d = tid % kCols;
  const int e_first = tid / kCols;
  sum_t acc[kEntriesPerThread];
#pragma unroll
  for (int k = 0; k < kEntriesPerThread; ++k) acc[k] = 0;

  for (int64_t n0 = 0; n0 < N; n0 += kRows) {
    // Probabilities: kRows * kVocab / 4 = 128 groups of four columns, one per thread.
    if (tid < kRows * kVocab / 4) {
      const int r = tid / (kVocab / 4);
      const int gi = tid % (kVocab / 4);
      const int64_t n = n0 + r;
      const int64_t v = v_first + 4 * gi;
      acc_t p[4] = {0, 0, 0, 0};
      if (n < N && v < V) {
        acc_t z[4];
        perturbed4<scalar_t, acc_t>(logits + n * V, n, v / 4, V, false, tau, k0, k1, z);
        const acc_t row_lse = lse[n];
#pragma unroll
        for (int j = 0; j < 4; ++j) p[j] = v + j < V ? exp_acc(z[j] - row_lse) : acc_t(0);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) p_tile[r][4 * gi + j] = static_cast<sum_t>(p[j]);
    }
    for (int i = tid; i < kRows * kCols; i += kTileThreads) {
      const int rr = i / kCols;
      const int dd = i % kCols;
      const int64_t n = n0 + rr;
      const int64_t c = col0 + dd;
      g_tile[rr][dd] = n < N && c < D ? static_cast<sum_t>(grad_out[n * D + c]) : sum_t(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int rr = 0; rr < kRows; ++rr) {
      const sum_t g = g_tile[rr][d];
#pragma unroll
      for (int k = 0; k < kEntriesPerThread; ++k)
        acc[k] += p_tile[rr][e_first + kEntryStride * k] * g;
    }
    __syncthreads();
  }
  const int64_t c = col0 + d;
#pragma unroll
  for (int k = 0; k < kEntriesPerThread; ++k) {
    const int64_t v = v_first + e_first + kEntryStride * k;
    if (v < V && c < D) grad_weight[v * D + c] = static_cast<weight_t>(acc[k]);
  }
}

// ------------------------------------------------------------------------------------------------
// Host side.

constexpr int64_t kMaxGridX = 2147483647LL;
constexpr int64_t kMaxGridY = 65535;


cudaStream_t current_stream() {
#if RLGAF_HAVE_C10_CUDA
  return c10::cuda::getCurrentCUDAStream().stream();
#else
  return cudaStream_t(0);
#endif
}

// Makes the tensor's device current for the scope (c10::cuda::CUDAGuard where available).
class DeviceScope {
 public:
  explicit DeviceScope(const Tensor& t)
#if RLGAF_HAVE_C10_CUDA
      : guard_(t.device())
#endif
  {
#if !RLGAF_HAVE_C10_CUDA
    cudaGetDevice(&previous_);
    cudaSetDevice(t.get_device());
#endif
  }
  ~DeviceScope() {
#if !RLGAF_HAVE_C10_CUDA
    cudaSetDevice(previous_);
#endif
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
#if RLGAF_HAVE_C10_CUDA
  c10::cuda::CUDAGuard guard_;
#else
  int previous_ = 0;
#endif
};

void check_launch() {
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "rlgaf_fast_cuda: kernel launch failed: ",
              cudaGetErrorString(err));
}

void check_matrix(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "rlgaf_fast_cuda: ", name, " must be a CUDA tensor, got device ",
              device_str(t));
  TORCH_CHECK(t.dim() == 2, "rlgaf_fast_cuda: ", name, " must be 2-D, got shape ",
              shape_str(t.sizes()));
  TORCH_CHECK(t.is_contiguous(), "rlgaf_fast_cuda: ", name, " must be contiguous");
}

void check_floating(const Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "rlgaf_fast_cuda: ", name,
              " must be float16, bfloat16, float32 or float64, got ", rlgaf_fast::dtype_str(dt));
}

void check_same_device(const Tensor& t, const Tensor& ref, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), "rlgaf_fast_cuda: ", name, " is on ", device_str(t),
              " but logits are on ", device_str(ref));
}

void check_tau(double tau) {
  TORCH_CHECK(tau > 0, "rlgaf_fast_cuda: tau must be > 0, got ", num_str(tau));
}

// Philox key from the seed: (seed & 0xffffffff, seed >> 32).
std::pair<uint32_t, uint32_t> philox_key(int64_t seed) {
  TORCH_CHECK(seed >= 0, "rlgaf_fast_cuda: seed must be in [0, 2^63), got ", num_str(seed));
  const uint64_t s = static_cast<uint64_t>(seed);
  return {static_cast<uint32_t>(s & 0xffffffffULL), static_cast<uint32_t>(s >> 32)};
}

// Whether rows of V elements of these tensors can be read as aligned groups of four.
bool can_vectorize(int64_t V, std::initializer_list<const Tensor*> tensors) {
  if (V % 4 != 0) return false;
  for (const Tensor* t : tensors) {
    const auto bytes = 4 * static_cast<uintptr_t>(t->element_size());
    if (reinterpret_cast<uintptr_t>(t->data_ptr()) % bytes != 0) return false;
  }
  return true;
}

// One block per row: enough threads to cover the row's groups of four, a multiple of 32.
int row_threads(int64_t V) {
  const int64_t groups = (V + 3) / 4;
  const int64_t warps = (groups + 31) / 32;
  return static_cast<int>(std::min<int64_t>(512, std::max<int64_t>(1, warps) * 32));
}

unsigned row_blocks(int64_t N) { return static_cast<unsigned>(std::min(N, kMaxGridX)); }

at::ScalarType lse_dtype(const Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The embedding's accumulation dtype (sum_t of its kernels): float64 where an input is.
at::ScalarType embedding_sum_dtype(const Tensor& logits, const Tensor& weight) {
  const bool wide = logits.scalar_type() == at::kDouble || weight.scalar_type() == at::kDouble;
  return wide ? at::kDouble : at::kFloat;
}

std::tuple<Tensor, Tensor> gumbel_softmax_fwd(const Tensor& logits, double tau, bool hard,
                                              int64_t seed) {
  check_matrix(logits, "logits");
  check_floating(logits, "logits");
  check_tau(tau);
  const auto key = philox_key(seed);
  const int64_t N = logits.size(0);
  const int64_t V = logits.size(1);
  TORCH_CHECK(V >= 1, "rlgaf_fast_cuda: logits must have at least one column, got shape ",
              shape_str(logits.sizes()));
  Tensor y = at::empty_like(logits);
  Tensor index = at::empty({N}, logits.options().dtype(at::kLong));
  if (N == 0) return {y, index};
  const DeviceScope device_scope(logits);
  const bool vec = can_vectorize(V, {&logits, &y});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                  "rlgaf_fast_cuda::gumbel_softmax_fwd", [&] {
    using acc_t = acc_of_t<scalar_t>;
    gumbel_softmax_fwd_kernel<scalar_t, acc_t><<<row_blocks(N), row_threads(V), 0,
                                                 current_stream()>>>(
        logits.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), index.data_ptr<int64_t>(), N, V,
        static_cast<acc_t>(tau), hard, key.first, key.second, vec);
  });
  check_launch();
  return {y, index};
}

Tensor gumbel_softmax_bwd(const Tensor& grad_y, const Tensor& y, double tau) {
  check_matrix(y, "y");
  check_floating(y, "y");
  check_matrix(grad_y, "grad_y");
  check_same_device(grad_y, y, "grad_y");
  TORCH_CHECK(grad_y.sizes() == y.sizes(), "rlgaf_fast_cuda: grad_y must have the shape of y ",
              shape_str(y.sizes()), ", got ", shape_str(grad_y.sizes()));
  check_tau(tau);
  const Tensor gy = grad_y.to(y.scalar_type()).contiguous();
  const int64_t N = y.size(0);
  const int64_t V = y.size(1);
  Tensor grad_logits = at::empty_like(y);
  if (N == 0 || V == 0) return grad_logits;
  const DeviceScope device_scope(y);
  const bool vec = can_vectorize(V, {&gy, &y, &grad_logits});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(),
                                  "rlgaf_fast_cuda::gumbel_softmax_bwd", [&] {
    using acc_t = acc_of_t<scalar_t>;
    gumbel_softmax_bwd_kernel<scalar_t, acc_t><<<row_blocks(N), row_threads(V), 0,
                                                 current_stream()>>>(
        gy.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), grad_logits.data_ptr<scalar_t>(), N, V,
        static_cast<acc_t>(tau), vec);
  });
  check_launch();
  return grad_logits;
}

Tensor gumbel_softmax_bwd_from_logits(const Tensor& grad_y, const Tensor& logits, double tau,
                                      int64_t seed) {
  check_matrix(logits, "logits");
  check_floating(logits, "logits");
  check_matrix(grad_y, "grad_y");
  check_same_device(grad_y, logits, "grad_y");
  TORCH_CHECK(grad_y.sizes() == logits.sizes(),
              "rlgaf_fast_cuda: grad_y must have the shape of logits ", shape_str(logits.sizes()),
              ", got ", shape_str(grad_y.sizes()));
  check_tau(tau);
  const auto key = philox_key(seed);
  const Tensor gy = grad_y.to(logits.scalar_type()).contiguous();
  const int64_t N = logits.size(0);
  const int64_t V = logits.size(1);
  TORCH_CHECK(V >= 1, "rlgaf_fast_cuda: logits must have at least one column, got shape ",
              shape_str(logits.sizes()));
  Tensor grad_logits = at::empty_like(logits);
  if (N == 0) return grad_logits;
  const DeviceScope device_scope(logits);
  const bool vec = can_vectorize(V, {&gy, &logits, &grad_logits});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                  "rlgaf_fast_cuda::gumbel_softmax_bwd_from_logits", [&] {
    using acc_t = acc_of_t<scalar_t>;
    gumbel_softmax_bwd_from_logits_kernel<scalar_t, acc_t><<<row_blocks(N), row_threads(V), 0,
                                                             current_stream()>>>(
        gy.data_ptr<scalar_t>(), logits.data_ptr<scalar_t>(), grad_logits.data_ptr<scalar_t>(),
        N, V, static_cast<acc_t>(tau), key.first, key.second, vec);
  });
  check_launch();
  return grad_logits;
}

void check_embedding_args(const Tensor& logits, const Tensor& weight, double tau) {
  check_matrix(logits, "logits");
  check_floating(logits, "logits");
  check_matrix(weight, "weight");
  check_floating(weight, "weight");
  check_same_device(weight, logits, "weight");
  check_tau(tau);
  TORCH_CHECK(logits.size(1) >= 1,
              "rlgaf_fast_cuda: logits must have at least one column, got shape ",
              shape_str(logits.sizes()));
  TORCH_CHECK(weight.size(0) == logits.size(1), "rlgaf_fast_cuda: weight must have ",
              num_str(logits.size(1)), " rows (the vocabulary size of logits), got shape ",
              shape_str(weight.sizes()));
}

std::tuple<Tensor, Tensor, Tensor> gumbel_softmax_embedding_fwd(const Tensor& logits,
                                                                const Tensor& weight, double tau,
                                                                int64_t seed) {
  check_embedding_args(logits, weight, tau);
  const auto key = philox_key(seed);
  const int64_t N = logits.size(0);
  const int64_t V = logits.size(1);
  const int64_t D = weight.size(1);
  // out in the accumulation dtype (sum_t below): the op returns it in the weight's dtype, and the
  // backward reads this one, so that grad_out . out carries no 16-bit rounding.
  Tensor out = at::empty({N, D}, weight.options().dtype(embedding_sum_dtype(logits, weight)));
  Tensor tokens = at::empty({N}, logits.options().dtype(at::kLong));
  Tensor lse = at::empty({N}, logits.options().dtype(lse_dtype(logits)));
  if (N == 0) return {out, tokens, lse};
  const DeviceScope device_scope(logits);
  const cudaStream_t stream = current_stream();
  const bool vec = can_vectorize(V, {&logits});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                  "rlgaf_fast_cuda::gumbel_softmax_embedding_fwd", [&] {
    using logits_t = scalar_t;
    using acc_t = acc_of_t<logits_t>;
    gumbel_row_stats_kernel<logits_t, acc_t><<<row_blocks(N), row_threads(V), 0, stream>>>(
        logits.data_ptr<logits_t>(), tokens.data_ptr<int64_t>(), lse.data_ptr<acc_t>(), N, V,
        static_cast<acc_t>(tau), key.first, key.second, vec);
    check_launch();
    if (D == 0) return;
    const int64_t row_tiles = (N + 15) / 16;
    const int64_t col_tiles = (D + 63) / 64;
    TORCH_CHECK(row_tiles <= kMaxGridX && col_tiles <= kMaxGridY,
                "rlgaf_fast_cuda: gumbel_softmax_embedding_fwd: problem too large for the grid");
    const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(col_tiles));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(),
                                    "rlgaf_fast_cuda::gumbel_softmax_embedding_fwd", [&] {
      using weight_t = scalar_t;
      using sum_t = std::conditional_t<std::is_same<acc_t, double>::value ||
                                           std::is_same<weight_t, double>::value,
                                       double, float>;
      gumbel_embedding_fwd_kernel<logits_t, weight_t, acc_t, sum_t>
          <<<grid, kTileThreads, 0, stream>>>(
              logits.data_ptr<logits_t>(), weight.data_ptr<weight_t>(), lse.data_ptr<acc_t>(),
              out.data_ptr<sum_t>(), N, V, D, static_cast<acc_t>(tau), key.first, key.second);
      check_launch();
    });
  });
  return {out, tokens, lse};
}

// weight_grad false: grad_weight is not formed (an empty tensor).
std::tuple<Tensor, Tensor> gumbel_softmax_embedding_bwd(const Tensor& grad_out,
                                                        const Tensor& logits,
                                                        const Tensor& weight, const Tensor& out,
                                                        const Tensor& lse, double tau,
                                                        int64_t seed, bool weight_grad) {
  check_embedding_args(logits, weight, tau);
  check_matrix(grad_out, "grad_out");
  check_matrix(out, "out");
  check_same_device(grad_out, logits, "grad_out");
  check_same_device(out, logits, "out");
  check_same_device(lse, logits, "lse");
  const auto key = philox_key(seed);
  const int64_t N = logits.size(0);
  const int64_t V = logits.size(1);
  const int64_t D = weight.size(1);
  TORCH_CHECK(grad_out.size(0) == N && grad_out.size(1) == D,
              "rlgaf_fast_cuda: grad_out must have shape ", shape_str({N, D}), ", got ",
              shape_str(grad_out.sizes()));
  TORCH_CHECK(out.size(0) == N && out.size(1) == D, "rlgaf_fast_cuda: out must have shape ",
              shape_str({N, D}), ", got ", shape_str(out.sizes()));
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == N, "rlgaf_fast_cuda: lse must have shape ",
              shape_str({N}), ", got ", shape_str(lse.sizes()));
  const Tensor go = grad_out.to(weight.scalar_type()).contiguous();
  const Tensor lse_c = lse.to(lse_dtype(logits)).contiguous();
  Tensor grad_logits = at::empty_like(logits);
  Tensor grad_weight = weight_grad ? at::empty_like(weight) : at::empty({0}, weight.options());
  if (N == 0) {
    grad_weight.zero_();
    return {grad_logits, grad_weight};
  }
  if (D == 0) {
    grad_logits.zero_();  // dy and grad_out . out are both empty sums
    return {grad_logits, grad_weight};
  }
  const DeviceScope device_scope(logits);
  const cudaStream_t stream = current_stream();
  const auto sum_dtype = embedding_sum_dtype(logits, weight);
  // grad_out[n] . out[n]: an [N] vector, computed with ATen (on the current stream).
  const Tensor row_dot = (go.to(sum_dtype) * out.to(sum_dtype)).sum(1).contiguous();

  const int64_t row_tiles = (N + 15) / 16;
  const int64_t vocab_tiles_logits = (V + 63) / 64;
  const int64_t vocab_tiles_weight = (V + 15) / 16;
  const int64_t col_tiles = (D + 63) / 64;
  TORCH_CHECK(row_tiles <= kMaxGridX && vocab_tiles_logits <= kMaxGridY &&
                  vocab_tiles_weight <= kMaxGridX && col_tiles <= kMaxGridY,
              "rlgaf_fast_cuda: gumbel_softmax_embedding_bwd: problem too large for the grid");
  const dim3 grid_logits(static_cast<unsigned>(row_tiles),
                         static_cast<unsigned>(vocab_tiles_logits));
  const dim3 grid_weight(static_cast<unsigned>(vocab_tiles_weight),
                         static_cast<unsigned>(col_tiles));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                  "rlgaf_fast_cuda::gumbel_softmax_embedding_bwd", [&] {
    using logits_t = scalar_t;
    using acc_t = acc_of_t<logits_t>;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(),
                                    "rlgaf_fast_cuda::gumbel_softmax_embedding_bwd", [&] {
      using weight_t = scalar_t;
      using sum_t = std::conditional_t<std::is_same<acc_t, double>::value ||
                                           std::is_same<weight_t, double>::value,
                                       double, float>;
      gumbel_embedding_bwd_logits_kernel<logits_t, weight_t, acc_t, sum_t>
          <<<grid_logits, kTileThreads, 0, stream>>>(
              go.data_ptr<weight_t>(), logits.data_ptr<logits_t>(), weight.data_ptr<weight_t>(),
              lse_c.data_ptr<acc_t>(), row_dot.data_ptr<sum_t>(),
              grad_logits.data_ptr<logits_t>(), N, V, D, static_cast<acc_t>(tau), key.first,
              key.second);
      check_launch();
      if (!weight_grad) return;
      gumbel_embedding_bwd_weight_kernel<logits_t, weight_t, acc_t, sum_t>
          <<<grid_weight, kTileThreads, 0, stream>>>(
              go.data_ptr<weight_t>(), logits.data_ptr<logits_t>(), lse_c.data_ptr<acc_t>(),
              grad_weight.data_ptr<weight_t>(), N, V, D, static_cast<acc_t>(tau), key.first,
              key.second);
      check_launch();
    });
  });
  return {grad_logits, grad_weight};
}

}  // namespace
}  // namespace rlgaf_fast_cuda

TORCH_LIBRARY_FRAGMENT(rlgaf_fast_cuda, m) {
  m.def("gumbel_softmax_fwd(Tensor logits, float tau, bool hard, int seed) -> (Tensor, Tensor)",
        &rlgaf_fast_cuda::gumbel_softmax_fwd);
  m.def("gumbel_softmax_bwd(Tensor grad_y, Tensor y, float tau) -> Tensor",
        &rlgaf_fast_cuda::gumbel_softmax_bwd);
  m.def("gumbel_softmax_bwd_from_logits(Tensor grad_y, Tensor logits, float tau, int seed) -> "
        "Tensor",
        &rlgaf_fast_cuda::gumbel_softmax_bwd_from_logits);
  m.def("gumbel_softmax_embedding_fwd(Tensor logits, Tensor weight, float tau, int seed) -> "
        "(Tensor, Tensor, Tensor)",
        &rlgaf_fast_cuda::gumbel_softmax_embedding_fwd);
  m.def("gumbel_softmax_embedding_bwd(Tensor grad_out, Tensor logits, Tensor weight, Tensor out, "
        "Tensor lse, float tau, int seed, bool weight_grad) -> (Tensor, Tensor)",
        &rlgaf_fast_cuda::gumbel_softmax_embedding_bwd);
}
