import importlib
import importlib.util
import os
import warnings

import pytest
import torch

import rlgaf_fast
from rlgaf_fast import reference
from rlgaf_fast._backend import resolve_backend
from rlgaf_fast.ops import registry


def test_available_backends_lists_torch_and_what_was_built():
    found = rlgaf_fast.available_backends()
    assert found[0] == "torch"
    if os.environ.get("RLGAF_FAST_EXPECT_CPP") == "1":  # set by .ci/run, which builds it
        assert "cpp" in found


def test_scope_and_environment_choose_the_backend(monkeypatch):
    x = torch.randn(2, 3)
    with rlgaf_fast.use_backend("torch"):
        assert resolve_backend("auto", x, "gumbel_softmax") == "torch"
    monkeypatch.setenv("RLGAF_FAST_BACKEND", "torch")
    assert resolve_backend("auto", x, "gumbel_softmax") == "torch"
    monkeypatch.setenv("RLGAF_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="RLGAF_FAST_BACKEND"):
        resolve_backend("auto", x, "gumbel_softmax")
    with pytest.raises(ValueError, match="name must be"):
        with rlgaf_fast.use_backend("fastest"):
            pass


def test_explicit_backend_on_the_wrong_device_is_an_error():
    if "cpp" not in rlgaf_fast.available_backends() or not torch.cuda.is_available():
        pytest.skip("needs the C++ extension and a GPU")
    with pytest.raises(RuntimeError, match="runs on CPU tensors"):
        resolve_backend("cpp", torch.randn(2, device="cuda"), "gumbel_softmax")


def test_cpp_kernel_errors_print_numbers_shapes_and_dtypes():
    # The kernels' own checks (reached by direct calls that skip the op layer) format numbers
    # as strings; streaming them crashed the process on the GPU image (csrc/error_format.h).
    if "cpp" not in rlgaf_fast.available_backends():
        pytest.skip("C++ extension not built")
    ops = torch.ops.rlgaf_fast_C
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
        ops.ppo_loss_fwd(logits, torch.tensor([0, 5, 1]), 1.0)


def test_auto_on_a_gpu_takes_triton_or_says_why_it_falls_back_to_torch(monkeypatch):
    from rlgaf_fast import _backend

    monkeypatch.setattr(_backend, "_triton", lambda: (False, "No module named 'triton'"))
    _backend._say_torch_fallback_once.cache_clear()
    with pytest.warns(UserWarning, match=r"Triton is not available \(No module named 'triton'\)"):
        assert _backend._resolve_for_device("auto", "cuda", "gumbel_softmax") == "torch"
    assert _backend._resolve_for_device("auto", "cuda", "ppo_loss") == "torch"
    monkeypatch.setattr(_backend, "_triton", lambda: (True, ""))
    for op in ("gumbel_softmax", "gumbel_softmax_embedding", "soft_embedding", "ppo_loss"):
        assert _backend._resolve_for_device("auto", "cuda", op) == "triton", op


def test_auto_passes_over_a_backend_without_the_ops_kernel(monkeypatch):
    """An op whose kernels lack the device's backend runs on torch, silently: nothing is
    missing from the install."""
    from rlgaf_fast import _backend

    monkeypatch.setattr(_backend, "_triton", lambda: (True, ""))
    monkeypatch.setattr(_backend, "cpp_available", lambda: True)
    _backend._say_torch_fallback_once.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend._auto_backend("cuda", ("cpp",)) == "torch"
        assert _backend._auto_backend("cpu", ("triton",)) == "torch"
        assert _backend._auto_backend("cpu", ()) == "torch"
    assert _backend._auto_backend("cuda", ("cpp", "triton")) == "triton"
    assert _backend._auto_backend("cpu", ("cpp", "triton")) == "cpp"


def test_an_explicit_backend_without_the_ops_kernel_is_an_error_naming_the_op(monkeypatch):
    from rlgaf_fast import _backend

    monkeypatch.setattr(_backend, "cpp_available", lambda: True)
    with pytest.raises(RuntimeError, match=r"value_loss has no 'cpp' kernel.*: \['torch'\]"):
        _backend._resolve_for_device("cpp", "cpu", "value_loss")
    assert _backend._resolve_for_device("cpp", "cpu", "gumbel_softmax") == "cpp"
    with pytest.raises(KeyError, match="op must be one of"):
        _backend._resolve_for_device("torch", "cpu", "no_such_op")


def test_cuda_is_not_a_backend_name(monkeypatch):
    """The torch device "cuda" is not a backend: asking for it names the valid backends."""
    from rlgaf_fast import _backend

    assert "cuda" not in _backend.BACKENDS + registry.FUSED_BACKENDS
    expected = r"backend must be 'auto' or one of \('torch', 'cpp', 'triton'\), got 'cuda'"
    with pytest.raises(ValueError, match=expected):
        rlgaf_fast.gumbel_softmax(torch.randn(2, 3), backend="cuda")
    monkeypatch.setenv("RLGAF_FAST_BACKEND", "cuda")
    with pytest.raises(ValueError, match="RLGAF_FAST_BACKEND must be .*, got 'cuda'"):
        rlgaf_fast.gumbel_softmax(torch.randn(2, 3))
    with pytest.raises(ValueError, match="name must be .*, got 'cuda'"):
        with rlgaf_fast.use_backend("cuda"):
            pass


def test_the_op_table_is_what_the_package_offers():
    """Every op of the table is a public function, with a reference function where the training
    loop takes it from there; each Triton module named there imports; a row names only known
    backends."""
    for name, row in registry.OPS.items():
        assert callable(getattr(rlgaf_fast, name)), name
        assert set(row.kernels) <= set(registry.FUSED_BACKENDS), name
        if row.training_loop:
            assert callable(getattr(reference, name)), name
        if row.triton_module is not None and importlib.util.find_spec("triton") is not None:
            importlib.import_module(f"rlgaf_fast.kernels.{row.triton_module}")
    with pytest.raises(ValueError, match="kernels must be among"):
        registry.OpSpec(("cpp", "opencl"))
