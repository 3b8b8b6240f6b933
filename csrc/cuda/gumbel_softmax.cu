// CUDA kernels of the Gumbel-Softmax rows (forward, backward, backward from the logits),
// registered for the CUDA dispatch key of torch.ops.rlgaf_fast_C.* (schemas in csrc/ops.cpp).
//
// Kernel contract: see the op layer (rlgaf_fast/ops/gumbel_softmax.py). Inputs arrive 2-D and
// contiguous. This is the second GPU path (Triton is the first): plain, obviously correct
// kernels. One block per row, an online max and sum in a first sweep, the output in a second
// sweep that regenerates the noise instead of storing it. Shared helpers: gumbel_common.cuh.

#include "gumbel_common.cuh"

namespace rlgaf_fast_cuda {
namespace {

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

// ------------------------------------------------------------------------------------------------
// Host side.

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

}  // namespace
}  // namespace rlgaf_fast_cuda

TORCH_LIBRARY_IMPL(rlgaf_fast_C, CUDA, m) {
  m.impl("gumbel_softmax_fwd", &rlgaf_fast_cuda::gumbel_softmax_fwd);
  m.impl("gumbel_softmax_bwd", &rlgaf_fast_cuda::gumbel_softmax_bwd);
  m.impl("gumbel_softmax_bwd_from_logits", &rlgaf_fast_cuda::gumbel_softmax_bwd_from_logits);
}
