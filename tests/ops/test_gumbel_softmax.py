"""Every backend of the Gumbel-Softmax family against rlgaf_fast.reference."""

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F
from scipy import stats

import rlgaf_fast
from rlgaf_fast import reference
from tests.conftest import fused_backends

BACKENDS = fused_backends()
ALL_BACKENDS = ["torch", *BACKENDS]


def _interpreted(backend: str) -> bool:
    return backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"


def _device(backend: str) -> str:
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def _logits(n, v, dtype=torch.float64, backend="torch", scale=2.0):
    return (torch.randn(n, v, dtype=torch.float64) * scale).to(_device(backend), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("shape", [(5, 37), (1, 1), (3, 8), (4, 300)])
def test_forward_and_backward_match_reference_float64(backend, hard, shape):
    x = _logits(*shape, backend=backend).requires_grad_()
    tau, seed = 0.7, 1234
    y = rlgaf_fast.gumbel_softmax(x, tau, hard, seed=seed, backend=backend)
    x_ref = x.detach().cpu().requires_grad_()
    y_ref = reference.gumbel_softmax(x_ref, tau, hard, seed=seed)
    assert y.dtype == x.dtype and y.shape == x.shape
    torch.testing.assert_close(y.cpu(), y_ref.detach(), atol=2e-6, rtol=2e-6)
    grad = torch.randn(shape, dtype=torch.float64)
    (gx,) = torch.autograd.grad(y, x, grad.to(y.device))
    (gx_ref,) = torch.autograd.grad(y_ref, x_ref, grad)
    torch.testing.assert_close(gx.cpu(), gx_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", *[b for b in BACKENDS if b != "triton"]])
@pytest.mark.parametrize("hard", [False, True])
def test_gradcheck_float64(backend, hard):
    x = _logits(3, 11, backend=backend).requires_grad_()

    def fn(t):
        y = rlgaf_fast.gumbel_softmax(t, 0.5, hard, seed=99, backend=backend)
        if not hard:
            return y
        # The one-hot is piecewise constant, so finite differences see no slope in it. Its
        # straight-through gradient must be the Jacobian of the reference's soft sample: give
        # the function that sample's value (y - y.detach() is exactly 0) and the hard path's
        # gradient, and let gradcheck compare the two.
        soft = reference.gumbel_softmax(t.detach().cpu(), 0.5, False, seed=99).to(t.device)
        return y - y.detach() + soft

    assert torch.autograd.gradcheck(fn, (x,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_at_least_as_close_as_torch_in_that_dtype(backend, dtype):
    x32 = _logits(6, 257, torch.float32, backend)
    seed = 5
    y_ref32 = reference.gumbel_softmax(x32.cpu(), 0.9, seed=seed)
    y = rlgaf_fast.gumbel_softmax(x32.to(dtype), 0.9, seed=seed, backend=backend)
    y_torch_low = reference.gumbel_softmax(x32.cpu().to(dtype), 0.9, seed=seed)
    assert y.dtype == dtype
    err_kernel = (y.cpu().float() - y_ref32).abs().max().item()
    err_torch = (y_torch_low.float() - y_ref32).abs().max().item()
    assert err_kernel <= err_torch + 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hard", [False, True])
def test_low_precision_gradient_at_least_as_close_as_torch_in_that_dtype(backend, dtype, hard):
    def gradient(fn, x, grad_y):
        x = x.detach().clone().requires_grad_()
        (fn(x).float().cpu() * grad_y).sum().backward()
        return x.grad.float().cpu()

    torch.manual_seed(12)  # seeds whose soft gradient exposed a sample saved in 16 bits
    for _ in range(4):
        x32 = _logits(6, 257, torch.float32, backend) * 2
        grad_y = torch.randn(6, 257)
        seed = int(torch.randint(1 << 30, ()))
        truth = gradient(
            lambda t, s=seed: reference.gumbel_softmax(t, 0.9, False, seed=s), x32.cpu(), grad_y
        )
        kernel = gradient(
            lambda t, s=seed: rlgaf_fast.gumbel_softmax(t, 0.9, hard, seed=s, backend=backend),
            x32.to(dtype),
            grad_y,
        )
        torch_low = gradient(
            lambda t, s=seed: reference.gumbel_softmax(t, 0.9, hard, seed=s),
            x32.cpu().to(dtype),
            grad_y,
        )
        err_kernel = (kernel - truth).abs().max().item()
        err_torch = (torch_low - truth).abs().max().item()
        assert err_kernel <= err_torch + 1e-6, (err_kernel, err_torch)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_hard_sample_frequencies_follow_softmax(backend):
    # Every row holds the same logits, so the row-keyed noise gives independent draws.
    probs = torch.tensor([0.35, 0.25, 0.2, 0.1, 0.06, 0.04], dtype=torch.float64)
    rows = 600 if _interpreted(backend) else 20000
    x = probs.log().expand(rows, -1).contiguous().to(_device(backend), torch.float32)
    y = rlgaf_fast.gumbel_softmax(x, 1.0, hard=True, seed=2024, backend=backend)
    counts = y.sum(0).double().cpu()
    assert counts.sum().item() == rows
    result = stats.chisquare(counts.numpy(), (probs * rows).numpy())
    assert result.pvalue > 1e-3, (counts, result)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_soft_sample_mean_matches_torch_gumbel_softmax(backend):
    rows = 400 if _interpreted(backend) else 10000
    logits = torch.tensor([1.0, 0.0, -1.0, 0.5, 2.0])
    x = logits.expand(rows, -1).contiguous().to(_device(backend))
    ours = rlgaf_fast.gumbel_softmax(x, 0.8, seed=77, backend=backend).double().cpu()
    torch.manual_seed(0)
    theirs = F.gumbel_softmax(logits.expand(20000, -1), tau=0.8).double()
    stderr = (ours.var(0) / rows + theirs.var(0) / 20000).sqrt()
    assert ((ours.mean(0) - theirs.mean(0)).abs() < 5 * stderr).all()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_reproducible_for_a_seed_and_under_manual_seed(backend):
    x = _logits(4, 50, torch.float32, backend)
    a = rlgaf_fast.gumbel_softmax(x, seed=3, backend=backend)
    assert torch.equal(a, rlgaf_fast.gumbel_softmax(x, seed=3, backend=backend))
    assert not torch.equal(a, rlgaf_fast.gumbel_softmax(x, seed=4, backend=backend))
    torch.manual_seed(10)
    b = rlgaf_fast.gumbel_softmax(x, backend=backend)
    torch.manual_seed(10)
    assert torch.equal(b, rlgaf_fast.gumbel_softmax(x, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_draw_the_same_samples(backend):
    x = _logits(16, 203, torch.float32, backend, scale=1.0)
    hard = rlgaf_fast.gumbel_softmax(x, 0.5, hard=True, seed=31337, backend=backend)
    hard_ref = reference.gumbel_softmax(x.cpu(), 0.5, hard=True, seed=31337)
    assert torch.equal(hard.cpu(), hard_ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_any_dim_and_non_contiguous_input(backend):
    base = _logits(6, 20, backend=backend).reshape(2, 3, 20)
    x = base.transpose(0, 2)  # [20, 3, 2], non-contiguous, vocabulary on dim 0
    assert not x.is_contiguous()
    y = rlgaf_fast.gumbel_softmax(x, 1.3, dim=0, seed=8, backend=backend)
    y_ref = reference.gumbel_softmax(x.cpu(), 1.3, dim=0, seed=8)
    torch.testing.assert_close(y.cpu(), y_ref, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x = torch.empty(0, 10, device=_device(backend), requires_grad=True)
    y = rlgaf_fast.gumbel_softmax(x, seed=1, backend=backend)
    assert y.shape == (0, 10)
    y.sum().backward()
    assert x.grad.shape == (0, 10)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize(("shape", "dim"), [((3, 0), -1), ((0, 4), 0), ((2, 0, 3), 1)])
def test_empty_vocabulary_gives_an_empty_sample_as_torch(backend, hard, shape, dim):
    x = torch.empty(shape, device=_device(backend), dtype=torch.float16, requires_grad=True)
    y = rlgaf_fast.gumbel_softmax(x, hard=hard, dim=dim, seed=1, backend=backend)
    assert y.shape == shape and y.dtype == x.dtype
    if not hard:  # torch's hard mode raises here
        assert F.gumbel_softmax(x, dim=dim).shape == y.shape
    y.sum().backward()
    assert x.grad.shape == shape


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("hard", [False, True])
def test_0d_input_is_one_category_as_torch(backend, hard):
    x = torch.tensor(0.3, device=_device(backend), requires_grad=True)
    y = rlgaf_fast.gumbel_softmax(x, hard=hard, seed=1, backend=backend)
    assert y.shape == () and y.item() == 1.0 == F.gumbel_softmax(x, hard=hard).item()
    (grad,) = torch.autograd.grad(y, x)
    assert grad.shape == () and grad.item() == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hard_sample_is_nan_where_the_reference_is(backend, dtype):
    # softmax (and so the straight-through one-hot) is NaN for a row holding a NaN, an inf or
    # only -inf
    x = _logits(6, 40, dtype, backend)
    x[0, 3] = x[1, 37] = x[4] = float("nan")
    x[2, 5] = float("inf")
    x[3] = float("-inf")
    y = rlgaf_fast.gumbel_softmax(x, 0.7, hard=True, seed=5, backend=backend).cpu()
    y_ref = reference.gumbel_softmax(x.cpu(), 0.7, hard=True, seed=5)
    assert y_ref[:5].isnan().all() and not y_ref[5].isnan().any()
    torch.testing.assert_close(y, y_ref, equal_nan=True, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hard", [False, True])
def test_extreme_logits_match_reference_forward_and_backward(backend, dtype, hard):
    # Rows: a NaN, an inf, only -inf (softmax is NaN in all three), a row of logits near -100
    # whose last 150 columns (whole vocabulary blocks of the kernels) are -inf, and a wide
    # spread. Blocks are staged relative to their own max and rescaled, so a block of -inf
    # after a very negative row max must add 0, not 0 * exp(0 + 2000). Logits near -100 carry
    # float32 rounding of about 1e-5 / tau in z, on every backend: hence float32's tolerance.
    x = _logits(5, 300, dtype, backend)
    x[0, 3] = float("nan")
    x[1, 250] = float("inf")
    x[2] = float("-inf")
    x[3] -= 100
    x[3, 150:] = float("-inf")
    x[4] *= 50
    x.requires_grad_()
    x_ref = x.detach().cpu().requires_grad_()
    tol = {"atol": 1e-5, "rtol": 1e-3 if dtype == torch.float32 else 1e-6}
    for tau in (0.7, 0.05):
        y = rlgaf_fast.gumbel_softmax(x, tau, hard, seed=8, backend=backend)
        y_ref = reference.gumbel_softmax(x_ref, tau, hard, seed=8)
        assert not y_ref[3:].isnan().any()
        torch.testing.assert_close(y.detach().cpu(), y_ref.detach(), equal_nan=True, **tol)
        grad = torch.randn(5, 300, dtype=dtype)
        (gx,) = torch.autograd.grad(y, x, grad.to(y.device))
        (gx_ref,) = torch.autograd.grad(y_ref, x_ref, grad)
        assert not gx_ref[3:].isnan().any()
        torch.testing.assert_close(gx.cpu(), gx_ref, equal_nan=True, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_raises(backend):
    dev = _device(backend)
    x = _logits(2, 9, torch.float32, backend).requires_grad_()
    w = torch.randn(9, 4, device=dev)
    samples = (
        rlgaf_fast.gumbel_softmax(x, hard=True, seed=2, backend=backend),
        rlgaf_fast.gumbel_softmax_embedding(x, w, seed=2, backend=backend)[0],
    )
    for y in samples:
        (grad,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="no autograd formula"):
            grad.sum().backward()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if not _interpreted(b)])
@pytest.mark.parametrize("vocab", [151936, 256000])
def test_large_vocabulary(backend, vocab):
    x = _logits(2, vocab, torch.float32, backend).requires_grad_()
    y = rlgaf_fast.gumbel_softmax(x, 1.0, seed=6, backend=backend)
    y_ref = reference.gumbel_softmax(x.detach().cpu(), 1.0, seed=6)
    torch.testing.assert_close(y.detach().cpu(), y_ref, atol=1e-6, rtol=1e-4)
    grad = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, grad)
    ref = y_ref * (grad.cpu() - (grad.cpu() * y_ref).sum(-1, keepdim=True))
    torch.testing.assert_close(gx.cpu(), ref, atol=1e-6, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU with > 20 GB")
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b == "triton"])
def test_more_than_2_to_31_elements(backend):
    n, v = 16500, 131072  # 2.16e9 elements: int32 offsets would wrap
    x = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
    y, index = rlgaf_fast.ops.gumbel_softmax._gumbel_softmax_op(x, 1.0, False, 5, backend)
    for r in (0, n // 2, n - 1):
        g = reference.gumbel_noise(5, 1, v, "cuda", first_row=r)[0]
        expect = torch.softmax(x[r].float() + g, -1)
        torch.testing.assert_close(y[r].float(), expect, atol=1e-3, rtol=2e-2)
    assert torch.equal(index[n - 1], (x[n - 1].float() + g).argmax())


def test_invalid_inputs_raise_clear_errors():
    x = torch.randn(3, 5)
    with pytest.raises(ValueError, match="tau must be > 0"):
        rlgaf_fast.gumbel_softmax(x, tau=0.0)
    with pytest.raises(ValueError, match="tau must be > 0"):
        rlgaf_fast.gumbel_softmax(x, tau=-1.0)
    with pytest.raises(TypeError, match="logits must be float16"):
        rlgaf_fast.gumbel_softmax(torch.ones(3, 5, dtype=torch.int64))
    with pytest.raises(IndexError, match="dim must be in"):
        rlgaf_fast.gumbel_softmax(x, dim=2)
    with pytest.raises(ValueError, match="seed must be"):
        rlgaf_fast.gumbel_softmax(x, seed=-1)
    with pytest.raises(ValueError, match="backend must be"):
        rlgaf_fast.gumbel_softmax(x, backend="numpy")
    with pytest.raises(ValueError, match="weight must be"):
        rlgaf_fast.gumbel_softmax_embedding(x, torch.randn(4, 8))
    with pytest.raises(ValueError, match=r"logits must be \[\.\.\., V\] \(at least 1-D\)"):
        rlgaf_fast.gumbel_softmax_embedding(torch.tensor(1.0), torch.randn(1, 8))
    with pytest.raises(ValueError, match="same device"):
        rlgaf_fast.gumbel_softmax_embedding(x, torch.randn(5, 8, device="meta"))
    with pytest.raises(ValueError, match="tau must be > 0"):
        rlgaf_fast.gumbel_softmax_embedding(x, torch.randn(5, 8), tau=0)


def test_unavailable_backend_is_an_error_not_a_fallback(monkeypatch):
    from rlgaf_fast import _backend

    monkeypatch.setattr(_backend, "_triton", lambda: (False, "No module named 'triton'"))
    with pytest.raises(RuntimeError, match="backend 'triton' is not available: No module named"):
        rlgaf_fast.gumbel_softmax(torch.randn(2, 3), backend="triton")


# --- fused Gumbel-Softmax -> embedding ---------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hard", [False, True])
# (64, 1100, 24): several row tiles, and several vocabulary chunks on a GPU as well as under the
# interpreter (chunks of 64 there); (3, 50, 0): an empty embedding width
@pytest.mark.parametrize("n,v,d", [(5, 37, 8), (1, 1, 4), (7, 130, 24), (64, 1100, 24), (3, 50, 0)])
def test_embedding_matches_reference_float64(backend, hard, n, v, d):
    if _interpreted(backend) and hard:
        pytest.skip("hard mode shares the soft kernels, covered by the soft case here")
    dev = _device(backend)
    dtype = torch.float32 if _interpreted(backend) else torch.float64
    x = _logits(n, v, dtype, backend).requires_grad_()
    w = torch.randn(v, d, dtype=dtype, device=dev, requires_grad=True)
    out, tokens = rlgaf_fast.gumbel_softmax_embedding(x, w, 0.6, hard, seed=21, backend=backend)
    x_ref = x.detach().cpu().double().requires_grad_()
    w_ref = w.detach().cpu().double().requires_grad_()
    out_ref, tokens_ref = reference.gumbel_softmax_embedding(x_ref, w_ref, 0.6, hard, seed=21)
    tol = 1e-5 if dtype == torch.float64 else 2e-4
    assert torch.equal(tokens.cpu(), tokens_ref)
    torch.testing.assert_close(out.detach().cpu().double(), out_ref.detach(), atol=tol, rtol=tol)
    grad = torch.randn(n, d, dtype=torch.float64)
    gx, gw = torch.autograd.grad(out, (x, w), grad.to(dev, dtype))
    gx_ref, gw_ref = torch.autograd.grad(out_ref, (x_ref, w_ref), grad)
    torch.testing.assert_close(gx.cpu().double(), gx_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(gw.cpu().double(), gw_ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_embedding_at_extreme_logits_matches_reference(backend):
    # As test_extreme_logits_match_reference_forward_and_backward: the fused forward stages
    # each chunk relative to its own max and rescales out to the running max, so a chunk of
    # -inf after a very negative max must add 0.
    dev = _device(backend)
    x = _logits(4, 300, torch.float32, backend)
    x[0, 7] = float("nan")
    x[1] = float("-inf")
    x[2] -= 100
    x[2, 150:] = float("-inf")
    x[3] *= 50
    x.requires_grad_()
    w = torch.randn(300, 16, device=dev, requires_grad=True)
    x_ref = x.detach().cpu().double().requires_grad_()
    w_ref = w.detach().cpu().double().requires_grad_()
    for tau in (0.7, 0.05):
        out, tokens = rlgaf_fast.gumbel_softmax_embedding(x, w, tau, seed=3, backend=backend)
        out_ref, tokens_ref = reference.gumbel_softmax_embedding(x_ref, w_ref, tau, seed=3)
        assert out_ref[:2].isnan().all() and not out_ref[2:].isnan().any()
        assert torch.equal(tokens.cpu()[1:], tokens_ref[1:])
        tol = {"atol": 1e-4, "rtol": 1e-3, "equal_nan": True}
        torch.testing.assert_close(out.detach().cpu().double(), out_ref.detach(), **tol)
        grad = torch.randn(4, 16, dtype=torch.float64)
        gx, gw = torch.autograd.grad(out, (x, w), grad.to(dev, torch.float32))
        gx_ref, gw_ref = torch.autograd.grad(out_ref, (x_ref, w_ref), grad)
        torch.testing.assert_close(gx[2:].cpu().double(), gx_ref[2:], **tol)
        assert gx[:2].isnan().all() and gx_ref[:2].isnan().all()
        # the NaN rows' probabilities make every entry of the weight's gradient NaN
        assert gw.isnan().all() and gw_ref.isnan().all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_embedding_gradient_in_low_precision_is_the_exact_one_rounded(backend, dtype):
    """In 16 bits the logits' gradient is the exact gradient at the same inputs, rounded once:
    no 16-bit intermediate, such as the output, whose product with grad_out enters every entry
    (a 16-bit output made the gradient worse than torch's in that dtype)."""
    if _interpreted(backend) and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter gets tl.dot of bf16 operands wrong (docs/design.md)")
    dev = _device(backend)
    torch.manual_seed(4)
    for seed in range(5):
        x = _logits(6, 257, dtype, backend).requires_grad_()
        w = torch.randn(257, 32, device=dev).to(dtype)
        grad = torch.randn(6, 32, device=dev).to(dtype)
        out, _ = rlgaf_fast.gumbel_softmax_embedding(x, w, 0.9, seed=seed, backend=backend)
        (gx,) = torch.autograd.grad(out, x, grad)
        x64 = x.detach().cpu().double().requires_grad_()
        out64, _ = reference.gumbel_softmax_embedding(x64, w.cpu().double(), 0.9, seed=seed)
        (gx64,) = torch.autograd.grad(out64, x64, grad.cpu().double())
        error = (gx.cpu().double() - gx64).abs()
        # half an ulp of the rounding, one ulp of margin, and float32 noise where terms cancel
        bound = torch.finfo(dtype).eps * gx64.abs() + 1e-5 * gx64.abs().max()
        assert (error <= bound).all(), (error / bound).max().item()


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize(
    ("n", "d", "dtype"),
    [
        (16, 256, torch.float32),
        (64, 256, torch.float32),
        (64, 2048, torch.bfloat16),
        (1, 8, torch.float16),
    ],
)
def test_triton_embedding_gpu_configuration_allocates_o_of_n_times_d(monkeypatch, n, d, dtype):
    """What the Triton forward allocates with its GPU configuration (chunk width, split), the
    kernels not launched: within the memory goal (the benchmark's, on a GPU) of N * D * 16 bytes
    + 1 MiB beyond the inputs, at V = 128256."""
    from rlgaf_fast.kernels import gumbel_softmax_embedding as gse
    from rlgaf_fast.kernels import launch

    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    monkeypatch.setattr(launch, "on_gpu", lambda t: True)
    monkeypatch.setattr(launch, "sm_count", lambda device_index: 132)
    for kernel in ("_embedding_chunk_probs_kernel", "_embedding_product_kernel"):
        monkeypatch.setattr(gse, kernel, NoLaunch())
    allocated = []
    empty = torch.empty

    def recording_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        allocated.append(t.numel() * t.element_size())
        return t

    monkeypatch.setattr(torch, "empty", recording_empty)
    logits = torch.zeros(n, 128256, dtype=dtype)
    weight = torch.zeros(128256, d, dtype=dtype)
    gse.gumbel_softmax_embedding_fwd(logits, weight, 1.0, 3)
    assert len(allocated) >= 4  # out, tokens, lse, the workspace, the partial sums
    assert sum(allocated) <= n * d * 16 + (1 << 20), allocated


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("hard", "weight_requires_grad"), [(False, True), (False, False), (True, True)]
)
def test_embedding_backward_forms_grad_weight_only_when_needed(
    monkeypatch, backend, hard, weight_requires_grad
):
    """The weight's gradient is a product as large as the forward's: the backward skips it where
    the weight needs none (a frozen weight; hard mode, whose weight gradient is the gather's),
    and the gradients that are needed still match the reference."""
    import rlgaf_fast.ops.gumbel_softmax as op_module

    flags = []
    kernel_module = op_module.kernel_module

    class Recording:
        def __init__(self, module):
            self.module = module

        def __getattr__(self, name):
            return getattr(self.module, name)

        def gumbel_softmax_embedding_bwd(self, *args):
            flags.append(args[-1])
            grads = self.module.gumbel_softmax_embedding_bwd(*args)
            assert args[-1] or grads[1].numel() == 0
            return grads

    monkeypatch.setattr(
        op_module, "kernel_module", lambda op, backend: Recording(kernel_module(op, backend))
    )
    dev = _device(backend)
    x = _logits(6, 70, torch.float32, backend).requires_grad_()
    w = torch.randn(70, 12, device=dev, requires_grad=weight_requires_grad)
    out, _ = rlgaf_fast.gumbel_softmax_embedding(x, w, 0.8, hard, seed=4, backend=backend)
    grad = torch.randn(6, 12, device=dev)
    inputs = (x, w) if weight_requires_grad else (x,)
    got = torch.autograd.grad(out, inputs, grad)
    x_ref = x.detach().cpu().double().requires_grad_()
    w_ref = w.detach().cpu().double().requires_grad_(weight_requires_grad)
    out_ref, _ = reference.gumbel_softmax_embedding(x_ref, w_ref, 0.8, hard, seed=4)
    want = torch.autograd.grad(
        out_ref, (x_ref, w_ref) if weight_requires_grad else (x_ref,), grad.cpu().double()
    )
    assert flags == [weight_requires_grad and not hard]
    for g, g_ref in zip(got, want, strict=True):
        torch.testing.assert_close(g.cpu().double(), g_ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_embedding_equals_gumbel_softmax_then_soft_embedding(backend):
    dev = _device(backend)
    x = _logits(6, 90, torch.float32, backend)
    w = torch.randn(90, 16, device=dev)
    out, tokens = rlgaf_fast.gumbel_softmax_embedding(x, w, 1.0, seed=5, backend=backend)
    y = rlgaf_fast.gumbel_softmax(x, 1.0, seed=5, backend=backend)
    torch.testing.assert_close(
        out, rlgaf_fast.soft_embedding(y, w, backend=backend), atol=1e-5, rtol=1e-4
    )
    assert torch.equal(tokens, y.argmax(-1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("logits_dtype", "weight_dtype"),
    [(torch.float32, torch.float64), (torch.float64, torch.float32)],
)
def test_embedding_float32_and_float64_mixed_match_reference(backend, logits_dtype, weight_dtype):
    """Mixed 32/64-bit inputs (the interpreter runs these, unlike 16-bit dots): the output in the
    weight's dtype, both gradients in their input's dtype, float32-accurate."""
    dev = _device(backend)
    x = _logits(9, 150, logits_dtype, backend).requires_grad_()
    w = torch.randn(150, 20, dtype=weight_dtype, device=dev, requires_grad=True)
    out, _ = rlgaf_fast.gumbel_softmax_embedding(x, w, 0.8, seed=2, backend=backend)
    x64 = x.detach().cpu().double().requires_grad_()
    w64 = w.detach().cpu().double().requires_grad_()
    out64, _ = reference.gumbel_softmax_embedding(x64, w64, 0.8, seed=2)
    grad = torch.randn(9, 20, dtype=torch.float64)
    gx, gw = torch.autograd.grad(out, (x, w), grad.to(dev, weight_dtype))
    gx64, gw64 = torch.autograd.grad(out64, (x64, w64), grad)
    assert (out.dtype, gx.dtype, gw.dtype) == (weight_dtype, logits_dtype, weight_dtype)
    for got, want in ((out, out64), (gx, gx64), (gw, gw64)):
        torch.testing.assert_close(got.detach().cpu().double(), want.detach(), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_embedding_mixed_dtypes_and_empty_batch(backend):
    if _interpreted(backend):
        pytest.skip("Triton's interpreter gets tl.dot of bf16 operands wrong (docs/design.md)")
    dev = _device(backend)
    x = _logits(3, 40, torch.float32, backend)
    w = torch.randn(40, 8, device=dev, dtype=torch.bfloat16)
    out, _ = rlgaf_fast.gumbel_softmax_embedding(x, w, seed=1, backend=backend)
    out_ref, _ = reference.gumbel_softmax_embedding(x.cpu(), w.cpu().float(), seed=1)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float().cpu(), out_ref, atol=3e-2, rtol=3e-2)
    out, tokens = rlgaf_fast.gumbel_softmax_embedding(
        torch.empty(0, 40, device=dev), w, seed=1, backend=backend
    )
    assert out.shape == (0, 8) and tokens.shape == (0,)


# --- custom-operator integration ------------------------------------------------------------------


@pytest.mark.parametrize("backend", [b for b in BACKENDS if not _interpreted(b)])
def test_opcheck(backend):
    dev = _device(backend)
    x = torch.randn(4, 33, device=dev, requires_grad=True)
    for hard in (False, True):
        torch.library.opcheck(
            torch.ops.rlgaf_fast.gumbel_softmax.default, (x, 0.7, hard, 3, backend)
        )
    w = torch.randn(33, 8, device=dev, requires_grad=True)
    torch.library.opcheck(
        torch.ops.rlgaf_fast.gumbel_softmax_embedding.default, (x, w, 0.7, 3, backend)
    )


@pytest.mark.parametrize("backend", [b for b in BACKENDS if not _interpreted(b)])
def test_torch_compile_fullgraph(backend):
    dev = _device(backend)
    w = torch.randn(33, 8, device=dev)

    def step(x):
        y = rlgaf_fast.gumbel_softmax(x, 0.5, hard=True, seed=12, backend=backend)
        e, _ = rlgaf_fast.gumbel_softmax_embedding(x, w, 0.5, seed=12, backend=backend)
        return (y * x).sum() + e.square().sum()

    x = torch.randn(4, 33, device=dev, requires_grad=True)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(x)
    (g,) = torch.autograd.grad(loss, x)
    loss_eager = step(x)
    (g_eager,) = torch.autograd.grad(loss_eager, x)
    torch.testing.assert_close(loss, loss_eager)
    torch.testing.assert_close(g, g_eager)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if not _interpreted(b)])
def test_torch_compile_with_drawn_seed_draws_fresh_noise_each_call(backend):
    # The seed drawn from torch's generator must not be baked into the compiled graph.
    step = torch.compile(
        lambda t: rlgaf_fast.gumbel_softmax(t, 0.5, backend=backend),
        fullgraph=True,
        backend="aot_eager",
    )
    x = torch.randn(3, 7, device=_device(backend))
    assert not torch.equal(step(x), step(x))
    torch.manual_seed(1)
    first = step(x)
    torch.manual_seed(1)
    assert torch.equal(first, step(x))
