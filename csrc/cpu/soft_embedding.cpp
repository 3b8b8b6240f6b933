// Top-k soft embedding on the CPU: out[n] = sum_i (p[n, j_i] / S_n) * weight[j_i] over the k
// largest probabilities j_1..j_k of row n, S_n their sum.
//
// Forward: one read of each probability row. A min-heap holds the k largest values seen so far;
// blocks of 16 values that cannot beat its minimum are skipped after one vectorisable compare,
// so after the first few blocks the heap is rarely touched. Then k rows of weight are gathered.
// Backward: d out / d p_j = (weight[j] - out) / S for the k selected j (zero elsewhere); the
// weight gradient scatters coef * grad_out into the k rows, threads splitting the columns so
// that no two write the same element.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../error_format.h"
#include "checks.h"

namespace {

using rlgaf_fast::dtype_str;
using rlgaf_fast::num_str;
using rlgaf_fast::shape_str;
using rlgaf_fast::cpu::check_float_matrix;
using rlgaf_fast::cpu::check_weight;
using rlgaf_fast::cpu::compute_t;

constexpr int64_t kBlock = 16;

void check_inputs(const at::Tensor& probs, const at::Tensor& weight, int64_t k) {
  constexpr const char* op = "soft_embedding_topk";
  check_float_matrix(op, "probs", probs, "[N, V]");
  check_weight(op, weight, probs.size(1), "probs");
  TORCH_CHECK(k >= 1 && k <= probs.size(1), op, ": k must be in [1, ", num_str(probs.size(1)),
              "], got ", num_str(k));
}

// Whether a ranks above b in the order of torch.topk: NaN above every number.
template <typename acc_t>
bool ranks_above(acc_t a, acc_t b) {
  return a > b || (a != a && b == b);
}

// The k largest values of row[0, V) with their columns, largest first (ties: lower column).
// NaN counts as the largest value, as in torch.topk, so that it reaches the output.
template <typename scalar_t, typename acc_t>
void top_k_of_row(const scalar_t* row, int64_t V, int64_t k,
                  std::vector<std::pair<acc_t, int64_t>>& heap) {
  // Min-heap on value; among equal values the higher column is the smaller, evicted first.
  const auto greater = [](const std::pair<acc_t, int64_t>& a, const std::pair<acc_t, int64_t>& b) {
    if (ranks_above(a.first, b.first)) return true;
    const bool tie = a.first == b.first || (a.first != a.first && b.first != b.first);
    return tie && a.second < b.second;
  };
  heap.clear();
  for (int64_t j = 0; j < k; ++j) heap.emplace_back(static_cast<acc_t>(row[j]), j);
  std::make_heap(heap.begin(), heap.end(), greater);
  acc_t threshold = heap.front().first;
  int64_t j = k;
  const auto offer = [&](int64_t col) {
    const acc_t v = static_cast<acc_t>(row[col]);
    if (ranks_above(v, threshold)) {  // a later column never wins a tie
      std::pop_heap(heap.begin(), heap.end(), greater);
      heap.back() = {v, col};
      std::push_heap(heap.begin(), heap.end(), greater);
      threshold = heap.front().first;
    }
  };
  for (; j < V && j % kBlock != 0; ++j) offer(j);
  for (; j + kBlock <= V; j += kBlock) {
    bool any = false;
    for (int64_t i = 0; i < kBlock; ++i) {
      const acc_t v = static_cast<acc_t>(row[j + i]);
      any |= v > threshold || v != v;
    }
    if (any) {
      for (int64_t i = 0; i < kBlock; ++i) offer(j + i);
    }
  }
  for (; j < V; ++j) offer(j);
  std::sort_heap(heap.begin(), heap.end(), greater);  // largest first
}

// out [N, D] (weight's dtype), index [N, k] int64, coef [N, k] and row_sum [N] in the
// accumulation dtype (float64 for float64 probs, else float32).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> soft_embedding_topk_fwd(
    const at::Tensor& probs, const at::Tensor& weight, int64_t k) {
  check_inputs(probs, weight, k);
  const int64_t N = probs.size(0), V = probs.size(1), D = weight.size(1);
  const auto acc_type = probs.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor index = at::empty({N, k}, probs.options().dtype(at::kLong));
  at::Tensor coef = at::empty({N, k}, probs.options().dtype(acc_type));
  at::Tensor row_sum = at::empty({N}, probs.options().dtype(acc_type));
  at::Tensor out = at::empty({N, D}, weight.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, probs.scalar_type(), "topk", [&] {
    using p_t = scalar_t;
    using acc_t = compute_t<p_t>;
    const p_t* p = probs.data_ptr<p_t>();
    int64_t* idx = index.data_ptr<int64_t>();
    acc_t* c = coef.data_ptr<acc_t>();
    acc_t* s = row_sum.data_ptr<acc_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "gather", [&] {
      const scalar_t* w = weight.data_ptr<scalar_t>();
      scalar_t* o = out.data_ptr<scalar_t>();
      at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
        std::vector<std::pair<acc_t, int64_t>> heap;
        heap.reserve(k);
        std::vector<acc_t> acc(D);
        for (int64_t n = begin; n < end; ++n) {
          top_k_of_row<p_t, acc_t>(p + n * V, V, k, heap);
          acc_t sum = 0;
          for (const auto& entry : heap) sum += entry.first;
          s[n] = sum;
          std::fill(acc.begin(), acc.end(), acc_t(0));
          for (int64_t i = 0; i < k; ++i) {
            const acc_t ci = heap[i].first / sum;
            idx[n * k + i] = heap[i].second;
            c[n * k + i] = ci;
            const scalar_t* w_row = w + heap[i].second * D;
            for (int64_t d = 0; d < D; ++d) acc[d] += ci * static_cast<acc_t>(w_row[d]);
          }
          for (int64_t d = 0; d < D; ++d) o[n * D + d] = static_cast<scalar_t>(acc[d]);
        }
      });
    });
  });
  return {out, index, coef, row_sum};
}

// grad_probs [N, V] in probs_dtype and grad_weight [V, D] in weight's dtype.
std::tuple<at::Tensor, at::Tensor> soft_embedding_topk_bwd(
    const at::Tensor& grad_out, const at::Tensor& weight, const at::Tensor& out,
    const at::Tensor& index, const at::Tensor& coef, const at::Tensor& row_sum,
    at::ScalarType probs_dtype) {
  check_float_matrix("soft_embedding_topk_bwd", "weight", weight, "[V, D]");
  TORCH_CHECK(index.dim() == 2 && index.scalar_type() == at::kLong,
              "soft_embedding_topk_bwd: index must be an int64 [N, k] tensor, got ",
              dtype_str(index.scalar_type()), " ", shape_str(index.sizes()));
  const int64_t N = index.size(0), k = index.size(1), V = weight.size(0), D = weight.size(1);
  // The gradient is scattered into rows index[n, i] of grad_weight: an id outside [0, V)
  // would write outside it.
  if (index.numel() > 0) {
    const int64_t lo = index.min().item<int64_t>(), hi = index.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < V, "soft_embedding_topk_bwd: index must hold ids in [0, ",
                num_str(V), "), got values from ", num_str(lo), " to ", num_str(hi));
  }
  TORCH_CHECK(grad_out.sizes() == out.sizes() && out.dim() == 2 && out.size(0) == N &&
                  out.size(1) == D,
              "soft_embedding_topk_bwd: grad_out and out must be [", num_str(N), ", ",
              num_str(D), "], got ", shape_str(grad_out.sizes()), " and ",
              shape_str(out.sizes()));
  TORCH_CHECK(coef.sizes() == index.sizes() && row_sum.dim() == 1 && row_sum.size(0) == N &&
                  coef.scalar_type() == row_sum.scalar_type(),
              "soft_embedding_topk_bwd: coef must be [N, k] and row_sum [N] of one dtype");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto acc_type = coef.scalar_type();
  const at::Tensor g = grad_out.to(acc_type).contiguous();
  const at::Tensor w = weight.to(acc_type).contiguous();
  const at::Tensor o = out.to(acc_type).contiguous();
  const at::Tensor idx = index.contiguous(), cf = coef.contiguous(), rs = row_sum.contiguous();
  at::Tensor grad_probs = at::zeros({N, V}, weight.options().dtype(acc_type));
  at::Tensor grad_weight = at::zeros({V, D}, weight.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES(acc_type, "soft_embedding_topk_bwd", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t* op = o.data_ptr<scalar_t>();
    const int64_t* ip = idx.data_ptr<int64_t>();
    const scalar_t* cp = cf.data_ptr<scalar_t>();
    const scalar_t* sp = rs.data_ptr<scalar_t>();
    scalar_t* dp = grad_probs.data_ptr<scalar_t>();
    scalar_t* dw = grad_weight.data_ptr<scalar_t>();
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const scalar_t* g_row = gp + n * D;
        scalar_t g_dot_out = 0;
        for (int64_t d = 0; d < D; ++d) g_dot_out += g_row[d] * op[n * D + d];
        for (int64_t i = 0; i < k; ++i) {
          const int64_t j = ip[n * k + i];
          const scalar_t* w_row = wp + j * D;
          scalar_t g_dot_w = 0;
          for (int64_t d = 0; d < D; ++d) g_dot_w += g_row[d] * w_row[d];
          dp[n * V + j] = (g_dot_w - g_dot_out) / sp[n];
        }
      }
    });
    // Threads own column ranges of grad_weight: every (n, i) pair adds into its own columns.
    at::parallel_for(0, D, 64, [&](int64_t d0, int64_t d1) {
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t i = 0; i < k; ++i) {
          scalar_t* dw_row = dw + ip[n * k + i] * D;
          const scalar_t c = cp[n * k + i];
          for (int64_t d = d0; d < d1; ++d) dw_row[d] += c * gp[n * D + d];
        }
      }
    });
  });
  return {grad_probs.to(probs_dtype), grad_weight.to(weight.scalar_type())};
}

}  // namespace

// Schemas in csrc/ops.cpp.
TORCH_LIBRARY_IMPL(rlgaf_fast_C, CPU, m) {
  m.impl("soft_embedding_topk_fwd", &soft_embedding_topk_fwd);
  m.impl("soft_embedding_topk_bwd", &soft_embedding_topk_bwd);
}
