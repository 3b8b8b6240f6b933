// Device and host helpers shared by the CUDA kernels of the Gumbel-Softmax family: the row
// kernels (gumbel_softmax.cu) and the fused embedding (gumbel_softmax_embedding.cu).
//
// The Gumbel noise of element (row r, column c) is Philox4x32-10 keyed by the seed with counter
// (c >> 2, r_lo, r_hi, 0), word c & 3, exactly as rlgaf_fast/reference.py. One Philox call gives
// the noise of four consecutive columns, so every kernel works on groups of four columns that
// start at a multiple of four. Arithmetic is float32 (float64 for float64 logits).
//
// Included by several translation units: host functions are inline, device helpers inline or
// templates, and the kernels themselves stay in the .cu files.
#pragma once

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

// Fills p_tile[r][c] with the probability p = exp(z - lse) of row row0 + r and vocabulary column
// v0 + c (0 outside the problem), regenerating z from the seed: thread t < kRows * kCols / 4
// makes one group of four columns (one Philox call), so the block needs at least that many
// threads and v0 must be a multiple of 4. The embedding kernels that multiply probabilities,
// the forward (p @ weight) and the weight's gradient (p^T @ grad_out), both load their tiles here.
template <int kRows, int kCols, typename scalar_t, typename acc_t, typename sum_t>
__device__ __forceinline__ void load_probability_tile(sum_t (&p_tile)[kRows][kCols],
                                                      const scalar_t* __restrict__ logits,
                                                      const acc_t* __restrict__ lse, int64_t row0,
                                                      int64_t v0, int64_t N, int64_t V, acc_t tau,
                                                      uint32_t k0, uint32_t k1) {
  static_assert(kCols % 4 == 0, "the noise comes in groups of four columns");
  const int tid = threadIdx.x;
  if (tid >= kRows * kCols / 4) return;
  const int r = tid / (kCols / 4);
  const int gi = tid % (kCols / 4);
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

// ------------------------------------------------------------------------------------------------
// Host side.

constexpr int64_t kMaxGridX = 2147483647LL;
constexpr int64_t kMaxGridY = 65535;

inline cudaStream_t current_stream() {
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

inline void check_launch() {
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "rlgaf_fast_cuda: kernel launch failed: ",
              cudaGetErrorString(err));
}

inline void check_matrix(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "rlgaf_fast_cuda: ", name, " must be a CUDA tensor, got device ",
              device_str(t));
  TORCH_CHECK(t.dim() == 2, "rlgaf_fast_cuda: ", name, " must be 2-D, got shape ",
              shape_str(t.sizes()));
  TORCH_CHECK(t.is_contiguous(), "rlgaf_fast_cuda: ", name, " must be contiguous");
}

inline void check_floating(const Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "rlgaf_fast_cuda: ", name,
              " must be float16, bfloat16, float32 or float64, got ", rlgaf_fast::dtype_str(dt));
}

inline void check_same_device(const Tensor& t, const Tensor& ref, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), "rlgaf_fast_cuda: ", name, " is on ", device_str(t),
              " but logits are on ", device_str(ref));
}

inline void check_tau(double tau) {
  TORCH_CHECK(tau > 0, "rlgaf_fast_cuda: tau must be > 0, got ", num_str(tau));
}

// Philox key from the seed: (seed & 0xffffffff, seed >> 32).
inline std::pair<uint32_t, uint32_t> philox_key(int64_t seed) {
  TORCH_CHECK(seed >= 0, "rlgaf_fast_cuda: seed must be in [0, 2^63), got ", num_str(seed));
  const uint64_t s = static_cast<uint64_t>(seed);
  return {static_cast<uint32_t>(s & 0xffffffffULL), static_cast<uint32_t>(s >> 32)};
}

// Whether rows of V elements of these tensors can be read as aligned groups of four.
inline bool can_vectorize(int64_t V, std::initializer_list<const Tensor*> tensors) {
  if (V % 4 != 0) return false;
  for (const Tensor* t : tensors) {
    const auto bytes = 4 * static_cast<uintptr_t>(t->element_size());
    if (reinterpret_cast<uintptr_t>(t->data_ptr()) % bytes != 0) return false;
  }
  return true;
}

// One block per row: enough threads to cover the row's groups of four, a multiple of 32.
inline int row_threads(int64_t V) {
  const int64_t groups = (V + 3) / 4;
  const int64_t warps = (groups + 31) / 32;
  return static_cast<int>(std::min<int64_t>(512, std::max<int64_t>(1, warps) * 32));
}

inline unsigned row_blocks(int64_t N) { return static_cast<unsigned>(std::min(N, kMaxGridX)); }

inline at::ScalarType lse_dtype(const Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace rlgaf_fast_cuda
