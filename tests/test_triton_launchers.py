"""Every Triton launcher runs with its tensors' GPU as the current device (Triton launches on the
current device and stream, whatever device the pointers belong to)."""

import contextlib
import importlib
import importlib.util
from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)

LAUNCHERS = {
    "gumbel_softmax": [
        "gumbel_softmax_fwd",
        "gumbel_softmax_bwd",
        "gumbel_softmax_bwd_from_logits",
    ],
    "gumbel_softmax_embedding": ["gumbel_softmax_embedding_fwd", "gumbel_softmax_embedding_bwd"],
    "ppo_loss": ["ppo_loss_fwd", "ppo_loss_fwd_grad", "ppo_loss_fwd_vjp", "ppo_loss_vjp_lse"],
}


def test_every_launcher_enters_its_tensors_device(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def recording_device(device):
        entered.append(device)
        yield

    monkeypatch.setattr(torch.cuda, "device", recording_device)
    # A stand-in for a tensor on the second GPU: the launcher fails on it once inside the scope.
    on_gpu1 = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))
    for module_name, names in LAUNCHERS.items():
        module = importlib.import_module(f"rlgaf_fast.kernels.{module_name}")
        public = {
            n
            for n in dir(module)
            if n.startswith(("gumbel_softmax_", "ppo_loss_")) and callable(getattr(module, n))
        }
        assert public == set(names), "a launcher missing from this test"
        for name in names:
            entered.clear()
            with pytest.raises((AttributeError, TypeError, ValueError)):
                getattr(module, name)(on_gpu1, on_gpu1, 1.0, 0)
            assert entered == [torch.device("cuda", 1)], name
    entered.clear()
    module = importlib.import_module("rlgaf_fast.kernels.ppo_loss")
    with pytest.raises((AttributeError, TypeError, ValueError)):
        module.ppo_loss_fwd(SimpleNamespace(is_cuda=False), None, 1.0)
    assert entered == []  # CPU tensors (the interpreter) need no device scope


def test_a_grid_beyond_cuda_limits_is_a_clear_error():
    from rlgaf_fast.kernels.launch import check_grid

    assert check_grid((2**31 - 1, 65535), "k") == (2**31 - 1, 65535)
    for grid in ((1, 65536), (2**31, 1)):
        with pytest.raises(ValueError, match="k: the problem is too large for one launch"):
            check_grid(grid, "k")


def test_ppo_parameters_reach_the_device_once_per_distinct_set():
    from rlgaf_fast.kernels.ppo_loss import _params

    cpu = torch.device("cpu")
    first = _params((1.0, 0.8, 1.2), torch.float32, cpu)
    assert _params((1.0, 0.8, 1.2), torch.float32, cpu) is first
    assert first.tolist() == pytest.approx([1.0, 0.8, 1.2])
    assert _params((1.0, 0.8, 1.3), torch.float32, cpu) is not first
    assert _params((1.0, 0.8, 1.2), torch.float64, cpu).dtype == torch.float64
