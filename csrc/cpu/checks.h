// Input checks and the accumulation type shared by the CPU kernels. Messages name the op and the
// argument, and format everything as strings (error_format.h).
#pragma once

#include <ATen/ATen.h>

#include <type_traits>

#include "../error_format.h"

namespace rlgaf_fast {
namespace cpu {

// float for float16/bfloat16/float32 inputs, double for float64.
template <typename scalar_t>
using compute_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// A contiguous 2-D CPU tensor of a floating dtype; `layout` names its dimensions ("[N, V]").
inline void check_float_matrix(const char* op, const char* name, const at::Tensor& t,
                               const char* layout) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", device_str(t));
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D ", layout, ", got shape ",
              shape_str(t.sizes()));
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  const at::ScalarType dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat ||
                  dtype == at::kDouble,
              op, ": ", name, " must be float16, bfloat16, float32 or float64, got ",
              dtype_str(dtype));
}

// The embedding matrix weight [V, D] for rows over a vocabulary of `vocab` (the last size of
// the tensor named `rows_name`).
inline void check_weight(const char* op, const at::Tensor& weight, int64_t vocab,
                         const char* rows_name) {
  check_float_matrix(op, "weight", weight, "[V, D]");
  TORCH_CHECK(weight.size(0) == vocab, op, ": weight must have V = ", num_str(vocab),
              " rows (the last size of ", rows_name, "), got shape ", shape_str(weight.sizes()));
}

}  // namespace cpu
}  // namespace rlgaf_fast
