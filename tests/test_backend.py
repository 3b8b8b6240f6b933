import os

import pytest
import torch

import rlgaf_fast
from rlgaf_fast._backend import resolve_backend


def test_available_backends_lists_torch_and_what_was_built():
    found = rlgaf_fast.available_backends()
    assert found[0] == "torch"
    if os.environ.get("RLGAF_FAST_EXPECT_CPP") == "1":  # set by .ci/run, which builds it
        assert "cpp" in found


def test_scope_and_environment_choose_the_backend(monkeypatch):
    x = torch.randn(2, 3)
    with rlgaf_fast.use_backend("torch"):
        assert resolve_backend("auto", x) == "torch"
    monkeypatch.setenv("RLGAF_FAST_BACKEND", "torch")
    assert resolve_backend("auto", x) == "torch"
    monkeypatch.setenv("RLGAF_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="RLGAF_FAST_BACKEND"):
        resolve_backend("auto", x)
    with pytest.raises(ValueError, match="name must be"):
        with rlgaf_fast.use_backend("fastest"):
            pass


def test_explicit_backend_on_the_wrong_device_is_an_error():
    if "cpp" not in rlgaf_fast.available_backends() or not torch.cuda.is_available():
        pytest.skip("needs the C++ extension and a GPU")
    with pytest.raises(RuntimeError, match="runs on CPU tensors"):
        resolve_backend("cpp", torch.randn(2, device="cuda"))


def test_cpp_kernel_errors_print_numbers_shapes_and_dtypes():
    # The kernels' own checks (reached by direct calls that skip the op layer) format numbers
    # as strings; streaming them crashed the process on the GPU image (csrc/error_format.h).
    if "cpp" not in rlgaf_fast.available_backends():
        pytest.skip("C++ extension not built")
    ops = torch.ops.rlgaf_fast_cpu
    logits = torch.randn(3, 5)
    with pytest.raises(RuntimeError, match=r"tau must be > 0, got -1\.5"):
        ops.gumbel_softmax_fwd(logits, -1.5, False, 0)
    with pytest.raises(RuntimeError, match=r"seed must be in \[0, 2\^63\), got -7"):
        ops.gumbel_softmax_fwd(logits, 1.0, False, -7)
    with pytest.raises(RuntimeError, match=r"must be 2-D \[N, V\], got shape \[5\]"):
        ops.gumbel_softmax_fwd(torch.randn(5), 1.0, False, 0)
    with pytest.raises(
        RuntimeError,
        match=r"must be float16, bfloat16, float32 or float64, "
        r"got Long",
    ):
        ops.gumbel_softmax_fwd(torch.ones(3, 5, dtype=torch.long), 1.0, False, 0)
    with pytest.raises(RuntimeError, match=r"weight must have V = 5 rows .* got shape \[4, 2\]"):
        ops.gumbel_softmax_embedding_fwd(logits, torch.randn(4, 2), 1.0, 0)
    with pytest.raises(RuntimeError, match=r"actions must be in \[0, 5\)"):
        torch.ops.rlgaf_fast_cpu.ppo_loss_fwd(logits, torch.tensor([0, 5, 1]), 1.0)


def test_auto_passes_over_a_backend_without_the_ops_kernel(monkeypatch):
    """On a GPU where Triton is missing but the CUDA extension is built, "auto" must not pick
    cuda for an op without a CUDA kernel (the PPO losses): it falls back to torch, saying so."""
    from rlgaf_fast import _backend

    monkeypatch.setattr(_backend, "_triton", lambda: (False, "not installed"))
    monkeypatch.setattr(_backend, "cuda_available", lambda: True)
    _backend._say_torch_fallback_once.cache_clear()
    assert _backend._auto_backend("cuda") == "cuda"
    with pytest.warns(UserWarning, match="the CUDA extension has no kernel of this op"):
        assert _backend._auto_backend("cuda", lacks=("cuda",)) == "torch"
    monkeypatch.setattr(_backend, "_triton", lambda: (True, ""))
    assert _backend._auto_backend("cuda", lacks=("cuda",)) == "triton"
