import pytest
import torch

import rlgaf_fast
from rlgaf_fast import reference
from tests.conftest import fused_backends

ALL_BACKENDS = ["torch", *fused_backends()]


def _device(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


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
    assert torch.autograd.gradcheck(
        lambda p, q: rlgaf_fast.soft_embedding(p, q, top_k=3), (probs, w)
    )


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
    with pytest.raises(ValueError, match=r"probs must be \[\.\.\., V\] \(at least 1-D\)"):
        rlgaf_fast.soft_embedding(torch.tensor(1.0), torch.randn(1, 4))


needs_cpp = pytest.mark.skipif(
    "cpp" not in rlgaf_fast.available_backends(), reason="C++ extension not built"
)


@needs_cpp
@pytest.mark.parametrize(
    ("probs_dtype", "weight_dtype"),
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float32),
        (torch.float32, torch.bfloat16),
    ],
)
def test_cpp_top_k_in_low_precision_matches_the_float64_reference(probs_dtype, weight_dtype):
    # Distinct probabilities (exact in every dtype), so that the k largest are unambiguous.
    raw = torch.stack([torch.randperm(200) + 1 for _ in range(6)]).double()
    probs = (raw / raw.sum(-1, keepdim=True)).to(probs_dtype).requires_grad_()
    w = torch.randn(200, 24).to(weight_dtype).requires_grad_()
    out = rlgaf_fast.soft_embedding(probs, w, top_k=17, backend="cpp")
    p64 = probs.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    ref = reference.soft_embedding(p64, w64, top_k=17)
    assert out.dtype == weight_dtype
    tol = (
        dict(rtol=2e-2, atol=2e-2)
        if torch.bfloat16 in (probs_dtype, weight_dtype)
        else dict(rtol=1e-3, atol=1e-3)
    )
    torch.testing.assert_close(out.double(), ref, **tol)
    grad = torch.randn(6, 24, dtype=torch.float64)
    gp, gw = torch.autograd.grad(out, (probs, w), grad.to(weight_dtype))
    gp_ref, gw_ref = torch.autograd.grad(ref, (p64, w64), grad)
    assert (gp.dtype, gw.dtype) == (probs_dtype, weight_dtype)
    # Relative to the largest entry: the probability gradient is (w_j - out) . g / S with S ~ 0.2.
    for got, want in ((gp, gp_ref), (gw, gw_ref)):
        scale = want.abs().max()
        torch.testing.assert_close(got.double() / scale, want / scale, **tol)


@needs_cpp
def test_cpp_top_k_selects_the_same_rows_as_topk_at_a_large_vocabulary():
    probs = torch.softmax(torch.randn(3, 151936) * 4, -1)
    w = torch.randn(151936, 8)
    _, index, coef, row_sum = torch.ops.rlgaf_fast.soft_embedding_topk(probs, w, 64)
    values, expected = probs.topk(64, -1)
    assert torch.equal(index, expected)
    torch.testing.assert_close(row_sum, values.sum(-1))
    torch.testing.assert_close(coef, values / values.sum(-1, keepdim=True))


@needs_cpp
def test_cpp_top_k_propagates_nan_like_the_reference():
    # NaN ranks above every number in torch.topk; columns 3 and 70 test the scalar head and
    # the blocks of 16 that the kernel skips after one compare
    probs = torch.softmax(torch.randn(3, 100, dtype=torch.float64), -1)
    probs[0, 3] = probs[1, 70] = float("nan")
    probs.requires_grad_()
    w = torch.randn(100, 6, dtype=torch.float64, requires_grad=True)
    out = rlgaf_fast.soft_embedding(probs, w, top_k=4, backend="cpp")
    p_ref = probs.detach().clone().requires_grad_()
    w_ref = w.detach().clone().requires_grad_()
    out_ref = reference.soft_embedding(p_ref, w_ref, top_k=4)
    assert out_ref[:2].isnan().all() and not out_ref[2].isnan().any()
    torch.testing.assert_close(out, out_ref, equal_nan=True)
    _, index, _, _ = torch.ops.rlgaf_fast.soft_embedding_topk(probs.detach(), w.detach(), 4)
    assert torch.equal(index, probs.detach().topk(4, -1).indices)
    grads = torch.autograd.grad(out.sum(), (probs, w))
    grads_ref = torch.autograd.grad(out_ref.sum(), (p_ref, w_ref))
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, equal_nan=True)


@needs_cpp
def test_cpp_top_k_ties_go_to_the_lower_column():
    probs = torch.full((2, 40), 0.025)
    probs[1, 30] = 0.5
    _, index, coef, _ = torch.ops.rlgaf_fast.soft_embedding_topk(probs, torch.randn(40, 3), 4)
    assert index.tolist() == [[0, 1, 2, 3], [30, 0, 1, 2]]
    torch.testing.assert_close(coef[0], torch.full((4,), 0.25))


@needs_cpp
def test_cpp_top_k_backward_refuses_an_index_outside_the_vocabulary():
    probs = torch.softmax(torch.randn(2, 10), -1)
    w = torch.randn(10, 3)
    out, index, coef, row_sum = torch.ops.rlgaf_fast.soft_embedding_topk(probs, w, 3)
    backward = torch.ops.rlgaf_fast.soft_embedding_topk_backward
    grad_probs, _ = backward(torch.ones_like(out), w, out, index, coef, row_sum, probs.dtype)
    assert grad_probs.shape == probs.shape
    for bad in (10, -1):
        wrong = index.clone()
        wrong[1, 2] = bad
        with pytest.raises(RuntimeError, match=r"index must hold ids in \[0, 10\)"):
            backward(torch.ones_like(out), w, out, wrong, coef, row_sum, probs.dtype)
    with pytest.raises(
        RuntimeError,
        match=r"index must be an int64 \[N, k\] tensor, got Int "
        r"\[2, 3\]",
    ):
        backward(torch.ones_like(out), w, out, index.int(), coef, row_sum, probs.dtype)


@needs_cpp
def test_cpp_top_k_custom_op_passes_opcheck_and_compiles():
    probs = torch.softmax(torch.randn(4, 33), -1).requires_grad_()
    w = torch.randn(33, 8, requires_grad=True)
    torch.library.opcheck(torch.ops.rlgaf_fast.soft_embedding_topk.default, (probs, w, 5))

    def embed(p):
        return rlgaf_fast.soft_embedding(p, w, top_k=5, backend="cpp").sum()

    compiled = torch.compile(embed, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(probs), embed(probs))
