// The Python module rlgaf_fast._C and the one declaration of every C++ operator's schema.
//
// Each schema is declared here once, in the namespace rlgaf_fast_C; the CPU kernels register in
// their own files (TORCH_LIBRARY_IMPL(rlgaf_fast_C, CPU, m)), so that a tensor on another device
// gets the dispatcher's error instead of a stray call. Importing this module registers them.
#include <torch/extension.h>
#include <torch/library.h>

#ifdef _OPENMP
#include <omp.h>
#endif

TORCH_LIBRARY(rlgaf_fast_C, m) {
  // Gumbel-Softmax rows (csrc/cpu/gumbel_softmax.cpp)
  m.def("gumbel_softmax_fwd(Tensor logits, float tau, bool hard, int seed) -> (Tensor, Tensor)");
  m.def("gumbel_softmax_bwd(Tensor grad_y, Tensor y, float tau) -> Tensor");
  m.def(
      "gumbel_softmax_bwd_from_logits(Tensor grad_y, Tensor logits, float tau, int seed) -> "
      "Tensor");
  // fused Gumbel-Softmax -> embedding (csrc/cpu/gumbel_softmax.cpp)
  m.def(
      "gumbel_softmax_embedding_fwd(Tensor logits, Tensor weight, float tau, int seed) -> "
      "(Tensor, Tensor, Tensor)");
  m.def(
      "gumbel_softmax_embedding_bwd(Tensor grad_out, Tensor logits, Tensor weight, Tensor out, "
      "Tensor lse, float tau, int seed, bool weight_grad) -> (Tensor, Tensor)");
  // top-k soft embedding (csrc/cpu/soft_embedding.cpp)
  m.def(
      "soft_embedding_topk_fwd(Tensor probs, Tensor weight, int k) -> "
      "(Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "soft_embedding_topk_bwd(Tensor grad_out, Tensor weight, Tensor out, Tensor index, "
      "Tensor coef, Tensor row_sum, ScalarType probs_dtype) -> (Tensor, Tensor)");
  // PPO clipped policy loss (csrc/cpu/ppo_loss.cpp)
  m.def(
      "ppo_loss_fwd(Tensor logits, Tensor actions, float temperature) -> "
      "(Tensor, Tensor, Tensor)");
  m.def(
      "ppo_loss_fwd_grad(Tensor logits, Tensor actions, Tensor old_logprobs, Tensor advantages, "
      "Tensor? ref_logprobs, Tensor token_weight, float ratio_low, float ratio_high, "
      "float dual_clip, float kl_coef, int kl_estimator, float entropy_coef, float temperature, "
      "Tensor(a!) grad_logits) -> (Tensor, Tensor)");
  m.def(
      "ppo_loss_fwd_vjp(Tensor logits, Tensor actions, Tensor grad_logprobs, "
      "Tensor grad_entropy, float temperature, Tensor(a!) grad_logits) -> (Tensor, Tensor)");
  m.def(
      "ppo_loss_vjp_lse(Tensor logits, Tensor actions, Tensor grad_logprobs, "
      "Tensor grad_entropy, Tensor lse, Tensor entropy, float temperature, "
      "Tensor(a!) grad_logits) -> ()");
}

static int num_threads() { return at::get_num_threads(); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("num_threads", &num_threads, "intra-op threads the CPU kernels use");
}
