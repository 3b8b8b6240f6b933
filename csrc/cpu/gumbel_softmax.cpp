// Fused C++ CPU kernels of the Gumbel-Softmax family: the kernel contract of docs/design.md
// (forward, backward, backward from logits, and the fused Gumbel-Softmax -> embedding forward and
// backward). Inputs arrive 2-D and contiguous from the Python op layer; the checks here are the
// last line of defence.
//
// Arithmetic is float32 (float64 for float64 logits); the noise is always the contract's float32
// Gumbel noise, regenerated from (seed, row, column) wherever it is needed, never stored.
// Rows run in parallel; each thread keeps one row of scores in a buffer (up to ~200k columns fit
// in its L2 cache) and makes it in three passes: noise, scores and maximum, in L1-sized chunks;
// exp and sum; the normalised write. The embedding kernels work on tiles of rows times vocabulary
// blocks instead and hand the [tile, block] x [block, D] products to BLAS (at::mm).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../error_format.h"
#include "checks.h"
#include "fast_math.h"
#include "philox.h"

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace {

using rlgaf_fast::device_str;
using rlgaf_fast::dtype_str;
using rlgaf_fast::num_str;
using rlgaf_fast::shape_str;
using rlgaf_fast::cpu::check_float_matrix;
using rlgaf_fast::cpu::check_weight;
using rlgaf_fast::cpu::compute_t;
using rlgaf_fast::cpu::exp_shift_sum;
using rlgaf_fast::cpu::gumbel_noise;
using rlgaf_fast::cpu::gumbel_noise_accurate;

constexpr int64_t kElementsPerTake = 16384;  // work a thread takes at a time in parallel_rows
constexpr int64_t kScoreChunk = 2048;        // columns whose noise and scores are made together
constexpr int64_t kEmbedRows = 32;           // rows of a tile in the embedding kernels
constexpr int64_t kEmbedFwdColumns = 512;    // vocabulary block of the embedding forward
constexpr int64_t kEmbedBwdColumns = 256;    // vocabulary block of the embedding backward

int64_t round_up4(int64_t n) { return (n + 3) / 4 * 4; }

// z[i] = (x[i] + z[i]) / tau for i in [0, n): z holds the noise on entry and the scores on exit
// (float scores: the noise is made in place). Returns the largest score.
template <typename scalar_t, typename acc_t>
acc_t noise_to_scores(const scalar_t* __restrict x, acc_t* __restrict z, int64_t n, acc_t tau) {
  acc_t result = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : result)
  for (int64_t i = 0; i < n; ++i) {
    z[i] = (static_cast<acc_t>(x[i]) + z[i]) / tau;
    result = z[i] > result ? z[i] : result;
  }
  return result;
}

// Noise buffer of a scores buffer of `count` columns: the float scores hold their own noise; the
// double ones need a float buffer beside them.
template <typename acc_t>
int64_t noise_buffer_size(int64_t count) {
  return std::is_same_v<acc_t, double> ? round_up4(std::min(count, kScoreChunk)) : 0;
}

// First index of `value` in z[0, n) (0 if absent, e.g. for a row of NaN).
template <typename acc_t>
int64_t first_index_of(const acc_t* z, int64_t n, acc_t value) {
  for (int64_t i = 0; i < n; ++i) {
    if (z[i] == value) return i;
  }
  return 0;
}

// Whether softmax of the scores z[0, n), whose largest non-NaN value is z_max, is NaN (as
// torch.softmax computes it): the row holds a NaN, or z_max is infinite (inf - inf, or a row of
// -inf). The hard sample of such a row is NaN too, as the reference's straight-through sum.
template <typename acc_t>
bool softmax_is_nan(const acc_t* z, int64_t n, acc_t z_max) {
  if (!std::isfinite(z_max)) return true;
  int any_nan = 0;
#pragma omp simd reduction(| : any_nan)
  for (int64_t i = 0; i < n; ++i) any_nan |= z[i] != z[i];
  return any_nan != 0;
}

template <typename acc_t>
struct MaxAndIndex {
  acc_t max;
  int64_t index;  // of the first maximum
};

// z[i] = (x[i] + g) / tau for columns [col_begin, col_begin + count) of `row`, where x points at
// column col_begin (a multiple of 4). z needs room for round_up4(count) values, noise for
// noise_buffer_size<acc_t>(count). Returns the largest z and its first index (relative to
// col_begin). The index is searched for only in the first chunk holding the maximum: a scalar
// scan of the whole row would cost as much as the rest of this function.
template <typename scalar_t, typename acc_t>
MaxAndIndex<acc_t> scores_and_argmax(const scalar_t* x, int64_t row, int64_t col_begin,
                                     int64_t count, uint64_t seed, acc_t tau, acc_t* z,
                                     float* noise) {
  acc_t best = -std::numeric_limits<acc_t>::infinity();
  int64_t best_chunk = 0;
  for (int64_t chunk = 0; chunk < count; chunk += kScoreChunk) {
    const int64_t n = std::min(kScoreChunk, count - chunk);
    if constexpr (std::is_same_v<acc_t, float>) {
      gumbel_noise(seed, row, col_begin + chunk, n, z + chunk);
    } else {
      gumbel_noise_accurate(seed, row, col_begin + chunk, n, noise);
      std::copy(noise, noise + n, z + chunk);
    }
    const acc_t chunk_max = noise_to_scores(x + chunk, z + chunk, n, tau);
    if (chunk_max > best) {  // strict: the first chunk wins on ties
      best = chunk_max;
      best_chunk = chunk;
    }
  }
  const int64_t n = std::min(kScoreChunk, count - best_chunk);
  return {best, best_chunk + first_index_of(z + best_chunk, n, best)};
}

// z[i] = exp(z[i] - shift) in place; returns the sum.
float exp_shift_sum_of(float* z, int64_t n, float shift) { return exp_shift_sum(z, n, shift); }

double exp_shift_sum_of(double* z, int64_t n, double shift) {
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    z[i] = std::exp(z[i] - shift);
    sum += z[i];
  }
  return sum;
}

// sum_i a[i] * b[i], products in acc_t, accumulated in double (accurate even where the loop is
// not vectorised into partial sums).
template <typename scalar_t, typename acc_t>
acc_t dot_of(const scalar_t* a, const scalar_t* b, int64_t n) {
  double sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += static_cast<acc_t>(a[i]) * static_cast<acc_t>(b[i]);
  return static_cast<acc_t>(sum);
}

// at::empty_like for the large [N, V] outputs, which are written exactly once. Buffers this large
// come straight from mmap, and the first touch of each 4 KiB page is a page fault: measured on
// the 2-core development VM, ~10-50 ms for a [512, 32000] float32 output, more than the kernel
// itself. On Linux, asking for transparent huge pages before the first touch turns that into a
// few 2 MiB faults. Only whole 2 MiB pages inside the tensor are advised; failures are ignored.
at::Tensor empty_output_like(const at::Tensor& like) {
  at::Tensor out = at::empty_like(like);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t huge_page = uintptr_t(2) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t first = (begin + huge_page - 1) & ~(huge_page - 1);
  const uintptr_t last = (begin + out.nbytes()) & ~(huge_page - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
  return out;
}

// Runs row_body(row) for every row in [0, rows) in parallel, threads taking blocks of rows (at
// least kElementsPerTake elements) from a shared counter. at::parallel_for gives each thread one
// fixed share instead, and on a machine shared with other processes one preempted thread then
// holds up the whole call. make_row_body() runs once per thread, so that the returned callable
// can own that thread's scratch buffers.
template <typename MakeRowBody>
void parallel_rows(int64_t rows, int64_t cols, const MakeRowBody& make_row_body) {
  const int64_t block = std::max<int64_t>(1, kElementsPerTake / std::max<int64_t>(cols, 1));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    auto row_body = make_row_body();
    for (int64_t begin; (begin = next.fetch_add(block, std::memory_order_relaxed)) < rows;) {
      for (int64_t row = begin; row < std::min(rows, begin + block); ++row) row_body(row);
    }
  });
}

// y[i] *= scale in place; returns sum_i grad_y[i] * y[i] (after scaling), accumulated in double.
template <typename scalar_t, typename acc_t>
acc_t scale_and_dot(acc_t* __restrict y, const scalar_t* __restrict grad_y, int64_t n,
                    acc_t scale) {
  double sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    y[i] *= scale;
    sum += static_cast<acc_t>(grad_y[i]) * y[i];
  }
  return static_cast<acc_t>(sum);
}

void check_logits(const char* op, const char* name, const at::Tensor& t) {
  check_float_matrix(op, name, t, "[N, V]");
  TORCH_CHECK(t.size(1) >= 1, op, ": ", name, " must have at least one column, got shape ",
              shape_str(t.sizes()));
}

void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like,
                bool same_dtype = true) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", device_str(t));
  TORCH_CHECK(t.sizes() == like.sizes(), op, ": ", name, " must have shape ",
              shape_str(like.sizes()), ", got ", shape_str(t.sizes()));
  TORCH_CHECK(!same_dtype || t.scalar_type() == like.scalar_type(), op, ": ", name,
              " must have dtype ", dtype_str(like.scalar_type()), ", got ",
              dtype_str(t.scalar_type()));
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

void check_tau_seed(const char* op, double tau, int64_t seed) {
  TORCH_CHECK(tau > 0.0, op, ": tau must be > 0, got ", num_str(tau));
  TORCH_CHECK(seed >= 0, op, ": seed must be in [0, 2^63), got ", num_str(seed));
}

// ---------------------------------------------------------------------------------------------
// 1. forward: y = softmax(z) per row (or the one-hot of its argmax), index = argmax(z)

std::tuple<at::Tensor, at::Tensor> gumbel_softmax_fwd(const at::Tensor& logits, double tau,
                                                      bool hard, int64_t seed) {
  constexpr const char* op = "gumbel_softmax_fwd";
  check_logits(op, "logits", logits);
  check_tau_seed(op, tau, seed);
  const int64_t rows = logits.size(0), cols = logits.size(1);
  at::Tensor y = empty_output_like(logits);
  at::Tensor index = at::empty({rows}, logits.options().dtype(at::kLong));
  int64_t* index_data = index.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), op, [&] {
    using acc_t = compute_t<scalar_t>;
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    scalar_t* out = y.data_ptr<scalar_t>();
    parallel_rows(rows, cols, [&] {
      // The row body owns its thread's scratch: a row of scores (and the float64 noise chunk).
      return [&, z = std::vector<acc_t>(round_up4(cols)),
              noise = std::vector<float>(noise_buffer_size<acc_t>(cols))](int64_t row) mutable {
        const scalar_t* x_row = x + row * cols;
        scalar_t* y_row = out + row * cols;
        const auto [z_max, best] = scores_and_argmax<scalar_t, acc_t>(
            x_row, row, 0, cols, seed, static_cast<acc_t>(tau), z.data(), noise.data());
        index_data[row] = best;
        if (hard) {
          if (softmax_is_nan(z.data(), cols, z_max)) {
            std::fill(y_row, y_row + cols,
                      static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN()));
            return;
          }
          std::fill(y_row, y_row + cols, scalar_t(0));
          y_row[best] = scalar_t(1);
          return;
        }
        const acc_t inv_sum = acc_t(1) / exp_shift_sum_of(z.data(), cols, z_max);
        for (int64_t i = 0; i < cols; ++i) y_row[i] = static_cast<scalar_t>(z[i] * inv_sum);
      };
    });
  });
  return {y, index};
}

// ---------------------------------------------------------------------------------------------
// 2. backward from the saved soft sample: grad = y * (grad_y - sum(grad_y * y)) / tau

at::Tensor gumbel_softmax_bwd(const at::Tensor& grad_y, const at::Tensor& y, double tau) {
  constexpr const char* op = "gumbel_softmax_bwd";
  check_logits(op, "y", y);
  check_like(op, "grad_y", grad_y, y);
  TORCH_CHECK(tau > 0.0, op, ": tau must be > 0, got ", num_str(tau));
  const int64_t rows = y.size(0), cols = y.size(1);
  at::Tensor grad = empty_output_like(y);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), op, [&] {
    using acc_t = compute_t<scalar_t>;
    const scalar_t* gy = grad_y.const_data_ptr<scalar_t>();
    const scalar_t* yy = y.const_data_ptr<scalar_t>();
    scalar_t* out = grad.data_ptr<scalar_t>();
    const acc_t tau_c = static_cast<acc_t>(tau);
    parallel_rows(rows, cols, [&] {
      return [&](int64_t row) {
        const scalar_t* gy_row = gy + row * cols;
        const scalar_t* y_row = yy + row * cols;
        scalar_t* out_row = out + row * cols;
        const acc_t dot = dot_of<scalar_t, acc_t>(gy_row, y_row, cols);
        for (int64_t i = 0; i < cols; ++i) {
          const acc_t yi = static_cast<acc_t>(y_row[i]);
          out_row[i] = static_cast<scalar_t>(yi * (static_cast<acc_t>(gy_row[i]) - dot) / tau_c);
        }
      };
    });
  });
  return grad;
}

// ---------------------------------------------------------------------------------------------
// 3. backward recomputing the soft sample from the logits and the seed (hard=True)

at::Tensor gumbel_softmax_bwd_from_logits(const at::Tensor& grad_y, const at::Tensor& logits,
                                          double tau, int64_t seed) {
  constexpr const char* op = "gumbel_softmax_bwd_from_logits";
  check_logits(op, "logits", logits);
  check_like(op, "grad_y", grad_y, logits);
  check_tau_seed(op, tau, seed);
  const int64_t rows = logits.size(0), cols = logits.size(1);
  at::Tensor grad = empty_output_like(logits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), op, [&] {
    using acc_t = compute_t<scalar_t>;
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    const scalar_t* gy = grad_y.const_data_ptr<scalar_t>();
    scalar_t* out = grad.data_ptr<scalar_t>();
    const acc_t tau_c = static_cast<acc_t>(tau);
    parallel_rows(rows, cols, [&] {
      return [&, y = std::vector<acc_t>(round_up4(cols)),
              noise = std::vector<float>(noise_buffer_size<acc_t>(cols))](int64_t row) mutable {
        const scalar_t* gy_row = gy + row * cols;
        scalar_t* out_row = out + row * cols;
        const acc_t z_max = scores_and_argmax<scalar_t, acc_t>(x + row * cols, row, 0, cols, seed,
                                                               tau_c, y.data(), noise.data())
                                .max;
        const acc_t inv_sum = acc_t(1) / exp_shift_sum_of(y.data(), cols, z_max);
        const acc_t dot = scale_and_dot(y.data(), gy_row, cols, inv_sum);
        for (int64_t i = 0; i < cols; ++i) {
          out_row[i] = static_cast<scalar_t>(y[i] * (static_cast<acc_t>(gy_row[i]) - dot) / tau_c);
        }
      };
    });
  });
  return grad;
}

// ---------------------------------------------------------------------------------------------
// Embedding kernels: tiles of rows x vocabulary blocks. The probability tile [rows, block] is
// multiplied with the weight block [block, D] by at::mm (BLAS) so that each weight block read
// from memory serves a whole tile of rows. The only [N, *] buffers are N x D.

// Dtype of the probabilities and of the embedding GEMMs: the logits' compute dtype (float32, or
// float64 for float64 logits); the weight is converted to it block by block.
at::ScalarType compute_type(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Rows [begin, end) of weight in the accumulation dtype: a view when the dtype already matches,
// otherwise a conversion into `buffer` (at least [end - begin, D]).
at::Tensor weight_block(const at::Tensor& weight, int64_t begin, int64_t end, at::Tensor& buffer) {
  at::Tensor block = weight.narrow(0, begin, end - begin);
  if (block.scalar_type() == buffer.scalar_type()) return block;
  at::Tensor converted = buffer.narrow(0, 0, end - begin);
  converted.copy_(block);
  return converted;
}

// The dtype of the embedding's out: float32, or float64 where the logits or the weight are. The
// op returns it in the weight's dtype, and the backward reads this one: a 16-bit out would put
// its rounding into grad_out . out, which every gradient of the logits shares.
at::ScalarType embedding_out_type(const at::Tensor& logits, const at::Tensor& weight) {
  return logits.scalar_type() == at::kDouble || weight.scalar_type() == at::kDouble ? at::kDouble
                                                                                     : at::kFloat;
}

// ---------------------------------------------------------------------------------------------
// 4. fused forward: out = softmax(z) @ weight (online softmax over vocabulary blocks),
//    tokens = argmax(z), lse = logsumexp(z)

std::tuple<at::Tensor, at::Tensor, at::Tensor> gumbel_softmax_embedding_fwd(
    const at::Tensor& logits, const at::Tensor& weight, double tau, int64_t seed) {
  constexpr const char* op = "gumbel_softmax_embedding_fwd";
  // The ATen calls below (GEMMs, views, copies) are implementation details: keep autograd out.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_logits(op, "logits", logits);
  check_weight(op, weight, logits.size(1), "logits");
  check_tau_seed(op, tau, seed);
  const int64_t rows = logits.size(0), cols = logits.size(1), dim = weight.size(1);
  const at::ScalarType acc_type = compute_type(logits);
  at::Tensor out =
      at::empty({rows, dim}, weight.options().dtype(embedding_out_type(logits, weight)));
  at::Tensor tokens = at::empty({rows}, logits.options().dtype(at::kLong));
  at::Tensor lse = at::empty({rows}, logits.options().dtype(acc_type));
  // Tiles of up to kEmbedRows rows, but enough tiles for every thread when rows are few.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t tile_rows = std::clamp<int64_t>((rows + threads - 1) / threads, 1, kEmbedRows);
  const int64_t tiles = (rows + tile_rows - 1) / tile_rows;
  const int64_t block_cols = std::min(kEmbedFwdColumns, round_up4(cols));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), op, [&] {
    using acc_t = compute_t<scalar_t>;
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    int64_t* token_data = tokens.data_ptr<int64_t>();
    acc_t* lse_data = lse.data_ptr<acc_t>();
    const acc_t tau_c = static_cast<acc_t>(tau);
    const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
    at::parallel_for(0, tiles, 1, [&](int64_t tile_begin, int64_t tile_end) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;  // thread-local: set per thread
      const auto acc_options = at::TensorOptions().dtype(acc_type);
      at::Tensor probs = at::empty({tile_rows, block_cols}, acc_options);  // p of one tile
      at::Tensor acc = at::empty({tile_rows, dim}, acc_options);           // its sum of p * w
      at::Tensor weight_buffer = at::empty({block_cols, dim}, acc_options);
      std::vector<float> noise(noise_buffer_size<acc_t>(block_cols));
      std::vector<acc_t> run_max(tile_rows), run_sum(tile_rows), best(tile_rows);
      std::vector<int64_t> best_index(tile_rows);
      acc_t* probs_data = probs.data_ptr<acc_t>();
      acc_t* acc_data = acc.data_ptr<acc_t>();
      for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
        const int64_t row0 = tile * tile_rows;
        const int64_t n_rows = std::min(tile_rows, rows - row0);
        std::fill(run_max.begin(), run_max.end(), neg_inf);
        std::fill(run_sum.begin(), run_sum.end(), acc_t(0));
        std::fill(best.begin(), best.end(), neg_inf);
        std::fill(best_index.begin(), best_index.end(), 0);
        acc.zero_();
        for (int64_t col0 = 0; col0 < cols; col0 += block_cols) {
          const int64_t n_cols = std::min(block_cols, cols - col0);
          for (int64_t r = 0; r < n_rows; ++r) {
            const int64_t row = row0 + r;
            acc_t* p_row = probs_data + r * block_cols;
            const auto [block_max, block_index] = scores_and_argmax<scalar_t, acc_t>(
                x + row * cols + col0, row, col0, n_cols, seed, tau_c, p_row, noise.data());
            if (block_max > best[r]) {  // strict: the first maximum wins on ties
              best[r] = block_max;
              best_index[r] = col0 + block_index;
            }
            const acc_t new_max = std::max(run_max[r], block_max);
            // An all -inf prefix has nothing to rescale: shift by 0 so that exp gives 0, not NaN.
            const acc_t shift = new_max == neg_inf ? acc_t(0) : new_max;
            const acc_t rescale = std::exp(run_max[r] - shift);
            run_sum[r] = run_sum[r] * rescale + exp_shift_sum_of(p_row, n_cols, shift);
            run_max[r] = new_max;
            if (rescale != acc_t(1)) {
              acc_t* acc_row = acc_data + r * dim;
              for (int64_t d = 0; d < dim; ++d) acc_row[d] *= rescale;
            }
          }
          const at::Tensor w = weight_block(weight, col0, col0 + n_cols, weight_buffer);
          acc.narrow(0, 0, n_rows).addmm_(probs.narrow(0, 0, n_rows).narrow(1, 0, n_cols), w);
        }
        for (int64_t r = 0; r < n_rows; ++r) {
          const acc_t inv_sum = acc_t(1) / run_sum[r];
          acc_t* acc_row = acc_data + r * dim;
          for (int64_t d = 0; d < dim; ++d) acc_row[d] *= inv_sum;
          token_data[row0 + r] = best_index[r];
          lse_data[row0 + r] = run_max[r] + std::log(run_sum[r]);
        }
        out.narrow(0, row0, n_rows).copy_(acc.narrow(0, 0, n_rows));
      }
    });
  });
  return {out, tokens, lse};
}

// ---------------------------------------------------------------------------------------------
// 5. fused backward: y = exp(z - lse) regenerated from the seed, dy = grad_out @ weight^T,
//    grad_logits = y * (dy - grad_out . out) / tau, grad_weight = y^T @ grad_out.
//    Threads split the vocabulary, so each owns its rows of grad_weight: no races, no reduction.

// weight_grad false: grad_weight is not formed (an empty tensor), as when the weight needs no
// gradient (the straight-through mode detaches it).
std::tuple<at::Tensor, at::Tensor> gumbel_softmax_embedding_bwd(
    const at::Tensor& grad_out, const at::Tensor& logits, const at::Tensor& weight,
    const at::Tensor& out, const at::Tensor& lse, double tau, int64_t seed, bool weight_grad) {
  constexpr const char* op = "gumbel_softmax_embedding_bwd";
  // The ATen calls below (GEMMs, views, copies) are implementation details: keep autograd out.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_logits(op, "logits", logits);
  check_weight(op, weight, logits.size(1), "logits");
  check_tau_seed(op, tau, seed);
  const int64_t rows = logits.size(0), cols = logits.size(1), dim = weight.size(1);
  const at::ScalarType out_type = embedding_out_type(logits, weight);
  TORCH_CHECK(out.device().is_cpu() && out.dim() == 2 && out.size(0) == rows &&
                  out.size(1) == dim && out.scalar_type() == out_type,
              op, ": out must be a CPU ", dtype_str(out_type),
              " tensor of shape [", num_str(rows), ", ", num_str(dim), "], got ",
              dtype_str(out.scalar_type()), " ", shape_str(out.sizes()));
  TORCH_CHECK(at::isFloatingType(grad_out.scalar_type()), op,
              ": grad_out must be a floating-point tensor, got ",
              dtype_str(grad_out.scalar_type()));
  check_like(op, "grad_out", grad_out, out, /*same_dtype=*/false);  // any floating dtype
  const at::ScalarType acc_type = compute_type(logits);
  TORCH_CHECK(lse.device().is_cpu() && lse.dim() == 1 && lse.size(0) == rows &&
                  lse.scalar_type() == acc_type && lse.is_contiguous(),
              op, ": lse must be a contiguous CPU ", dtype_str(acc_type), " tensor of shape [",
              num_str(rows), "], got ", dtype_str(lse.scalar_type()), " ",
              shape_str(lse.sizes()));
  at::Tensor grad_logits = empty_output_like(logits);
  at::Tensor grad_weight =
      weight_grad ? at::empty_like(weight) : at::empty({0}, weight.options());
  // N x D inputs of the GEMMs in the accumulation dtype, and grad_out . out per row.
  const at::Tensor go = grad_out.to(acc_type).contiguous();
  const at::Tensor go_dot_out = (go * out.to(acc_type)).sum(1);
  const int64_t block_cols = std::min(kEmbedBwdColumns, round_up4(cols));
  const int64_t blocks = (cols + block_cols - 1) / block_cols;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), op, [&] {
    using acc_t = compute_t<scalar_t>;
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    scalar_t* gx = grad_logits.data_ptr<scalar_t>();
    const acc_t* lse_data = lse.const_data_ptr<acc_t>();
    const acc_t* go_dot_out_data = go_dot_out.const_data_ptr<acc_t>();
    const acc_t tau_c = static_cast<acc_t>(tau);
    at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;  // thread-local: set per thread
      const auto acc_options = at::TensorOptions().dtype(acc_type);
      const int64_t tile_rows = std::min<int64_t>(kEmbedRows * 2, std::max<int64_t>(rows, 1));
      at::Tensor probs = at::empty({tile_rows, block_cols}, acc_options);
      at::Tensor dprobs = at::empty({tile_rows, block_cols}, acc_options);
      at::Tensor weight_buffer = at::empty({block_cols, dim}, acc_options);
      at::Tensor grad_weight_block =
          weight_grad ? at::empty({block_cols, dim}, acc_options) : at::Tensor();
      std::vector<float> noise(noise_buffer_size<acc_t>(block_cols));
      acc_t* probs_data = probs.data_ptr<acc_t>();
      const acc_t* dprobs_data = dprobs.const_data_ptr<acc_t>();
      for (int64_t block = block_begin; block < block_end; ++block) {
        const int64_t col0 = block * block_cols;
        const int64_t n_cols = std::min(block_cols, cols - col0);
        const at::Tensor w = weight_block(weight, col0, col0 + n_cols, weight_buffer);
        // grad_weight's rows of this block; undefined when the weight needs no gradient
        at::Tensor gw =
            weight_grad ? grad_weight_block.narrow(0, 0, n_cols).zero_() : at::Tensor();
        for (int64_t row0 = 0; row0 < rows; row0 += tile_rows) {
          const int64_t n_rows = std::min(tile_rows, rows - row0);
          at::Tensor p_tile = probs.narrow(0, 0, n_rows).narrow(1, 0, n_cols);
          at::Tensor dp_tile = dprobs.narrow(0, 0, n_rows).narrow(1, 0, n_cols);
          const at::Tensor go_tile = go.narrow(0, row0, n_rows);
          at::mm_out(dp_tile, go_tile, w.t());
          for (int64_t r = 0; r < n_rows; ++r) {
            const int64_t row = row0 + r;
            acc_t* p_row = probs_data + r * block_cols;
            scores_and_argmax<scalar_t, acc_t>(x + row * cols + col0, row, col0, n_cols, seed,
                                               tau_c, p_row, noise.data());
            exp_shift_sum_of(p_row, n_cols, lse_data[row]);
            const acc_t* dp_row = dprobs_data + r * block_cols;
            const acc_t c = go_dot_out_data[row];
            scalar_t* gx_row = gx + row * cols + col0;
            for (int64_t i = 0; i < n_cols; ++i) {
              gx_row[i] = static_cast<scalar_t>(p_row[i] * (dp_row[i] - c) / tau_c);
            }
          }
          if (weight_grad) gw.addmm_(p_tile.t(), go_tile);
        }
        if (weight_grad) grad_weight.narrow(0, col0, n_cols).copy_(gw);
      }
    });
  });
  return {grad_logits, grad_weight};
}

}  // namespace

// Schemas in csrc/ops.cpp. Registered for the CPU dispatch key, so that tensors of other devices
// (meta and fake tensors included) get a dispatcher error instead of reaching the kernels.
TORCH_LIBRARY_IMPL(rlgaf_fast_C, CPU, m) {
  m.impl("gumbel_softmax_fwd", &gumbel_softmax_fwd);
  m.impl("gumbel_softmax_bwd", &gumbel_softmax_bwd);
  m.impl("gumbel_softmax_bwd_from_logits", &gumbel_softmax_bwd_from_logits);
  m.impl("gumbel_softmax_embedding_fwd", &gumbel_softmax_embedding_fwd);
  m.impl("gumbel_softmax_embedding_bwd", &gumbel_softmax_embedding_bwd);
}
