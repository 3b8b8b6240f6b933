// Fused PPO clipped policy loss on the CPU: per row of logits [N, V], one read of the row from
// memory, one exponential per element, and (when a gradient is wanted) the gradient written in
// the same visit of the row, while the row is still in cache.
//
// Per row n, with t_v = (x_v - max_v x_v) / temperature:
//   sum_e = sum_v exp(t_v), log_sum = log(sum_e), p_v = exp(t_v) / sum_e,
//   logp  = t_a - log_sum for the action a,
//   H     = -sum_v p_v log p_v = log_sum - sum_v p_v t_v.
// The op layer turns the loss into per-token weights w_n = d loss / d loss_n; the kernel turns
// loss_n = pg(logp) + kl_coef * kl(logp) - entropy_coef * H into the coefficients
//   c_lp = w_n * d(pg + kl_coef * kl) / d logp,  c_H = -w_n * entropy_coef,
// and with d logp / d x_v = (delta_av - p_v) / T and d H / d x_v = -p_v (log p_v + H) / T writes
//   grad_v = (c_lp (delta_av - p_v) - c_H p_v (log p_v + H)) / T
//          = exp(t_v) * (alpha + beta * t_v) + delta_av * c_lp / T,
//   alpha = (-c_lp - c_H (H - log_sum)) / (T sum_e),  beta = -c_H / (T sum_e).
// ppo_loss_fwd_vjp takes c_lp and c_H per token instead (the gradient of any function of the
// log-probabilities and entropies, its coefficients computed in torch).
// A row takes three sweeps: the maximum (from memory), the exponentials into a per-thread
// scratch row with the two sums, and the gradient; the last two read the row from cache.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "../error_format.h"
#include "checks.h"
#include "fast_math.h"

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace rlgaf_fast {
namespace cpu {
namespace {

// The row sweeps are written on GCC/Clang vector types of one native register (64 bytes with
// AVX-512, else 32), which vectorises them whatever the loop shapes. Wider than the registers,
// GCC lowers compares and selects one element at a time, several times slower.
#ifdef __AVX512F__
#define RLGAF_VEC_BYTES 64
#else
#define RLGAF_VEC_BYTES 32
#endif
template <typename acc_t>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(RLGAF_VEC_BYTES)));
  typedef int32_t int_type __attribute__((vector_size(RLGAF_VEC_BYTES)));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(RLGAF_VEC_BYTES)));
  typedef int64_t int_type __attribute__((vector_size(RLGAF_VEC_BYTES)));
};
template <typename acc_t>
using vec = typename VecOf<acc_t>::type;
template <typename acc_t>
constexpr int64_t kWidth = RLGAF_VEC_BYTES / sizeof(acc_t);

// bfloat16 words and their float bits, one vec<float> of lanes
typedef uint16_t u16_lanes __attribute__((vector_size(RLGAF_VEC_BYTES / 2)));
typedef uint32_t u32_lanes __attribute__((vector_size(RLGAF_VEC_BYTES)));

// t_v is clamped from below so that exp(t_v) * t_v is 0, not NaN, for -inf logits; exp of the
// clamp is 0 in both precisions.
template <typename acc_t>
constexpr acc_t lowest_t() {
  return std::is_same<acc_t, float>::value ? acc_t(-100) : acc_t(-800);
}

// Reinterprets a vector's bits as another vector type of the same size. A reinterpret_cast
// between them breaks strict aliasing (the element types differ); memcpy is the defined way,
// and it compiles to nothing.
template <typename To, typename From>
static inline To bits_as(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bits_as needs types of one size");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

// exp of a vector of floats: fast_expf's algorithm (fast_math.h) on vectors; -inf and x < -86 give 0.
static inline vec<float> exp_of(vec<float> x) {
  typedef VecOf<float>::int_type ivec;
  const float lowest = -86.0f, round_magic = 12582912.0f;
  const vec<float> clamped = x < lowest ? vec<float>{} + lowest : x;
  const vec<float> shifted = clamped * kLog2E + round_magic;
  const ivec n = bits_as<ivec>(shifted) - static_cast<int32_t>(float_bits(round_magic));
  const vec<float> nf = shifted - round_magic;
  const vec<float> r = (clamped - nf * kLn2Hi) - nf * kLn2Lo;
  vec<float> q = vec<float>{} + 0.0013814611593261361f;
  q = q * r + 0.008368710055947304f;
  q = q * r + 0.04166838899254799f;
  q = q * r + 0.1666652113199234f;
  q = q * r + 0.4999999403953552f;
  const vec<float> exp_r = 1.0f + (r + r * r * q);
  const ivec two_to_n_bits = (n + 127) << 23;
  const vec<float> y = exp_r * bits_as<vec<float>>(two_to_n_bits);
  return x < lowest ? vec<float>{} : y;
}

static inline vec<double> exp_of(vec<double> x) {  // float64 is the testing precision
  for (int j = 0; j < kWidth<double>; ++j) x[j] = std::exp(x[j]);
  return x;
}

template <typename acc_t>
static inline vec<acc_t> splat(acc_t value) {
  return vec<acc_t>{} + value;
}

// A block of kWidth elements as acc_t; n < kWidth real elements pad the rest with `pad`.
template <typename acc_t, typename scalar_t>
static inline vec<acc_t> load(const scalar_t* x) {
  vec<acc_t> v;
  for (int j = 0; j < kWidth<acc_t>; ++j) v[j] = static_cast<acc_t>(x[j]);
  return v;
}
template <>
inline vec<float> load<float, float>(const float* x) {
  vec<float> v;
  std::memcpy(&v, x, sizeof(v));
  return v;
}
template <>
inline vec<float> load<float, c10::BFloat16>(const c10::BFloat16* x) {
  u16_lanes half_words;
  std::memcpy(&half_words, x, sizeof(half_words));
  const u32_lanes bits = __builtin_convertvector(half_words, u32_lanes) << 16;
  return bits_as<vec<float>>(bits);
}
template <typename acc_t, typename scalar_t>
static inline vec<acc_t> load_part(const scalar_t* x, int64_t n, acc_t pad) {
  vec<acc_t> v = splat(pad);
  for (int64_t j = 0; j < n; ++j) v[j] = static_cast<acc_t>(x[j]);
  return v;
}

// Stores the first n (default all) elements of v as grad_t.
template <typename grad_t, typename acc_t>
static inline void store(grad_t* out, vec<acc_t> v, int64_t n = kWidth<acc_t>) {
  for (int64_t j = 0; j < n; ++j) out[j] = static_cast<grad_t>(v[j]);
}
template <>
inline void store<float, float>(float* out, vec<float> v, int64_t n) {
  std::memcpy(out, &v, n * sizeof(float));
}
template <>
inline void store<c10::BFloat16, float>(c10::BFloat16* out, vec<float> v, int64_t n) {
  // Round to nearest even, as c10::BFloat16(float); NaN stays a (quiet) NaN.
  const u32_lanes bits = bits_as<u32_lanes>(v);
  const u32_lanes rounded = (bits + (0x7fffu + ((bits >> 16) & 1u))) >> 16;
  const u32_lanes result = v != v ? u32_lanes{} + 0x7fc0u : rounded;
  const u16_lanes half_words = __builtin_convertvector(result, u16_lanes);
  std::memcpy(out, &half_words, n * sizeof(uint16_t));
}

template <typename acc_t>
static inline acc_t lane_sum(vec<acc_t> v) {
  acc_t sum = 0;
  for (int j = 0; j < kWidth<acc_t>; ++j) sum += v[j];
  return sum;
}

template <typename acc_t>
static inline vec<acc_t> shifted_logits(vec<acc_t> x, acc_t max_x, acc_t inv_temp) {
  const vec<acc_t> t = (x - max_x) * inv_temp;
  return t < lowest_t<acc_t>() ? splat(lowest_t<acc_t>()) : t;
}

template <typename scalar_t, typename acc_t>
acc_t row_max(const scalar_t* x, int64_t V) {
  constexpr int64_t W = kWidth<acc_t>;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  vec<acc_t> lane_max = splat(neg_inf);
  int64_t i = 0;
  for (; i + W <= V; i += W) {
    const vec<acc_t> block = load<acc_t>(x + i);
    lane_max = block > lane_max ? block : lane_max;
  }
  const vec<acc_t> block = load_part(x + i, V - i, neg_inf);
  lane_max = block > lane_max ? block : lane_max;
  acc_t result = lane_max[0];
  for (int j = 1; j < W; ++j) result = lane_max[j] > result ? lane_max[j] : result;
  return result;
}

// Sums exp(t_v) and exp(t_v) * t_v over the row; with kStore also writes exp(t_v) to e (which
// has room for a whole last block). Lane sums of kSumBlock elements are added up in double, so
// that the sums stay accurate for the largest vocabularies at the cost of one add per block.
constexpr int64_t kSumBlock = 1024;

template <bool kStore, typename scalar_t, typename acc_t>
void row_exp(const scalar_t* x, int64_t V, acc_t max_x, acc_t inv_temp, acc_t* __restrict__ e,
             acc_t& sum_e, acc_t& sum_et) {
  constexpr int64_t W = kWidth<acc_t>;
  static_assert(kSumBlock % W == 0, "blocks of whole vectors");
  double total_e = 0, total_et = 0;
  for (int64_t begin = 0; begin < V; begin += kSumBlock) {
    const int64_t end = std::min(V, begin + kSumBlock);
    vec<acc_t> lane_e{}, lane_et{};
    auto step = [&](vec<acc_t> block, int64_t i) {
      const vec<acc_t> t = shifted_logits(block, max_x, inv_temp);
      const vec<acc_t> exps = exp_of(t);
      lane_e += exps;
      lane_et += exps * t;
      if (kStore) std::memcpy(e + i, &exps, sizeof(exps));
    };
    int64_t i = begin;
    for (; i + W <= end; i += W) step(load<acc_t>(x + i), i);
    if (i < end) step(load_part(x + i, end - i, -std::numeric_limits<acc_t>::infinity()), i);
    total_e += lane_sum<acc_t>(lane_e);
    total_et += lane_sum<acc_t>(lane_et);
  }
  sum_e = static_cast<acc_t>(total_e);
  sum_et = static_cast<acc_t>(total_et);
}

// grad_v = e_v * (alpha + beta * t_v). grad may be the logits buffer itself (in place): each
// block is read before it is written.
template <typename scalar_t, typename grad_t, typename acc_t>
void row_grad(const scalar_t* x, const acc_t* __restrict__ e, int64_t V, acc_t max_x,
              acc_t inv_temp, acc_t alpha, acc_t beta, grad_t* grad) {
  constexpr int64_t W = kWidth<acc_t>;
  auto block_grad = [&](const scalar_t* xi, const acc_t* ei, int64_t n) {
    vec<acc_t> exps;
    std::memcpy(&exps, ei, sizeof(exps));
    if (beta == 0) return exps * alpha;
    const vec<acc_t> block = n == W ? load<acc_t>(xi) : load_part(xi, n, max_x);
    return exps * (alpha + beta * shifted_logits(block, max_x, inv_temp));
  };
  int64_t i = 0;
  for (; i + W <= V; i += W) store<grad_t, acc_t>(grad + i, block_grad(x + i, e + i, W));
  if (i < V) store<grad_t, acc_t>(grad + i, block_grad(x + i, e + i, V - i), V - i);
}

template <typename acc_t>
struct LossParams {
  acc_t ratio_low, ratio_high, dual_clip, kl_coef, entropy_coef, inv_temp;
  int64_t kl_estimator;  // 0: no KL term, 1: k1, 2: k2, 3: k3
};

// d (pg + kl_coef * kl) / d logp for one token. The ties of the clipping follow torch's
// maximum/clamp (which split or pass the gradient so that every tie has the same value as here);
// at an exact tie with the dual-clip bound torch.minimum would pass half the gradient, this the
// whole (an event of probability zero for real-valued log-probabilities).
template <typename acc_t>
acc_t dloss_dlogp(acc_t logp, acc_t old_logp, acc_t adv, acc_t ref_logp,
                  const LossParams<acc_t>& p) {
  // The log-ratio is clamped (as verl and OpenRLHF do) so that exp never overflows; like
  // torch.clamp, the clamp passes no gradient outside its range.
  const acc_t log_ratio = logp - old_logp;
  const bool in_range = log_ratio >= acc_t(-20) && log_ratio <= acc_t(20);
  const acc_t ratio = std::exp(std::min(std::max(log_ratio, acc_t(-20)), acc_t(20)));
  const acc_t unclipped = -adv * ratio;
  const acc_t clipped_ratio = std::min(std::max(ratio, p.ratio_low), p.ratio_high);
  const acc_t clipped = -adv * clipped_ratio;
  // Where the clipped term is strictly larger the ratio is outside the range: no gradient.
  acc_t d_ratio = clipped > unclipped ? acc_t(0) : -adv;
  const acc_t pg = std::max(unclipped, clipped);
  if (p.dual_clip > 0 && adv < 0 && pg > -p.dual_clip * adv) d_ratio = 0;
  acc_t d = in_range ? d_ratio * ratio : acc_t(0);
  if (p.kl_estimator != 0 && p.kl_coef != 0) {
    const acc_t diff = logp - ref_logp;
    const acc_t d_kl = p.kl_estimator == 1 ? acc_t(1)
                       : p.kl_estimator == 2 ? diff
                                             : acc_t(1) - std::exp(-diff);
    d += p.kl_coef * d_kl;
  }
  return d;
}

// coefficients(n, logp, h, c_lp, c_h) sets the row's coefficients and returns false for a row
// that gets no gradient at all.
template <typename scalar_t, typename grad_t, typename acc_t, typename Coefficients>
void ppo_rows(const at::Tensor& logits, const int64_t* actions, acc_t inv_temp,
              const Coefficients& coefficients, grad_t* grad, acc_t* logprobs, acc_t* entropy,
              acc_t* lse = nullptr) {
  const int64_t N = logits.size(0), V = logits.size(1);
  const scalar_t* x_all = logits.data_ptr<scalar_t>();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    // exp(t_v) of the current row, padded to a whole last block.
    std::vector<acc_t> scratch(grad != nullptr ? V + kWidth<acc_t> : 0);
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* x = x_all + n * V;
      const int64_t a = actions[n];
      const acc_t max_x = row_max<scalar_t, acc_t>(x, V);
      acc_t sum_e, sum_et;
      if (grad != nullptr) {
        row_exp<true>(x, V, max_x, inv_temp, scratch.data(), sum_e, sum_et);
      } else {
        row_exp<false>(x, V, max_x, inv_temp, scratch.data(), sum_e, sum_et);
      }
      const acc_t log_sum = std::log(sum_e);
      const acc_t h = log_sum - sum_et / sum_e;
      acc_t t_a = (static_cast<acc_t>(x[a]) - max_x) * inv_temp;
      const acc_t logp = t_a - log_sum;
      logprobs[n] = logp;
      entropy[n] = h;
      if (lse != nullptr) lse[n] = max_x * inv_temp + log_sum;
      if (grad == nullptr) continue;
      grad_t* g = grad + n * V;
      acc_t c_lp, c_h;
      if (!coefficients(n, logp, h, c_lp, c_h)) {
        std::fill(g, g + V, grad_t(0));
        continue;
      }
      const acc_t scale = inv_temp / sum_e;
      const acc_t alpha = (-c_lp - c_h * (h - log_sum)) * scale;
      const acc_t beta = -c_h * scale;
      row_grad(x, scratch.data(), V, max_x, inv_temp, alpha, beta, g);
      // The action's element, recomputed from the scratch row (x[a] may be overwritten).
      t_a = t_a < lowest_t<acc_t>() ? lowest_t<acc_t>() : t_a;
      g[a] = static_cast<grad_t>(scratch[a] * (alpha + beta * t_a) + c_lp * inv_temp);
    }
  });
}

// Asks the kernel to back the 2 MiB-aligned inside of a large, freshly allocated buffer with
// huge pages before its first write. On virtual machines a 4 KiB page fault can cost
// microseconds, which for a [2048, 32000] float gradient is more than the whole kernel; torch's
// allocator does the same under THP_MEM_ALLOC_ENABLE=1. A hint only: pages already present and
// kernels without transparent huge pages are unaffected.
void advise_huge_pages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  if (bytes < int64_t(16 * kHuge)) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

void check_rows(const at::Tensor& logits, const at::Tensor& actions) {
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 2 && logits.is_contiguous(),
              "ppo_loss kernel: logits must be a contiguous 2-D CPU tensor");
  TORCH_CHECK(logits.size(1) >= 1, "ppo_loss kernel: logits need V >= 1");
  TORCH_CHECK(actions.device().is_cpu() && actions.dim() == 1 && actions.is_contiguous() &&
                  actions.scalar_type() == at::kLong && actions.size(0) == logits.size(0),
              "ppo_loss kernel: actions must be contiguous int64 [N]");
  // The op layer checks the range in eager mode only; an action outside it would read outside
  // the row.
  const int64_t* a = actions.data_ptr<int64_t>();
  const int64_t V = logits.size(1);
  bool in_range = true;
  for (int64_t n = 0; n < actions.size(0); ++n) in_range &= a[n] >= 0 && a[n] < V;
  TORCH_CHECK(in_range, "ppo_loss kernel: actions must be in [0, ", rlgaf_fast::num_str(V), ")");
}

void check_token(const at::Tensor& t, const at::Tensor& logits, at::ScalarType dtype,
                 const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 1 && t.is_contiguous() &&
                  t.scalar_type() == dtype && t.size(0) == logits.size(0),
              "ppo_loss kernel: ", name, " must be contiguous [N] in the compute dtype");
}

void check_grad_logits(const at::Tensor& grad_logits, const at::Tensor& logits) {
  TORCH_CHECK(grad_logits.device().is_cpu() && grad_logits.is_contiguous() &&
                  grad_logits.sizes() == logits.sizes() &&
                  grad_logits.scalar_type() == logits.scalar_type(),
              "ppo_loss kernel: grad_logits must be contiguous, shaped and typed as logits");
}

at::ScalarType compute_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Dispatches on the logits dtype; grad (if defined) has the logits' dtype.
template <typename Fn>
void dispatch_logits(const at::Tensor& logits, Fn&& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ppo_loss",
                                  [&] { fn(scalar_t(), compute_t<scalar_t>()); });
}

// logprobs and entropy of each row's action under softmax(logits / temperature), and each row's
// logsumexp(logits / temperature).
std::tuple<at::Tensor, at::Tensor, at::Tensor> ppo_loss_fwd(const at::Tensor& logits,
                                                            const at::Tensor& actions,
                                                            double temperature) {
  check_rows(logits, actions);
  TORCH_CHECK(temperature > 0, "ppo_loss kernel: temperature must be > 0");
  const auto options = logits.options().dtype(compute_dtype(logits));
  at::Tensor logprobs = at::empty({logits.size(0)}, options);
  at::Tensor entropy = at::empty({logits.size(0)}, options);
  at::Tensor lse = at::empty({logits.size(0)}, options);
  dispatch_logits(logits, [&](auto scalar, auto acc) {
    using scalar_t = decltype(scalar);
    using acc_t = decltype(acc);
    auto none = [](int64_t, acc_t, acc_t, acc_t&, acc_t&) { return false; };
    ppo_rows<scalar_t, scalar_t, acc_t>(
        logits, actions.data_ptr<int64_t>(), acc_t(1.0 / temperature), none, nullptr,
        logprobs.data_ptr<acc_t>(), entropy.data_ptr<acc_t>(), lse.data_ptr<acc_t>());
  });
  return {logprobs, entropy, lse};
}

// As ppo_loss_fwd, and writes d loss / d logits into grad_logits ([N, V], the logits' dtype;
// it may be the logits tensor itself) for the per-token weights token_weight.
std::tuple<at::Tensor, at::Tensor> ppo_loss_fwd_grad(
    const at::Tensor& logits, const at::Tensor& actions, const at::Tensor& old_logprobs,
    const at::Tensor& advantages, const c10::optional<at::Tensor>& ref_logprobs,
    const at::Tensor& token_weight, double ratio_low, double ratio_high, double dual_clip,
    double kl_coef, int64_t kl_estimator, double entropy_coef, double temperature,
    const at::Tensor& grad_logits) {
  check_rows(logits, actions);
  TORCH_CHECK(temperature > 0, "ppo_loss kernel: temperature must be > 0");
  TORCH_CHECK(kl_estimator >= 0 && kl_estimator <= 3, "ppo_loss kernel: kl_estimator in 0..3");
  const at::ScalarType dtype = compute_dtype(logits);
  check_token(old_logprobs, logits, dtype, "old_logprobs");
  check_token(advantages, logits, dtype, "advantages");
  check_token(token_weight, logits, dtype, "token_weight");
  const bool has_ref = ref_logprobs.has_value() && ref_logprobs->defined();
  if (has_ref) check_token(*ref_logprobs, logits, dtype, "ref_logprobs");
  check_grad_logits(grad_logits, logits);
  const auto options = logits.options().dtype(dtype);
  at::Tensor logprobs = at::empty({logits.size(0)}, options);
  at::Tensor entropy = at::empty({logits.size(0)}, options);
  if (!grad_logits.is_same(logits)) {
    advise_huge_pages(grad_logits.data_ptr(), grad_logits.numel() * grad_logits.element_size());
  }
  dispatch_logits(logits, [&](auto scalar, auto acc) {
    using scalar_t = decltype(scalar);
    using acc_t = decltype(acc);
    LossParams<acc_t> params;
    params.ratio_low = acc_t(ratio_low);
    params.ratio_high = acc_t(ratio_high);
    params.dual_clip = acc_t(dual_clip);
    params.kl_coef = acc_t(kl_coef);
    params.entropy_coef = acc_t(entropy_coef);
    params.inv_temp = acc_t(1.0 / temperature);
    params.kl_estimator = has_ref ? kl_estimator : 0;
    const acc_t* old = old_logprobs.data_ptr<acc_t>();
    const acc_t* adv = advantages.data_ptr<acc_t>();
    const acc_t* ref = has_ref ? ref_logprobs->data_ptr<acc_t>() : nullptr;
    const acc_t* w = token_weight.data_ptr<acc_t>();
    // a masked-out row (padding: -inf or NaN logits) has no gradient at all
    auto loss = [&](int64_t n, acc_t logp, acc_t, acc_t& c_lp, acc_t& c_h) {
      if (w[n] == 0) return false;
      c_lp = w[n] * dloss_dlogp(logp, old[n], adv[n], ref ? ref[n] : acc_t(0), params);
      c_h = -w[n] * params.entropy_coef;
      return true;
    };
    ppo_rows<scalar_t, scalar_t, acc_t>(logits, actions.data_ptr<int64_t>(), params.inv_temp,
                                        loss, grad_logits.data_ptr<scalar_t>(),
        logprobs.data_ptr<acc_t>(), entropy.data_ptr<acc_t>());
  });
  return {logprobs, entropy};
}


// As ppo_loss_fwd, and writes d(sum_n grad_logprobs[n] * logp_n + grad_entropy[n] * H_n)
// / d logits into grad_logits ([N, V], the logits' dtype; it may be the logits tensor itself).
// A row whose two coefficients are 0 gets a gradient of exactly 0.
std::tuple<at::Tensor, at::Tensor> ppo_loss_fwd_vjp(const at::Tensor& logits,
                                                    const at::Tensor& actions,
                                                    const at::Tensor& grad_logprobs,
                                                    const at::Tensor& grad_entropy,
                                                    double temperature,
                                                    const at::Tensor& grad_logits) {
  check_rows(logits, actions);
  TORCH_CHECK(temperature > 0, "ppo_loss kernel: temperature must be > 0");
  const at::ScalarType dtype = compute_dtype(logits);
  check_token(grad_logprobs, logits, dtype, "grad_logprobs");
  check_token(grad_entropy, logits, dtype, "grad_entropy");
  check_grad_logits(grad_logits, logits);
  const auto options = logits.options().dtype(dtype);
  at::Tensor logprobs = at::empty({logits.size(0)}, options);
  at::Tensor entropy = at::empty({logits.size(0)}, options);
  dispatch_logits(logits, [&](auto scalar, auto acc) {
    using scalar_t = decltype(scalar);
    using acc_t = decltype(acc);
    const acc_t* g_lp = grad_logprobs.data_ptr<acc_t>();
    const acc_t* g_h = grad_entropy.data_ptr<acc_t>();
    auto given = [&](int64_t n, acc_t, acc_t, acc_t& c_lp, acc_t& c_h) {
      c_lp = g_lp[n];
      c_h = g_h[n];
      return !(c_lp == 0 && c_h == 0);
    };
    ppo_rows<scalar_t, scalar_t, acc_t>(logits, actions.data_ptr<int64_t>(),
                                        acc_t(1.0 / temperature), given,
                                        grad_logits.data_ptr<scalar_t>(),
                                        logprobs.data_ptr<acc_t>(), entropy.data_ptr<acc_t>());
  });
  return {logprobs, entropy};
}

// As ppo_loss_fwd_vjp, in one sweep of each row, for rows whose logsumexp(logits / T) and
// entropy a ppo_loss_fwd of the same logits gave: with q_v = x_v / T - lse (log p_v),
//   grad_v = p_v * (a + b * q_v) + delta_av * c_lp / T,  a = -(c_lp + c_H H) / T,  b = -c_H / T.
void ppo_loss_vjp_lse(const at::Tensor& logits, const at::Tensor& actions,
                      const at::Tensor& grad_logprobs, const at::Tensor& grad_entropy,
                      const at::Tensor& lse, const at::Tensor& entropy, double temperature,
                      const at::Tensor& grad_logits) {
  check_rows(logits, actions);
  TORCH_CHECK(temperature > 0, "ppo_loss kernel: temperature must be > 0");
  const at::ScalarType dtype = compute_dtype(logits);
  check_token(grad_logprobs, logits, dtype, "grad_logprobs");
  check_token(grad_entropy, logits, dtype, "grad_entropy");
  check_token(lse, logits, dtype, "lse");
  check_token(entropy, logits, dtype, "entropy");
  check_grad_logits(grad_logits, logits);
  const int64_t N = logits.size(0), V = logits.size(1);
  dispatch_logits(logits, [&](auto scalar, auto acc) {
    using scalar_t = decltype(scalar);
    using acc_t = decltype(acc);
    constexpr int64_t W = kWidth<acc_t>;
    const scalar_t* x_all = logits.data_ptr<scalar_t>();
    scalar_t* g_all = grad_logits.data_ptr<scalar_t>();
    const int64_t* a_all = actions.data_ptr<int64_t>();
    const acc_t* g_lp = grad_logprobs.data_ptr<acc_t>();
    const acc_t* g_h = grad_entropy.data_ptr<acc_t>();
    const acc_t* lse_all = lse.data_ptr<acc_t>();
    const acc_t* h_all = entropy.data_ptr<acc_t>();
    const acc_t inv_temp = acc_t(1.0 / temperature);
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const scalar_t* x = x_all + n * V;
        scalar_t* g = g_all + n * V;
        const acc_t c_lp = g_lp[n], c_h = g_h[n], row_lse = lse_all[n];
        if (c_lp == 0 && c_h == 0) {  // a masked-out row: exactly 0, whatever its logits
          std::fill(g, g + V, scalar_t(0));
          continue;
        }
        const acc_t alpha = -(c_lp + c_h * h_all[n]) * inv_temp, beta = -c_h * inv_temp;
        // q >= lowest_t keeps p * q at 0 rather than NaN for -inf logits
        auto grad_of = [&](vec<acc_t> block) {
          vec<acc_t> q = block * inv_temp - row_lse;
          q = q < lowest_t<acc_t>() ? splat(lowest_t<acc_t>()) : q;
          return exp_of(q) * (alpha + beta * q);
        };
        const int64_t a = a_all[n];
        // the action's element, from its logit before the sweep may overwrite it
        acc_t x_a[W] = {};
        x_a[0] = static_cast<acc_t>(x[a]);
        const acc_t g_a = grad_of(load<acc_t>(x_a))[0] + c_lp * inv_temp;
        int64_t i = 0;
        for (; i + W <= V; i += W) store<scalar_t, acc_t>(g + i, grad_of(load<acc_t>(x + i)));
        if (i < V) store<scalar_t, acc_t>(g + i, grad_of(load_part(x + i, V - i, acc_t(0))), V - i);
        g[a] = static_cast<scalar_t>(g_a);
      }
    });
  });
}

}  // namespace
}  // namespace cpu
}  // namespace rlgaf_fast

// Schemas in csrc/ops.cpp.
TORCH_LIBRARY_IMPL(rlgaf_fast_C, CPU, m) {
  m.impl("ppo_loss_fwd", &rlgaf_fast::cpu::ppo_loss_fwd);
  m.impl("ppo_loss_fwd_grad", &rlgaf_fast::cpu::ppo_loss_fwd_grad);
  m.impl("ppo_loss_fwd_vjp", &rlgaf_fast::cpu::ppo_loss_fwd_vjp);
  m.impl("ppo_loss_vjp_lse", &rlgaf_fast::cpu::ppo_loss_vjp_lse);
}
