import pytest
import torch

import rlgaf_fast
from rlgaf_fast import reference
from tests.conftest import fused_backends

ALL_BACKENDS = ["torch", *fused_backends()]


def _device(backend):
    return "cuda" if backend in ("cuda", "triton") and torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("top_k", [None, 1, 3, 50])
def test_matches_reference_with_gradients(backend, top_k):
    dev = _device(backend)
    probs = torch.softmax(torch.randn(2, 7, 50, dtype=torch.float64), -1).to(dev)
    probs.requires_grad_()
    w = torch.randn(50, 12, dtype=torch.float64, device=dev, requires_grad=True)
    out = rlgaf_fast.soft_embedding(probs, w, top_k=top_k, backend=backend)
    p_ref = probs.detach().cpu().requires_grad_()
    w_ref = w.detach().cpu().requires_grad_()
    out_ref = reference.soft_embedding(p_ref, w_ref, top_k=top_k)
    assert out.shape == (2, 7, 12)
    torch.testing.assert_close(out.detach().cpu(), out_ref.detach())
    grad = torch.randn(2, 7, 12, dtype=torch.float64)
    gp, gw = torch.autograd.grad(out, (probs, w), grad.to(dev))
    gp_ref, gw_ref = torch.autograd.grad(out_ref, (p_ref, w_ref), grad)
    torch.testing.assert_close(gp.cpu(), gp_ref)
    torch.testing.assert_close(gw.cpu(), gw_ref)


def test_top_k_equals_dense_on_renormalised_truncation():
    probs = torch.softmax(torch.randn(4, 30) * 3, -1)
    w = torch.randn(30, 5)
    values, index = probs.topk(4, -1)
    truncated = torch.zeros_like(probs).scatter(-1, index, values / values.sum(-1, keepdim=True))
    torch.testing.assert_close(rlgaf_fast.soft_embedding(probs, w, top_k=4), truncated @ w)


def test_gradcheck_top_k():
    probs = torch.softmax(torch.randn(3, 9, dtype=torch.float64), -1).requires_grad_()
    w = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p, q: rlgaf_fast.soft_embedding(p, q, top_k=3),
                                    (probs, w))


def test_invalid_inputs_raise_clear_errors():
    probs = torch.rand(3, 10)
    with pytest.raises(ValueError, match="weight must be"):
        rlgaf_fast.soft_embedding(probs, torch.randn(9, 4))
    with pytest.raises(ValueError, match="top_k must be"):
        rlgaf_fast.soft_embedding(probs, torch.randn(10, 4), top_k=0)
    with pytest.raises(ValueError, match="top_k must be"):
        rlgaf_fast.soft_embedding(probs, torch.randn(10, 4), top_k=11)
    with pytest.raises(TypeError, match="probs must be"):
        rlgaf_fast.soft_embedding(torch.ones(3, 10, dtype=torch.int32), torch.randn(10, 4))
    with pytest.raises(ValueError, match="same device"):
        rlgaf_fast.soft_embedding(probs, torch.randn(10, 4, device="meta"))
