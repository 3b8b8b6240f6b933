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
