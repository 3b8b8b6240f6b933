"""The policy-loss variants of ppo_loss and fused_linear_ppo_loss (Dr. GRPO's constant
normalisation, DAPO's global token count, GSPO's sequence-level ratio, CISPO, the rollout
correction, the k3+ estimator, the clamped log-ratio) against rlgaf_fast.reference in float64,
forward and backward, on every PPO backend; and the reference itself against the published
formulas written out by hand."""

import pytest
import torch

import rlgaf_fast
from rlgaf_fast import reference
from rlgaf_fast.ops.registry import has_kernel
from tests.conftest import fused_backends

BACKENDS = ["torch", *(b for b in fused_backends() if has_kernel("ppo_loss", b))]
METRICS = ("clipfrac", "approx_kl", "ratio_mean", "kl")

VARIANTS = {
    "dr-grpo": dict(loss_agg="seq-mean-token-sum-norm"),
    "dr-grpo-norm": dict(loss_agg="seq-mean-token-sum-norm", loss_agg_norm=7.5),
    "dapo-global": dict(num_items_in_batch=17),
    "gspo": dict(importance_sampling_level="sequence", clip_eps=0.1),
    "cispo": dict(policy_loss="cispo", clip_eps_high=0.28),
    "tis": dict(rollout_correction="truncate", rollout_cap=1.5),
    "rollout-mask": dict(rollout_correction="mask"),
    "k3+": dict(kl_coef=0.3, kl_estimator="k3+"),
    "clamped-log-ratio": dict(extreme=True, dual_clip=3.0),
    "gspo+k3+entropy+tis": dict(
        importance_sampling_level="sequence",
        kl_coef=0.2,
        kl_estimator="k3+",
        entropy_coef=0.03,
        rollout_correction="truncate",
        loss_agg="seq-mean-token-mean",
    ),
    "cispo+dr-grpo+mask+temperature": dict(
        policy_loss="cispo",
        loss_agg="seq-mean-token-sum-norm",
        rollout_correction="mask",
        temperature=0.7,
        entropy_coef=0.01,
    ),
    "gspo+cispo+dapo": dict(
        importance_sampling_level="sequence", policy_loss="cispo", num_items_in_batch=9.0
    ),
    "gspo+dual-clip+clamped": dict(
        importance_sampling_level="sequence", dual_clip=2.0, extreme=True, clip_eps=0.3
    ),
}


def _device(backend: str) -> str:
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def _batch(B=3, T=6, V=37, H=8, seed=0, extreme=False):
    """float64 tensors: hidden states and head, logits, and token tensors with ratios and
    rollout ratios spread around 1, one fully masked and one ragged sequence; with extreme,
    log-ratios beyond +-20 too."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64)
    bias = torch.randn(V, generator=gen, dtype=torch.float64)
    logits = torch.nn.functional.linear(hidden, weight, bias)
    actions = torch.randint(0, V, (B, T), generator=gen)
    logp = torch.log_softmax(logits, -1).gather(-1, actions[..., None])[..., 0]

    def noisy(scale):
        return logp + scale * torch.randn(B, T, generator=gen, dtype=torch.float64)

    old = noisy(0.3)
    if extreme:
        old[0, 1], old[0, 3], old[2, 0] = logp[0, 1] + 25.0, logp[0, 3] - 30.0, logp[2, 0] - 21
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[1] = 0
    mask[-1, T // 2 :] = 0
    return dict(
        hidden=hidden,
        weight=weight,
        bias=bias,
        logits=logits,
        actions=actions,
        old=old,
        adv=torch.randn(B, T, generator=gen, dtype=torch.float64),
        ref=noisy(0.4),
        rollout=old + 0.5 * torch.randn(B, T, generator=gen, dtype=torch.float64),
        mask=mask,
    )


def _kwargs(variant: dict, b: dict, device) -> dict:
    kwargs = {k: v for k, v in variant.items() if k != "extreme"}
    if "rollout_correction" in kwargs:
        kwargs["rollout_logprobs"] = b["rollout"].to(device)
    if kwargs.get("kl_coef"):
        kwargs["ref_logprobs"] = b["ref"].to(device)
    return kwargs


def _reference(b: dict, variant: dict):
    x = b["logits"].clone().requires_grad_()
    tokens = (b["actions"], b["old"], b["adv"], b["mask"])
    out = reference.ppo_loss(x, *tokens, **_kwargs(variant, b, "cpu"))
    (grad,) = torch.autograd.grad(out.loss, x)
    return out, grad


def _close(actual, expected, tol):
    torch.testing.assert_close(actual.cpu().double(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_ppo_loss_variant_matches_reference(name, backend):
    variant = VARIANTS[name]
    dev = _device(backend)
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 2e-5)):
        b = _batch(extreme=variant.get("extreme", False))
        ref, ref_grad = _reference(b, variant)
        x = b["logits"].to(dev, dtype).requires_grad_()
        cd = x.dtype
        tokens = [b["actions"].to(dev), *(b[k].to(dev, cd) for k in ("old", "adv", "mask"))]
        out = rlgaf_fast.ppo_loss(x, *tokens, **_kwargs(variant, b, dev), backend=backend)
        (grad,) = torch.autograd.grad(out.loss, x)
        scale = max(1.0, ref.loss.abs().item())
        _close(out.loss / scale, ref.loss / scale, tol)
        _close(grad, ref_grad, tol)
        for metric in METRICS:
            if getattr(ref, metric) is not None:
                _close(getattr(out, metric) / scale, getattr(ref, metric) / scale, tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_fused_linear_variant_equals_ppo_loss(name, backend):
    """fused_linear_ppo_loss (chunks that cut sequences) against ppo_loss of the same logits,
    and both against the reference."""
    variant = VARIANTS[name]
    dev = _device(backend)
    b = _batch(extreme=variant.get("extreme", False))
    kwargs = _kwargs(variant, b, dev)
    tokens = [b["actions"].to(dev), *(b[k].to(dev) for k in ("old", "adv", "mask"))]
    leaves = [b[k].to(dev).requires_grad_() for k in ("hidden", "weight", "bias")]
    hidden, weight, bias = leaves
    fused = rlgaf_fast.fused_linear_ppo_loss(
        hidden, weight, *tokens, bias=bias, chunk_size=4, **kwargs, backend=backend
    )
    fused_grads = torch.autograd.grad(fused.loss, leaves)
    logits = torch.nn.functional.linear(hidden, weight, bias)
    plain = rlgaf_fast.ppo_loss(logits, *tokens, **kwargs, backend=backend)
    plain_grads = torch.autograd.grad(plain.loss, leaves)
    ref = reference.ppo_loss(torch.nn.functional.linear(*leaves), *tokens, **kwargs)
    ref_grads = torch.autograd.grad(ref.loss, leaves)
    scale = max(1.0, ref.loss.abs().item())
    for out, grads in ((fused, fused_grads), (plain, plain_grads)):
        _close(out.loss / scale, ref.loss.detach().cpu() / scale, 1e-9)
        for g, r in zip(grads, ref_grads, strict=True):
            _close(g, r.cpu(), 1e-8)
    torch.testing.assert_close(fused.loss, plain.loss, atol=1e-12, rtol=1e-12)


def test_reference_follows_the_published_formulas():
    """Each variant's loss written out per sequence and token, by hand."""
    b = _batch()
    B, T = b["mask"].shape
    m, A, old = b["mask"], b["adv"], b["old"]

    def ppo_term(r, eps_low=0.2, eps_high=0.2):
        return torch.maximum(-A * r, -A * r.clamp(1 - eps_low, 1 + eps_high))

    x = b["logits"].clone().requires_grad_()
    lp = torch.log_softmax(x, -1).gather(-1, b["actions"][..., None])[..., 0]
    r = torch.exp(lp - old)
    tokens = (b["actions"], old, A, m)
    # Dr. GRPO: sum of masked token losses over B * T
    expected = (ppo_term(r) * m).sum() / (B * T)
    actual = reference.ppo_loss(x, *tokens, loss_agg="seq-mean-token-sum-norm").loss
    torch.testing.assert_close(actual, expected)
    # DAPO's global normalisation
    expected = (ppo_term(r) * m).sum() / 11
    actual = reference.ppo_loss(x, *tokens, num_items_in_batch=11).loss
    torch.testing.assert_close(actual, expected)
    # GSPO: one ratio per sequence, the gradient reaching every token of the sequence
    total = 0
    counted = 0
    for i in range(B):
        if m[i].sum() == 0:
            continue
        s = torch.exp(((lp[i] - old[i]) * m[i]).sum() / m[i].sum())
        total = total + (ppo_term(s)[i] * m[i]).sum() / m[i].sum()
        counted += 1
    expected = total / counted
    actual = reference.ppo_loss(
        x, *tokens, importance_sampling_level="sequence", loss_agg="seq-mean-token-mean"
    ).loss
    torch.testing.assert_close(actual, expected)
    grads = torch.autograd.grad(actual - expected, x, retain_graph=True)[0]
    torch.testing.assert_close(grads, torch.zeros_like(grads), atol=1e-12, rtol=0)
    # CISPO: -sg(min(r, 1 + eps_high)) * A * logp
    expected = ((-r.clamp(max=1.28).detach() * A * lp) * m).sum() / m.sum()
    actual = reference.ppo_loss(x, *tokens, policy_loss="cispo", clip_eps_high=0.28).loss
    grads = torch.autograd.grad(actual - expected, x, retain_graph=True)[0]
    torch.testing.assert_close(grads, torch.zeros_like(grads), atol=1e-12, rtol=0)
    # TIS and the rollout mask
    rho = torch.exp(old - b["rollout"])
    for correction, factor in (("truncate", rho.clamp(max=2.0)), ("mask", (rho <= 2.0).double())):
        expected = (ppo_term(r) * factor * m).sum() / m.sum()
        actual = reference.ppo_loss(
            x, *tokens, rollout_logprobs=b["rollout"], rollout_correction=correction
        ).loss
        torch.testing.assert_close(actual, expected)
    # k3+: k3's value, k2's gradient
    d = lp - b["ref"]
    k3 = torch.exp(-d) + d - 1
    out = reference.ppo_loss(x, *tokens, ref_logprobs=b["ref"], kl_coef=1.0, kl_estimator="k3+")
    torch.testing.assert_close(out.kl, (k3 * m).sum() / m.sum())
    expected = ((ppo_term(r) + 0.5 * d * d) * m).sum() / m.sum()
    grads = torch.autograd.grad(out.loss - expected, x, retain_graph=True)[0]
    torch.testing.assert_close(grads, torch.zeros_like(grads), atol=1e-12, rtol=0)


def test_clamped_log_ratio_has_no_gradient_beyond_the_clamp():
    b = _batch(extreme=True)
    x = b["logits"].clone().requires_grad_()
    out = reference.ppo_loss(x, b["actions"], b["old"], -b["adv"].abs(), b["mask"])
    (grad,) = torch.autograd.grad(out.loss, x)
    assert torch.isfinite(out.loss)
    for i, t in ((0, 1), (0, 3), (2, 0)):
        assert (grad[i, t] == 0).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(loss_agg="seq-mean-token-sum-norm", loss_agg_norm=0), "loss_agg_norm must be > 0"),
        (dict(loss_agg_norm=4.0), "loss_agg_norm applies to loss_agg='seq-mean-token-sum-norm'"),
        (dict(num_items_in_batch=0), "num_items_in_batch must be > 0, got 0"),
        (dict(num_items_in_batch=3, loss_agg="seq-mean-token-mean"), "num_items_in_batch"),
        (dict(policy_loss="grpo"), "policy_loss must be one of"),
        (dict(importance_sampling_level="seq"), "importance_sampling_level must be one of"),
        (dict(rollout_correction="truncate"), "rollout_logprobs and rollout_correction"),
        (dict(rollout_correction="clip", rollout=True), "rollout_correction must be one of"),
        (dict(rollout_cap=0.0), "rollout_cap must be > 0"),
        (dict(policy_loss="cispo", dual_clip=2.0), "dual_clip applies to policy_loss='ppo'"),
        (dict(kl_estimator="k4"), "kl_estimator must be one of"),
    ],
)
def test_variant_errors_name_the_argument(kwargs, message):
    b = _batch()
    kwargs = dict(kwargs)
    if kwargs.pop("rollout", False):
        kwargs["rollout_logprobs"] = b["rollout"]
    tokens = (b["actions"], b["old"], b["adv"], b["mask"])
    for fn, head in (
        (rlgaf_fast.ppo_loss, (b["logits"],)),
        (rlgaf_fast.fused_linear_ppo_loss, (b["hidden"], b["weight"])),
    ):
        with pytest.raises(ValueError, match=message):
            fn(*head, *tokens, **kwargs, backend="torch")
