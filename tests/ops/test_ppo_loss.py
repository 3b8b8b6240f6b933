"""The PPO losses (ppo_loss, fused_linear_ppo_loss, value_loss, gae) against rlgaf_fast.reference
and hand-written loops, on every available backend."""

import inspect
import os

import pytest
import torch

import rlgaf_fast
from rlgaf_fast import reference
from rlgaf_fast.ops import fused_linear_ppo_loss as linear_ops
from rlgaf_fast.ops import ppo_loss as ops
from rlgaf_fast.ops._ppo import PPOOptions
from tests.conftest import fused_backends

BACKENDS = fused_backends()
ALL_BACKENDS = ["torch", *BACKENDS]
METRICS = ("clipfrac", "approx_kl", "ratio_mean", "kl")


def _interpreted(backend: str) -> bool:
    return backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"


def _device(backend: str) -> str:
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def _batch(B=3, T=5, V=37, dtype=torch.float64, device="cpu", spread=0.4, seed=0):
    """Random logits [B, T, V] and token tensors whose ratios spread around 1 (so that clipping
    and the dual clip both happen), with one sequence fully masked and a ragged one."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64) * 2
    actions = torch.randint(0, V, (B, T), generator=gen)
    logp = torch.log_softmax(logits, -1).gather(-1, actions[..., None])[..., 0]
    old = logp + spread * torch.randn(B, T, generator=gen, dtype=torch.float64)
    ref = logp + spread * torch.randn(B, T, generator=gen, dtype=torch.float64)
    adv = torch.randn(B, T, generator=gen, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.float64)
    if B > 1:
        mask[1] = 0
    mask[-1, T // 2 :] = 0
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    return dict(
        logits=logits.to(device, dtype),
        actions=actions.to(device),
        old=old.to(device, cd),
        adv=adv.to(device, cd),
        ref=ref.to(device, cd),
        mask=mask.to(device, cd),
    )


OPTION_CASES = {
    "default": {},
    "clip_eps_high": dict(clip_eps=0.1, clip_eps_high=0.28),
    "dual_clip": dict(clip_eps=0.1, dual_clip=1.3),
    "k1": dict(kl_coef=0.3, kl_estimator="k1", with_ref=True),
    "k2": dict(kl_coef=0.3, kl_estimator="k2", with_ref=True),
    "k3": dict(kl_coef=0.3, kl_estimator="k3", with_ref=True),
    "kl_metric_only": dict(with_ref=True),
    "entropy": dict(entropy_coef=0.05),
    "temperature": dict(temperature=0.6),
    "seq-mean-token-mean": dict(loss_agg="seq-mean-token-mean"),
    "seq-mean-token-sum": dict(loss_agg="seq-mean-token-sum"),
    "everything": dict(
        clip_eps_high=0.3,
        dual_clip=2.0,
        kl_coef=0.2,
        with_ref=True,
        entropy_coef=0.02,
        temperature=1.3,
        loss_agg="seq-mean-token-mean",
    ),
}


def _call(fn, b, logits, options, mask="given", **extra):
    options = dict(options)
    ref = b["ref"] if options.pop("with_ref", False) else None
    return fn(
        logits,
        b["actions"],
        b["old"],
        b["adv"],
        b["mask"] if mask == "given" else mask,
        ref_logprobs=ref,
        **options,
        **extra,
    )


def _assert_outputs_close(out, expected, atol, rtol):
    torch.testing.assert_close(out.loss.cpu(), expected.loss.detach().cpu(), atol=atol, rtol=rtol)
    for name in ("logprobs", "entropy", *METRICS):
        got, want = getattr(out, name), getattr(expected, name)
        if want is None:
            assert got is None, name
        else:
            torch.testing.assert_close(got.cpu(), want.cpu(), atol=atol, rtol=rtol, msg=name)


@pytest.mark.parametrize("case", OPTION_CASES)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_matches_reference_float64(backend, case):
    b = _batch(device=_device(backend))
    x = b["logits"].requires_grad_()
    out = _call(ops.ppo_loss, b, x, OPTION_CASES[case], backend=backend)
    (grad,) = torch.autograd.grad(out.loss, x)
    cpu = {k: v.cpu() for k, v in b.items()}
    x_ref = cpu["logits"].detach().requires_grad_()
    expected = _call(reference.ppo_loss, cpu, x_ref, OPTION_CASES[case])
    (grad_ref,) = torch.autograd.grad(expected.loss, x_ref)
    assert out.loss.dtype == torch.float64 and out.logprobs.shape == (3, 5)
    _assert_outputs_close(out, expected, 1e-10, 1e-9)
    torch.testing.assert_close(grad.cpu(), grad_ref, atol=1e-12, rtol=1e-9)
    assert grad_ref[1].abs().max() == 0  # the masked sequence gets no gradient
    assert out.clipfrac > 0  # the inputs do exercise the clip


def test_options_change_the_loss():
    """Guards the option cases above: each one must make a difference on these inputs."""
    b = _batch()
    base = _call(reference.ppo_loss, b, b["logits"], {}).loss
    for case, options in OPTION_CASES.items():
        if case not in ("default", "kl_metric_only"):
            loss = _call(reference.ppo_loss, b, b["logits"], options).loss
            assert (loss - base).abs() > 1e-6, case


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float", "all_masked"])
def test_masks(backend, mask_kind):
    b = _batch(device=_device(backend))
    mask = {
        "none": None,
        "bool": b["mask"] > 0,
        "float": b["mask"],
        "all_masked": torch.zeros_like(b["mask"]),
    }[mask_kind]
    x = b["logits"].requires_grad_()
    out = _call(ops.ppo_loss, b, x, {"entropy_coef": 0.01}, mask=mask, backend=backend)
    (grad,) = torch.autograd.grad(out.loss, x)
    cpu_mask = None if mask is None else mask.cpu()
    expected = _call(
        reference.ppo_loss,
        {k: v.cpu() for k, v in b.items()},
        x.detach().cpu(),
        {"entropy_coef": 0.01},
        mask=cpu_mask,
    )
    _assert_outputs_close(out, expected, 1e-10, 1e-9)
    if mask_kind == "all_masked":
        assert out.loss.item() == 0 and grad.abs().max().item() == 0


@pytest.mark.parametrize("backend", ["torch", *[b for b in BACKENDS if not _interpreted(b)]])
def test_gradcheck_float64(backend):
    b = _batch(B=2, T=3, V=7, device=_device(backend), spread=0.1)
    options = dict(
        clip_eps_high=0.3,
        kl_coef=0.2,
        with_ref=True,
        entropy_coef=0.1,
        temperature=0.8,
        loss_agg="seq-mean-token-mean",
    )
    x = b["logits"].requires_grad_()
    assert torch.autograd.gradcheck(
        lambda t: _call(ops.ppo_loss, b, t, options, backend=backend).loss, (x,)
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_at_least_as_close_as_torch_in_that_dtype(backend, dtype):
    b32 = _batch(B=4, T=6, V=301, dtype=torch.float32, device=_device(backend))
    options = dict(entropy_coef=0.01, kl_coef=0.1, with_ref=True, clip_eps_high=0.28)

    def run(fn, logits, **extra):
        x = logits.detach().requires_grad_()
        out = _call(fn, b32, x, options, **extra)
        (grad,) = torch.autograd.grad(out.loss, x)
        return out, grad

    truth, truth_grad = run(reference.ppo_loss, b32["logits"])
    kernel, kernel_grad = run(ops.ppo_loss, b32["logits"].to(dtype), backend=backend)
    torch_low, torch_low_grad = run(reference.ppo_loss, b32["logits"].to(dtype))
    assert kernel_grad.dtype == dtype and kernel.loss.dtype == torch.float32
    truth_grad, kernel_grad, torch_low_grad = (
        g.float().cpu() for g in (truth_grad, kernel_grad, torch_low_grad)
    )
    for name in ("loss", "logprobs", "entropy"):
        want = getattr(truth, name).detach().cpu()
        err_kernel = (getattr(kernel, name).cpu() - want).abs().max().item()
        err_torch = (getattr(torch_low, name).cpu() - want).abs().max().item()
        assert err_kernel <= err_torch * 1.01 + 1e-5, name
    err_kernel = (kernel_grad - truth_grad).abs().max().item()
    err_torch = (torch_low_grad - truth_grad).abs().max().item()
    assert err_kernel <= err_torch * 1.01 + 1e-6


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ extension is not built")
@pytest.mark.parametrize("V", [151936, 256000])
def test_large_vocabulary_cpp(V):
    b = _batch(B=1, T=3, V=V, dtype=torch.float32, seed=V)
    b["logits"][0, 0, :1000] = float("-inf")  # a banned block of the vocabulary
    b["actions"][0, 0] = 5000
    b["old"][0, 0] = -12.0
    options = dict(entropy_coef=0.01, clip_eps_high=0.28, temperature=0.9)
    x = b["logits"].requires_grad_()
    out = _call(ops.ppo_loss, b, x, options, backend="cpp")
    (grad,) = torch.autograd.grad(out.loss, x)
    # the reference on float64 with -inf as a finite, negligible logit (it would give NaN)
    x64 = b["logits"].detach().double().clamp(min=-1e4).requires_grad_()
    expected = _call(reference.ppo_loss, b, x64, options)
    (grad_ref,) = torch.autograd.grad(expected.loss, x64)
    torch.testing.assert_close(out.loss.double(), expected.loss.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.logprobs.double(), expected.logprobs, atol=5e-5, rtol=1e-5)
    torch.testing.assert_close(out.entropy.double(), expected.entropy, atol=5e-5, rtol=1e-5)
    torch.testing.assert_close(grad.double(), grad_ref, atol=1e-9, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_infinity_logits(backend):
    b = _batch(device=_device(backend))
    b["logits"][..., :5] = float("-inf")
    b["actions"].clamp_(min=5)
    options = dict(entropy_coef=0.05, with_ref=True, kl_coef=0.1)
    x = b["logits"].requires_grad_()
    out = _call(ops.ppo_loss, b, x, options, backend=backend)
    (grad,) = torch.autograd.grad(out.loss, x)
    cpu = {k: v.cpu() for k, v in b.items()}
    x_ref = cpu["logits"].detach().clamp(min=-1e4).requires_grad_()  # exp underflows to 0
    expected = _call(reference.ppo_loss, cpu, x_ref, options)
    (grad_ref,) = torch.autograd.grad(expected.loss, x_ref)
    _assert_outputs_close(out, expected, 1e-10, 1e-9)
    torch.testing.assert_close(grad.cpu(), grad_ref, atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1, 1), (0, 4, 9), (2, 1, 3), (1, 2, 1000)])
def test_edge_shapes(backend, shape):
    B, T, V = shape
    b = _batch(B=max(B, 1), T=T, V=V, device=_device(backend))
    b = {k: v[:B] for k, v in b.items()}
    x = b["logits"].requires_grad_()
    out = _call(ops.ppo_loss, b, x, {"entropy_coef": 0.01}, backend=backend)
    (grad,) = torch.autograd.grad(out.loss, x)
    x_ref = x.detach().cpu().requires_grad_()
    expected = _call(
        reference.ppo_loss, {k: v.cpu() for k, v in b.items()}, x_ref, {"entropy_coef": 0.01}
    )
    (grad_ref,) = torch.autograd.grad(expected.loss, x_ref)
    _assert_outputs_close(out, expected, 1e-10, 1e-9)
    torch.testing.assert_close(grad.cpu(), grad_ref, atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flat_and_non_contiguous_inputs(backend):
    b = _batch(device=_device(backend))
    flat = {
        k: v.reshape(15, -1).squeeze(-1) if k != "logits" else v.reshape(15, -1)
        for k, v in b.items()
    }
    wide = torch.cat([flat["logits"], flat["logits"]], dim=-1)[:, :37]  # rows 2V apart
    assert not wide.is_contiguous()
    out = _call(ops.ppo_loss, flat, wide, {"entropy_coef": 0.01}, backend=backend)
    expected = _call(
        reference.ppo_loss,
        {k: v.cpu() for k, v in flat.items()},
        flat["logits"].cpu(),
        {"entropy_coef": 0.01},
    )
    assert out.logprobs.shape == (15,)
    _assert_outputs_close(out, expected, 1e-10, 1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_scaling_retain_graph_and_no_grad(backend):
    b = _batch(device=_device(backend))
    x = b["logits"].requires_grad_()
    out = _call(ops.ppo_loss, b, x, {"entropy_coef": 0.01}, backend=backend)
    (g1,) = torch.autograd.grad(out.loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(out.loss * 2.5, x, retain_graph=True)
    (g3,) = torch.autograd.grad(out.loss, x)
    torch.testing.assert_close(g2, 2.5 * g1)
    torch.testing.assert_close(g3, g1)
    with torch.no_grad():
        again = _call(ops.ppo_loss, b, x, {"entropy_coef": 0.01}, backend=backend)
    assert again.loss.grad_fn is None and again.loss.item() == out.loss.item()
    assert out.logprobs.grad_fn is None and out.entropy.grad_fn is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_grad_writes_the_gradient_over_the_logits(backend):
    b = _batch(device=_device(backend))
    options = dict(entropy_coef=0.01, with_ref=True, kl_coef=0.1)
    x = b["logits"].clone().requires_grad_()
    expected = _call(ops.ppo_loss, b, x, options, backend=backend)
    (grad,) = torch.autograd.grad(expected.loss, x)
    leaf = b["logits"].clone().requires_grad_()
    logits = leaf * 1.0  # a non-leaf, as a model's output
    out = _call(ops.ppo_loss, b, logits, options, backend=backend, inplace_grad=True)
    _assert_outputs_close(out, expected, 0, 0)
    torch.testing.assert_close(logits.detach(), grad, atol=0, rtol=0)  # destroyed, as documented
    (leaf_grad,) = torch.autograd.grad(out.loss * 3.0, leaf)
    torch.testing.assert_close(leaf_grad, 3.0 * grad)


ONCE = "backward can run once"


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_backward_hands_out_the_saved_gradient_without_a_copy(backend):
    b = _batch(device=_device(backend))
    x = b["logits"].requires_grad_()
    out = _call(ops.ppo_loss, b, x, {"entropy_coef": 0.01}, backend=backend)
    (saved,) = out.loss.grad_fn.saved_tensors
    out.loss.backward(retain_graph=True)
    assert x.grad.data_ptr() == saved.data_ptr()  # no second [N, V] buffer
    # a further backward gets its own copy, not the buffer that is now x.grad
    (again,) = torch.autograd.grad(out.loss, x)
    assert again.data_ptr() != saved.data_ptr()
    torch.testing.assert_close(again, x.grad, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_backward_is_right_or_a_clear_error(backend):
    b = _batch(device=_device(backend))
    x = b["logits"].requires_grad_()
    expected = _call(reference.ppo_loss, b, x, {"entropy_coef": 0.01})
    (grad,) = torch.autograd.grad(expected.loss, x)
    out = _call(ops.ppo_loss, b, x, {"entropy_coef": 0.01}, backend=backend)
    out.loss.backward(retain_graph=True)
    out.loss.backward(retain_graph=True)  # accumulates into the handed-out buffer
    torch.testing.assert_close(x.grad, 2 * grad)
    with pytest.raises(RuntimeError, match=ONCE):
        out.loss.backward(retain_graph=True)
    x.grad = None
    out = _call(ops.ppo_loss, b, x, {"entropy_coef": 0.01}, backend=backend)
    out.loss.backward(retain_graph=True)
    x.grad.zero_()
    with pytest.raises(RuntimeError, match=ONCE):
        out.loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_grad_second_backward_is_a_clear_error(backend):
    b = _batch(device=_device(backend))
    logits = b["logits"].clone().requires_grad_() * 1.0
    out = _call(ops.ppo_loss, b, logits, {}, backend=backend, inplace_grad=True)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=f"inplace_grad=True the fused op's {ONCE}"):
        out.loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_is_an_error_not_a_missing_term(backend):
    dev = _device(backend)
    b = _batch(B=1, T=4, V=9, device=dev)
    x = b["logits"].requires_grad_()
    out = _call(ops.ppo_loss, b, x, {}, backend=backend)
    with pytest.raises(RuntimeError, match="create_graph=True .* not supported"):
        torch.autograd.grad(out.loss, x, create_graph=True)
    hidden = torch.randn(1, 4, 5, dtype=torch.float64, device=dev, requires_grad=True)
    weight = torch.randn(9, 5, dtype=torch.float64, device=dev)
    out = _call(
        lambda h, *a, **k: linear_ops.fused_linear_ppo_loss(h, weight, *a, **k),
        b,
        hidden,
        {},
        backend=backend,
    )
    with pytest.raises(RuntimeError, match="create_graph=True .* not supported"):
        torch.autograd.grad(out.loss, hidden, create_graph=True)


def test_value_loss_matches_a_loop():
    gen = torch.Generator().manual_seed(3)
    v, old, ret = (torch.randn(3, 6, generator=gen, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(3, 6, generator=gen) > 0.3
    total, count = 0.0, 0
    for i in range(3):
        for t in range(6):
            if mask[i, t]:
                clipped = old[i, t] + min(max(v[i, t] - old[i, t], -0.2), 0.2)
                total += max((v[i, t] - ret[i, t]) ** 2, (clipped - ret[i, t]) ** 2)
                count += 1
    expected = 0.5 * total / count
    assert abs(ops.value_loss(v, old, ret, mask, clip=0.2).item() - expected) < 1e-12
    unclipped = 0.5 * ((v - ret) ** 2).mean()
    assert abs(ops.value_loss(v, old, ret, clip=None) - unclipped) < 1e-12


def test_gae_matches_a_loop():
    gen = torch.Generator().manual_seed(4)
    B, T, gamma, lam = 3, 7, 0.9, 0.8
    rewards = torch.randn(B, T, generator=gen, dtype=torch.float64)
    values = torch.randn(B, T, generator=gen, dtype=torch.float64)
    mask = torch.ones(B, T)
    mask[0, 5:] = 0  # right padding
    mask[1, 2] = 0  # a token inside the sequence that the policy did not produce
    mask[2] = 0
    adv_expected = torch.zeros(B, T, dtype=torch.float64)
    for i in range(B):
        positions = [t for t in range(T) if mask[i, t] > 0]
        next_value = next_adv = 0.0
        for t in reversed(positions):
            delta = rewards[i, t].item() + gamma * next_value - values[i, t].item()
            next_adv = delta + gamma * lam * next_adv
            next_value = values[i, t].item()
            adv_expected[i, t] = next_adv
    advantages, returns = ops.gae(rewards, values, mask, gamma=gamma, lam=lam)
    torch.testing.assert_close(advantages, adv_expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(returns, (adv_expected + values) * mask, atol=1e-12, rtol=0)


BAD_INPUTS = {
    "action_too_large": (lambda b: b["actions"].__setitem__((0, 0), 37), ValueError, "actions"),
    "action_negative": (lambda b: b["actions"].__setitem__((0, 1), -1), ValueError, "actions"),
    "float_actions": (
        lambda b: b.__setitem__("actions", b["actions"].double()),
        TypeError,
        "actions",
    ),
    "old_shape": (lambda b: b.__setitem__("old", b["old"][:, :4]), ValueError, "old_logprobs"),
    "adv_shape": (lambda b: b.__setitem__("adv", b["adv"].reshape(-1)), ValueError, "advantages"),
    "mask_shape": (lambda b: b.__setitem__("mask", b["mask"].t()), ValueError, "mask"),
    "mask_not_binary": (lambda b: b["mask"].__setitem__((0, 0), 0.5), ValueError, "mask"),
    "adv_nan": (lambda b: b["adv"].__setitem__((2, 1), float("nan")), ValueError, "advantages"),
    "adv_inf": (lambda b: b["adv"].__setitem__((2, 1), float("inf")), ValueError, "advantages"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_bad_inputs_raise_naming_the_argument(backend, case):
    b = _batch()
    change, error, name = BAD_INPUTS[case]
    change(b)
    with pytest.raises(error, match=name):
        _call(ops.ppo_loss, b, b["logits"], {}, backend=backend)


@pytest.mark.parametrize(
    "options, name",
    [
        (dict(kl_estimator="k4"), "kl_estimator"),
        (dict(loss_agg="seq-sum"), "loss_agg"),
        (dict(dual_clip=0.9), "dual_clip"),
        (dict(temperature=0.0), "temperature"),
        (dict(kl_coef=0.1), "ref_logprobs"),
        (dict(clip_eps=-0.1), "clip_eps"),
        (dict(entropy_coef=float("nan")), "entropy_coef"),
    ],
)
def test_bad_options_raise_naming_the_argument(options, name):
    b = _batch()
    with pytest.raises(ValueError, match=name):
        _call(ops.ppo_loss, b, b["logits"], options)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ extension is not built")
def test_cpp_kernel_refuses_actions_out_of_range():
    """The op layer's range check is skipped under torch.compile; the kernel's is not."""
    x = torch.randn(3, 10)
    with pytest.raises(RuntimeError, match="actions"):
        torch.ops.rlgaf_fast_C.ppo_loss_fwd(x, torch.tensor([0, 10, 2]), 1.0)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if not _interpreted(b)])
def test_torch_compile_fullgraph(backend):
    dev = _device(backend)
    b = _batch(dtype=torch.float32, device=dev)
    weight = torch.randn(37, 8, device=dev, requires_grad=True)
    hidden = torch.randn(3, 5, 8, device=dev, requires_grad=True)
    options = dict(entropy_coef=0.01, with_ref=True, kl_coef=0.1, loss_agg="seq-mean-token-mean")

    def step(x, h):
        out = _call(ops.ppo_loss, b, x, options, backend=backend)
        fused = _call(
            lambda t, *a, **k: linear_ops.fused_linear_ppo_loss(t, weight, *a, **k),
            b,
            h,
            options,
            backend=backend,
            chunk_size=4,
        )
        return out.loss * 2 + fused.loss + out.clipfrac

    x = b["logits"].requires_grad_()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(x, hidden)
    grads = torch.autograd.grad(loss, (x, hidden, weight))
    loss_eager = step(x, hidden)
    grads_eager = torch.autograd.grad(loss_eager, (x, hidden, weight))
    torch.testing.assert_close(loss, loss_eager)
    for got, want in zip(grads, grads_eager, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if not _interpreted(b)])
def test_opcheck(backend):
    dev = _device(backend)
    b = _batch(B=1, T=4, V=33, dtype=torch.float32, device=dev)
    flat = lambda t: t.reshape(-1).contiguous()  # noqa: E731
    tokens = (flat(b["actions"]), flat(b["old"]), flat(b["adv"]))
    weight = torch.full((4,), 0.25, device=dev)
    x = b["logits"].reshape(4, 33).requires_grad_()
    options = PPOOptions(0.8, 1.28, 2.0, 0.1, "k2", 0.01, 0.9).op_arguments()
    for compute_grad in (True, False):
        torch.library.opcheck(
            torch.ops.rlgaf_fast.ppo_loss.default,
            (x, *tokens, flat(b["ref"]), weight),
            dict(**options, compute_grad=compute_grad, backend=backend),
        )
    hidden = torch.randn(4, 8, device=dev, requires_grad=True)
    w = torch.randn(33, 8, device=dev, requires_grad=True)
    bias = torch.randn(33, device=dev, requires_grad=True)
    flags = dict(grad_hidden_needed=True, grad_weight_needed=True, grad_bias_needed=True)
    torch.library.opcheck(
        torch.ops.rlgaf_fast.fused_linear_ppo_loss.default,
        (hidden, w, bias, *tokens, None, weight),
        dict(**options, chunk_size=3, **flags, backend=backend),
    )


def test_options_cross_the_op_boundary_by_name():
    """PPOOptions spread into the custom op's arguments of the same names and gather back, so an
    inserted option cannot shift the others."""
    options = PPOOptions(0.7, 1.3, 2.5, 0.2, "k1", 0.05, 0.8)
    arguments = {"logits": None, **options.op_arguments(), "backend": "cpp"}
    assert PPOOptions.from_op_arguments(arguments) == options
    assert options.kernel_arguments()["kl_estimator"] == 1
    for op in (ops._ppo_loss_impl, linear_ops._fused_linear_impl):
        names = list(inspect.signature(op).parameters)
        assert set(options.op_arguments()) <= set(names), op


def test_public_names_are_exported():
    for name in ("ppo_loss", "value_loss", "gae", "PPOLossOutput"):
        assert getattr(rlgaf_fast, name) is getattr(ops, name), name
    assert rlgaf_fast.fused_linear_ppo_loss is linear_ops.fused_linear_ppo_loss


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_vjp_from_lse_equals_the_two_pass_vjp(backend, dtype):
    """ppo_loss_vjp_lse (one sweep, from the lse and entropy of ppo_loss_fwd) writes the gradient
    of ppo_loss_fwd_vjp, also for -inf logits, at the action's own element and for rows whose
    coefficients are both 0 (masked out: exactly 0, even with NaN logits); against the float64
    reference's gradient as well."""
    from rlgaf_fast._backend import kernel_module

    kernels = kernel_module("ppo_loss", backend)
    dev = _device(backend)
    gen = torch.Generator().manual_seed(3)
    N, V, T = 6, 300, 0.8
    x64 = torch.randn(N, V, generator=gen, dtype=torch.float64) * 3
    x64[1, :7] = float("-inf")
    actions = torch.randint(7, V, (N,), generator=gen)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g_lp = torch.randn(N, generator=gen, dtype=acc)
    g_h = torch.randn(N, generator=gen, dtype=acc)
    g_lp[4] = g_h[4] = 0.0
    x64[4, 11] = float("nan")
    x = x64.to(dtype).to(dev)
    a, g_lp, g_h = actions.to(dev), g_lp.to(dev), g_h.to(dev)
    _, entropy, lse = kernels.ppo_loss_fwd(x, a, T)
    one_sweep = torch.empty_like(x)
    kernels.ppo_loss_vjp_lse(x, a, g_lp, g_h, lse, entropy, T, one_sweep)
    two_pass = torch.empty_like(x)
    kernels.ppo_loss_fwd_vjp(x, a, g_lp, g_h, T, two_pass)
    assert (one_sweep[4] == 0).all()
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(
        one_sweep.cpu().double(), two_pass.cpu().double(), atol=tol, rtol=tol
    )
    # against autograd of the float64 reference (log_softmax and entropy of the same rows)
    leaf = x.cpu().double().clamp(min=-1e4).requires_grad_()
    logp_all = torch.log_softmax(leaf / T, -1)
    logp = logp_all.gather(1, actions[:, None])[:, 0]
    ent = -(logp_all.exp() * logp_all).sum(-1)
    rows = torch.arange(N) != 4
    objective = (g_lp.cpu().double() * logp + g_h.cpu().double() * ent)[rows].sum()
    (want,) = torch.autograd.grad(objective, leaf)
    got = one_sweep.cpu().double()
    torch.testing.assert_close(got[rows], want[rows], atol=tol * 10, rtol=tol * 10)
    # in place: the gradient written over the logits themselves
    in_place = x.clone()
    kernels.ppo_loss_vjp_lse(in_place, a, g_lp, g_h, lse, entropy, T, in_place)
    torch.testing.assert_close(in_place, one_sweep, atol=0, rtol=0)
