// CUDA kernels of the fused Gumbel-Softmax -> embedding lookup, registered for the CUDA
// dispatch key of torch.ops.rlgaf_fast_C.* (schemas in csrc/ops.cpp).
//
// Kernel contract: see the op layer (rlgaf_fast/ops/gumbel_softmax.py). No [N, V] buffer is
// written: the forward takes the per-row max / logsumexp / argmax first, then a tiled kernel
// accumulates exp(z - lse) * weight over the vocabulary; the backward has one tiled kernel for
// grad_logits and one for grad_weight, both regenerating the probabilities from the seed and lse.
// Shared helpers (noise, row statistics, the probability tile): gumbel_common.cuh.

#include "gumbel_common.cuh"

namespace rlgaf_fast_cuda {
namespace {

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
  static_assert(kRows * kVocab / 4 <= kTileThreads, "a thread per group of the probability tile");
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
    load_probability_tile<kRows, kVocab>(p_tile, logits, lse, row0, v0, N, V, tau, k0, k1);
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
  static_assert(kRows * kVocab / 4 <= kTileThreads, "a thread per group of the probability tile");
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
    load_probability_tile<kRows, kVocab>(p_tile, logits, lse, n0, v_first, N, V, tau, k0, k1);
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

// The embedding's accumulation dtype (sum_t of its kernels): float64 where an input is.
inline at::ScalarType embedding_sum_dtype(const Tensor& logits, const Tensor& weight) {
  const bool wide = logits.scalar_type() == at::kDouble || weight.scalar_type() == at::kDouble;
  return wide ? at::kDouble : at::kFloat;
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

TORCH_LIBRARY_IMPL(rlgaf_fast_C, CUDA, m) {
  m.impl("gumbel_softmax_embedding_fwd", &rlgaf_fast_cuda::gumbel_softmax_embedding_fwd);
  m.impl("gumbel_softmax_embedding_bwd", &rlgaf_fast_cuda::gumbel_softmax_embedding_bwd);
}
