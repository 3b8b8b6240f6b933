"""token_logprobs against rlgaf_fast.reference on every backend that has a kernel of it, forward
and backward, on fresh random inputs."""

import os

import pytest
import torch

import rlgaf_fast
from rlgaf_fast import reference
from rlgaf_fast.ops.registry import has_kernel
from tests.conftest import fused_backends

BACKENDS = [b for b in fused_backends() if has_kernel("token_logprobs", b)]
ALL_BACKENDS = ["torch", *BACKENDS]
# The log-probabilities are float32 whatever the logits' dtype (a float64 one computed in
# float64 may round to a neighbouring float32); the gradient is in the logits' dtype, so a 16-bit
# one is held to about two units in its last place (the Triton interpreter truncates to bfloat16
# where a GPU rounds).
TOLERANCE = {torch.float64: 1e-6, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}
GRAD_TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.bfloat16: 1.6e-2,
    torch.float16: 2e-3,
}


def _device(backend: str) -> str:
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def _inputs(shape, V, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, V, generator=gen, dtype=torch.float64) * 3).to(device, dtype)
    actions = torch.randint(0, V, shape, generator=gen).to(device)
    return logits, actions


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("shape", "V"), [((3, 5), 37), ((7,), 300), ((2, 0), 11)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_the_reference_forward_and_backward(backend, dtype, shape, V, temperature):
    dev = _device(backend)
    seed = hash((backend, str(dtype), shape, V, temperature)) % 2**31
    logits, actions = _inputs(shape, V, dtype, dev, seed)
    x = logits.clone().requires_grad_()
    got = rlgaf_fast.token_logprobs(x, actions, temperature=temperature, backend=backend)
    assert got.dtype == torch.float32 and got.shape == actions.shape
    grad = torch.randn(actions.shape, generator=torch.Generator().manual_seed(seed)).to(dev)
    (got_grad,) = torch.autograd.grad(got, x, grad)
    assert got_grad.dtype == dtype

    x_ref = logits.detach().cpu().requires_grad_()
    want = reference.token_logprobs(x_ref, actions.cpu(), temperature=temperature)
    (want_grad,) = torch.autograd.grad(want, x_ref, grad.cpu())
    tol, grad_tol = TOLERANCE[dtype], GRAD_TOLERANCE[dtype]
    torch.testing.assert_close(got.cpu(), want, atol=tol, rtol=tol)
    torch.testing.assert_close(
        got_grad.cpu().double(), want_grad.double(), atol=grad_tol / 100, rtol=grad_tol
    )


def test_reference_is_the_ppo_losss_logprobs_bit_for_bit():
    logits, actions = _inputs((3, 5), 11, torch.float32, "cpu", 0)
    zeros = torch.zeros(actions.shape)
    loss = reference.ppo_loss(logits, actions, zeros, zeros, temperature=0.7)
    got = reference.token_logprobs(logits, actions, temperature=0.7)
    assert torch.equal(got, loss.logprobs.float())


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_equals_the_fused_ppo_losss_logprobs(backend):
    logits, actions = _inputs((4, 6), 29, torch.float32, _device(backend), 1)
    zeros = torch.zeros(actions.shape, device=logits.device)
    loss = rlgaf_fast.ppo_loss(logits, actions, zeros, zeros, temperature=0.9, backend=backend)
    got = rlgaf_fast.token_logprobs(logits, actions, temperature=0.9, backend=backend)
    assert torch.equal(got, loss.logprobs.float())


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_second_derivative_is_a_clear_error(backend):
    logits, actions = _inputs((2, 3), 9, torch.float32, _device(backend), 3)
    x = logits.requires_grad_()
    out = rlgaf_fast.token_logprobs(x, actions, backend=backend)
    with pytest.raises(RuntimeError, match="create_graph"):
        torch.autograd.grad(out.sum(), x, create_graph=True)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(logits=torch.ones(3, 4, dtype=torch.long)), TypeError, "logits must be float16"),
        (dict(logits=torch.ones(3, 0)), ValueError, "logits must be"),
        (dict(actions=torch.zeros(3)), TypeError, "actions must be an integer tensor"),
        (dict(actions=torch.zeros(4, dtype=torch.long)), ValueError, "actions must have"),
        (dict(actions=torch.tensor([0, 4, 1])), ValueError, r"actions must be in \[0, V\)"),
        (dict(temperature=0.0), ValueError, "temperature must be > 0"),
        (dict(backend="fastest"), ValueError, "backend must be"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, error, match):
    arguments = dict(logits=torch.randn(3, 4), actions=torch.tensor([0, 3, 1]))
    arguments.update(kwargs)
    logits, actions = arguments.pop("logits"), arguments.pop("actions")
    with pytest.raises(error, match=match):
        rlgaf_fast.token_logprobs(logits, actions, **arguments)


@pytest.mark.parametrize(
    "backend",
    [b for b in BACKENDS if not (b == "triton" and os.environ.get("TRITON_INTERPRET") == "1")],
)
def test_opcheck_and_compile(backend):
    dev = _device(backend)
    logits, actions = _inputs((4,), 33, torch.float32, dev, 5)
    x = logits.requires_grad_()
    torch.library.opcheck(torch.ops.rlgaf_fast.token_logprobs.default, (x, actions, 0.9, backend))

    def step(t):
        return rlgaf_fast.token_logprobs(t, actions, temperature=0.9, backend=backend).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    (got,) = torch.autograd.grad(compiled(x), x)
    (want,) = torch.autograd.grad(step(x), x)
    torch.testing.assert_close(got, want)
