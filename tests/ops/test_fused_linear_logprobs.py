"""fused_linear_logprobs against rlgaf_fast.reference in float64 on every backend, forward and
backward (hidden, weight, bias), with temperature, logit scale, soft cap, ignored labels and
chunks that cut the batch; its custom operators under opcheck and torch.compile."""

import pytest
import torch

import rlgaf_fast
from rlgaf_fast import reference
from rlgaf_fast.ops.registry import has_kernel
from tests.conftest import fused_backends

BACKENDS = ["torch", *(b for b in fused_backends() if has_kernel("fused_linear_logprobs", b))]

CASES = {
    "plain": {},
    "temperature": dict(temperature=0.7),
    "logit_scale": dict(logit_scale=0.5),
    "softcap": dict(softcap=3.0),
    "everything": dict(temperature=1.3, logit_scale=2.0, softcap=5.0),
}


def _device(backend: str) -> str:
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def _inputs(B=3, T=5, H=8, V=37, seed=0, dtype=torch.float64, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64)
    bias = torch.randn(V, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[0, 1] = labels[-1, -1] = reference.IGNORE_INDEX
    leaves = [t.to(device, dtype).requires_grad_() for t in (hidden, weight, bias)]
    return (*leaves, labels.to(device))


def _weights(B=3, T=5, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, generator=gen, dtype=torch.float64) for _ in range(2)]


@pytest.mark.parametrize("save_logits", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_forward_and_backward(case, backend, save_logits):
    kwargs = CASES[case]
    dev = _device(backend)
    hidden, weight, bias, labels = _inputs()
    ref = reference.fused_linear_logprobs(hidden, weight, labels, bias=bias, **kwargs)
    g_lp, g_h = _weights()
    ref_grads = torch.autograd.grad((ref[0] * g_lp + ref[1] * g_h).sum(), (hidden, weight, bias))
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-4)):
        leaves = [t.detach().to(dev, dtype).requires_grad_() for t in (hidden, weight, bias)]
        out = rlgaf_fast.fused_linear_logprobs(
            leaves[0],
            leaves[1],
            labels.to(dev),
            bias=leaves[2],
            chunk_size=4,
            save_logits=save_logits,
            **kwargs,
            backend=backend,
        )
        for got, want in zip(out, ref, strict=True):
            torch.testing.assert_close(got.cpu().double(), want.detach(), atol=tol, rtol=tol)
        loss = (out.log_probs * g_lp.to(dev, dtype) + out.entropy * g_h.to(dev, dtype)).sum()
        grads = torch.autograd.grad(loss, leaves)
        for got, want in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(got.cpu().double(), want, atol=tol * 10, rtol=tol * 10)
        ignored = labels == reference.IGNORE_INDEX
        assert (out.log_probs[ignored] == 0).all() and (out.entropy[ignored] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_get_no_gradient_and_outputs_select(backend):
    dev = _device(backend)
    hidden, weight, _, labels = _inputs(device=dev)
    out = rlgaf_fast.fused_linear_logprobs(
        hidden, weight, labels, outputs=("log_probs",), chunk_size=2, backend=backend
    )
    assert out.entropy is None
    (grad,) = torch.autograd.grad(out.log_probs.sum(), hidden)
    ignored = labels == reference.IGNORE_INDEX
    assert (grad[ignored] == 0).all() and (grad[~ignored] != 0).any()
    want = rlgaf_fast.token_logprobs(
        torch.nn.functional.linear(hidden, weight), labels.clamp(min=0), backend="torch"
    )
    torch.testing.assert_close(out.log_probs[~ignored], want[~ignored].double())


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_saved_logits_allow_one_backward_only(backend):
    dev = _device(backend)
    hidden, weight, _, labels = _inputs(device=dev)
    out = rlgaf_fast.fused_linear_logprobs(
        hidden, weight, labels, save_logits=True, chunk_size=4, backend=backend
    )
    loss = (out.log_probs + out.entropy).sum()
    first = torch.autograd.grad(loss, (hidden, weight), retain_graph=True)
    # the backward used up the saved logits (their memory holds gradients): a second refuses
    with pytest.raises(RuntimeError, match="takes one backward"):
        torch.autograd.grad(loss, (hidden, weight))
    again = rlgaf_fast.fused_linear_logprobs(hidden, weight, labels, backend=backend)
    want = torch.autograd.grad((again.log_probs + again.entropy).sum(), (hidden, weight))
    for g, w in zip(first, want, strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_opcheck_and_compile(backend):
    dev = _device(backend)
    hidden, weight, bias, labels = _inputs(B=1, T=4, dtype=torch.float32, device=dev)
    flat_hidden = hidden.detach().reshape(4, 8).requires_grad_()
    flat_labels = labels.reshape(-1)
    torch.library.opcheck(
        torch.ops.rlgaf_fast.fused_linear_logprobs.default,
        (flat_hidden, weight, bias, flat_labels, 0.9, 1.5, 4.0, 3, False, backend),
    )
    # The saved logits (third output) are the backward's buffer, which an eager backward
    # overwrites: opcheck, which compares outputs after a backward, checks that variant without
    # one; the compiled backward below covers it.
    torch.library.opcheck(
        torch.ops.rlgaf_fast.fused_linear_logprobs.default,
        (flat_hidden.detach(), weight.detach(), None, flat_labels, 1.0, 1.0, 0.0, 8, True, backend),
    )

    def step(h, w, b, save_logits):
        out = rlgaf_fast.fused_linear_logprobs(
            h,
            w,
            labels,
            bias=b,
            softcap=4.0,
            chunk_size=3,
            save_logits=save_logits,
            backend=backend,
        )
        return (out.log_probs - 0.1 * out.entropy).sum()

    want = torch.autograd.grad(step(hidden, weight, bias, False), (hidden, weight, bias))
    for save_logits in (False, True):
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        loss = compiled(hidden, weight, bias, save_logits)
        got = torch.autograd.grad(loss, (hidden, weight, bias))
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=0.0), "temperature"),
        (dict(logit_scale=-1.0), "logit_scale"),
        (dict(softcap=0.0), "softcap"),
        (dict(outputs=("logits",)), "outputs must be"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(save_logits="yes"), "save_logits must be a bool"),
        (dict(bias=torch.zeros(36, dtype=torch.float64)), "bias must be"),
    ],
)
def test_errors_name_the_argument(kwargs, message):
    hidden, weight, _, labels = _inputs()
    with pytest.raises(ValueError, match=message):
        rlgaf_fast.fused_linear_logprobs(hidden, weight, labels, **kwargs)
    bad = labels.clone()
    bad[0, 0] = 37
    with pytest.raises(ValueError, match="labels must be in"):
        rlgaf_fast.fused_linear_logprobs(hidden, weight, bad)
