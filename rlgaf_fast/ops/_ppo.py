"""What the fused PPO losses (ppo_loss, fused_linear_ppo_loss, token_logprobs) share: their
options as one named structure, the per-token terms and aggregation weights, the kernel call,
input checks, and the autograd helpers that hand out a gradient computed in the forward pass.

The fused backends (cpp, triton) share one kernel contract (csrc/cpu/ppo_loss.cpp,
kernels/ppo_loss.py): per row of logits [N, V] one read computes logsumexp, the action's
log-prob and the entropy, and, when a gradient is wanted, the same kernel call writes
d loss / d logits. The gradient is produced in the forward pass because it depends only on
per-token values and on the per-token weights w[n] = d loss / d loss_n of the aggregation, which
are computed beforehand from the mask alone; backward then only scales it by the incoming
gradient (nothing at all in the usual case where that is exactly 1: the first backward gets the
saved gradient itself, later ones a copy). Hence two limits of the fused backends, both clear
errors: no second derivative (create_graph=True), and no further backward once the handed-out
gradient has been changed in place (e.g. accumulated into .grad by a second backward of a
retained graph). The torch backend is rlgaf_fast.reference itself, without them.

The kernels derive d loss / d logp themselves for the clipped PPO objective with token-level
ratios (PPOOptions.kernel_gradient). Every other policy loss (CISPO, GSPO's sequence-level
ratio) is written once, below, in O(N) torch: a first kernel call gives the log-probabilities
and entropies, autograd through token_terms gives the coefficients d loss / d logp_n and
d loss / d H_n, and the kernel's ppo_loss_fwd_vjp writes the gradient: one more read of the
logits, no new kernel per variant. Factors of a token's loss that carry no gradient (the
aggregation, DAPO's global token count, Dr. GRPO's constant, the rollout correction) are
folded into the token weights.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from rlgaf_fast import reference
from rlgaf_fast.ops._checks import check_floating, check_tensor
from rlgaf_fast.reference import (
    IMPORTANCE_SAMPLING_LEVELS,
    KL_ESTIMATORS,
    LOG_RATIO_CLAMP,
    LOSS_AGGS,
    POLICY_LOSSES,
    ROLLOUT_CORRECTIONS,
    PPOLossOutput,
)

# the kernels only use the estimator's gradient: k3+ has k2's
_KL_CODES = {"k1": 1, "k2": 2, "k3": 3, "k3+": 2}
_KERNEL_OPTIONS = (
    "ratio_low",
    "ratio_high",
    "dual_clip",
    "kl_coef",
    "kl_estimator",
    "entropy_coef",
    "temperature",
)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- options: one named structure across the custom-op boundary -------------------------------


@dataclasses.dataclass(frozen=True)
class PPOOptions:
    """The loss's checked scalar options. A custom op's arguments must be tensors and scalars,
    so :meth:`op_arguments` spreads them into the op's arguments of the same names and
    :meth:`from_op_arguments` gathers them back: adding an option is one field here and one
    argument in each op's signature, and no index moves.

    ratio_low, ratio_high: the ratio clip range. dual_clip: the dual-clip constant, 0 for none.
    kl_estimator: "k1", "k2", "k3" or "k3+". temperature: the logits are divided by it.
    policy_loss: "ppo" or "cispo". importance_sampling_level: "token" or "sequence" (GSPO).
    The aggregation and the rollout correction reach the op as the token weights.
    """

    ratio_low: float = 0.8
    ratio_high: float = 1.2
    dual_clip: float = 0.0
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    temperature: float = 1.0
    policy_loss: str = "ppo"
    importance_sampling_level: str = "token"

    @property
    def kernel_gradient(self) -> bool:
        """Whether the kernels derive d loss / d logp themselves (ppo_loss_fwd_grad)."""
        return self.policy_loss == "ppo" and self.importance_sampling_level == "token"

    @property
    def couples_tokens(self) -> bool:
        """Whether a token's gradient depends on other tokens' log-probabilities."""
        return self.importance_sampling_level == "sequence"

    def op_arguments(self) -> dict[str, float | str]:
        """The options as the custom ops' keyword arguments."""
        return dataclasses.asdict(self)

    @classmethod
    def from_op_arguments(cls, arguments: dict[str, object]) -> PPOOptions:
        """The options out of a custom op's arguments by name (other arguments ignored)."""
        return cls(**{f.name: arguments[f.name] for f in dataclasses.fields(cls)})

    def kernel_arguments(self) -> dict[str, float | int]:
        """The options as the kernels' ppo_loss_fwd_grad takes them: kl_estimator as its code."""
        arguments = {name: getattr(self, name) for name in _KERNEL_OPTIONS}
        return {**arguments, "kl_estimator": _KL_CODES[self.kl_estimator]}


class OpArguments:
    """The argument names of a custom op's Python function: to read the inputs that autograd
    hands to setup_context as a tuple by name, and to give backward's one gradient per input by
    name."""

    def __init__(self, fn: Callable) -> None:
        self.signature = inspect.signature(fn)
        self.names = tuple(self.signature.parameters)

    def named(self, inputs: tuple, kwargs: dict | None = None) -> dict[str, object]:
        return dict(self.signature.bind(*inputs, **(kwargs or {})).arguments)

    def gradients(self, **grads: Tensor | None) -> tuple[Tensor | None, ...]:
        """One entry per argument: the named gradients, None for the others."""
        unknown = set(grads) - set(self.names)
        if unknown:
            raise KeyError(f"not arguments of the op: {sorted(unknown)}")
        return tuple(grads.get(name) for name in self.names)


class TokenInputs(NamedTuple):
    """The fused paths' flat per-token tensors [N] (actions int64, the others in the compute
    dtype), as the kernels take them; sequence_mask, for sequence-level ratios only, is the
    mask as [sequences, T]."""

    actions: Tensor
    old_logprobs: Tensor
    advantages: Tensor
    ref_logprobs: Tensor | None
    token_weight: Tensor
    sequence_mask: Tensor | None = None

    def rows(self, start: int, end: int) -> TokenInputs:
        """Tokens start..end; without sequence_mask (a slice may cut a sequence)."""
        return TokenInputs(*(None if t is None else t[start:end] for t in self[:-1]))

    def kernel_arguments(self) -> dict[str, Tensor | None]:
        """The tensors as ppo_loss_fwd_grad takes them."""
        return {name: getattr(self, name) for name in self._fields[:-1]}


# --- per-token terms and aggregation weights (O(N) torch) -------------------------------------


def ratio_of(logprobs: Tensor, tokens: TokenInputs, options: PPOOptions) -> Tensor:
    """exp of the clamped log-ratio per token: the token's own, or its sequence's masked mean."""
    log_ratio = logprobs - tokens.old_logprobs
    if options.importance_sampling_level == "sequence":
        seqs = tokens.sequence_mask
        if seqs is None:
            raise ValueError("a sequence-level ratio needs the tokens' sequence_mask")
        seq_sum = reference._masked(log_ratio.reshape(seqs.shape), seqs).sum(-1, keepdim=True)
        seq_mean = seq_sum / seqs.sum(-1, keepdim=True).clamp(min=1)
        log_ratio = seq_mean.expand(seqs.shape).reshape(-1)
    return torch.exp(torch.clamp(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


def token_terms(
    logprobs: Tensor, entropy: Tensor, tokens: TokenInputs, options: PPOOptions
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(loss_n, ratio, clipped indicator, kl_n or None) per token."""
    advantages = tokens.advantages
    ratio = ratio_of(logprobs, tokens, options)
    if options.policy_loss == "cispo":
        token_loss = -torch.clamp(ratio, max=options.ratio_high).detach() * advantages * logprobs
        clipped_tokens = ratio > options.ratio_high
    else:
        unclipped = -advantages * ratio
        clipped = -advantages * torch.clamp(ratio, options.ratio_low, options.ratio_high)
        token_loss = torch.maximum(unclipped, clipped)
        clipped_tokens = clipped > unclipped
        if options.dual_clip > 0:
            token_loss = torch.where(
                advantages < 0,
                torch.minimum(token_loss, -options.dual_clip * advantages),
                token_loss,
            )
    kl = None
    if tokens.ref_logprobs is not None:
        kl = reference.kl_estimate(logprobs, tokens.ref_logprobs, options.kl_estimator)
        token_loss = token_loss + options.kl_coef * kl
    token_loss = token_loss - options.entropy_coef * entropy
    return token_loss, ratio, clipped_tokens, kl


def weighted_loss(
    logprobs: Tensor, entropy: Tensor, tokens: TokenInputs, options: PPOOptions
) -> Tensor:
    """sum_n token_weight[n] * loss_n: the aggregated loss."""
    token_loss = token_terms(logprobs, entropy, tokens, options)[0]
    return reference._masked(token_loss, tokens.token_weight).sum()


def loss_coefficients(
    logprobs: Tensor, entropy: Tensor, tokens: TokenInputs, options: PPOOptions
) -> tuple[Tensor, Tensor]:
    """(d loss / d logp_n, d loss / d H_n) [N] of the weighted loss, by autograd on O(N) terms
    (torch.func: inside a custom op's implementation the autograd of tensors is off)."""

    def loss(lp: Tensor, ent: Tensor) -> Tensor:
        return weighted_loss(lp, ent, tokens, options)

    value, vjp = torch.func.vjp(loss, logprobs.detach(), entropy.detach())
    return tuple(g.contiguous() for g in vjp(torch.ones_like(value)))


def token_weights(
    mask: Tensor,
    loss_agg: str,
    loss_agg_norm: float | None = None,
    num_items_in_batch: float | None = None,
) -> Tensor:
    """w = d loss / d loss_n for the aggregation (same shape as mask, [..., T])."""
    if loss_agg == "token-mean":
        if num_items_in_batch is not None:
            return mask / num_items_in_batch
        return mask / mask.sum().clamp(min=1)
    seqs = mask.reshape(reference._sequences(mask))
    if loss_agg == "seq-mean-token-sum-norm":
        norm = mask.shape[-1] if loss_agg_norm is None else loss_agg_norm
        return mask / (seqs.shape[0] * norm)
    count = seqs.sum(-1, keepdim=True)
    n_seqs = (count > 0).sum().clamp(min=1)
    if loss_agg == "seq-mean-token-mean":
        return (seqs / (count.clamp(min=1) * n_seqs)).reshape(mask.shape)
    return (seqs / n_seqs).reshape(mask.shape)


def is_exactly_one(grad: Tensor) -> bool:
    """Whether an incoming gradient is a concrete tensor equal to 1 (never while tracing)."""
    if type(grad) is not Tensor or is_fake(grad) or torch.compiler.is_compiling():
        return False
    if torch._C._functorch.is_functorch_wrapped_tensor(grad):
        return False
    return bool(grad == 1)


def refuse_double_backward(op: str) -> None:
    """Raises when a backward runs with create_graph=True (grad mode is then on in backward):
    the fused gradient is a plain tensor, so its own gradient would silently be missing."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(
            f"{op}: the fused backends have no second derivative, so create_graph=True (double "
            f"backward, e.g. a gradient penalty) is not supported; use backend='torch'"
        )


def saved_gradients(ctx, op: str) -> tuple[Tensor, ...]:
    """ctx.saved_tensors, with a clear error where a gradient that an earlier backward handed
    out without a copy (see _handed_out) has since been changed in place."""
    try:
        return ctx.saved_tensors
    except RuntimeError as error:
        if "inplace" not in str(error):
            raise
        raise RuntimeError(
            f"{op}: the fused op's backward can run once: its saved gradient went to an earlier "
            f"backward without a copy and has since been changed in place (.grad accumulation, "
            f"zero_(), clip_grad_norm_, ...). retain_graph is not supported with this op; use "
            f"backend='torch'"
        ) from error


def times(grads: list[Tensor | None], scale: Tensor) -> list[Tensor | None]:
    """grad * scale, in each gradient's dtype."""
    return [None if g is None else g * scale.to(g.dtype) for g in grads]


def scaled(grads: list[Tensor | None], scale: Tensor) -> list[Tensor | None]:
    """grad * scale (in each gradient's dtype), or the gradients themselves for a scale of
    exactly 1."""
    return grads if is_exactly_one(scale) else times(grads, scale)


def handed_out(ctx, grads: list[Tensor | None], scale: Tensor) -> list[Tensor | None]:
    """grad * scale of each saved gradient for a backward of ctx's node. For a scale of exactly
    1 the first backward gets the saved buffers themselves, so that the usual single backward
    never copies an [N, V] gradient; as they may become .grad tensors that are later changed in
    place, every further backward gets copies."""
    if not is_exactly_one(scale):
        return times(grads, scale)
    if getattr(ctx, "gradients_handed_out", False):
        return [None if g is None else g.clone() for g in grads]
    ctx.gradients_handed_out = True
    return grads


# --- the kernel call ----------------------------------------------------------------------------


def fused_rows(
    kernels,
    logits: Tensor,
    tokens: TokenInputs,
    options: PPOOptions,
    grad: Tensor | None,
    coefficients: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """The kernel call: (logprobs, entropy) of logits [N, V], the gradient into grad if given.
    coefficients: (d loss / d logp, d loss / d H) of these rows, computed beforehand where they
    depend on tokens outside them (PPOOptions.couples_tokens)."""
    if grad is None:
        return kernels.ppo_loss_fwd(logits, tokens.actions, options.temperature)[:2]
    if options.kernel_gradient:
        return kernels.ppo_loss_fwd_grad(
            logits, **tokens.kernel_arguments(), **options.kernel_arguments(), grad_logits=grad
        )
    if coefficients is None:
        logprobs, entropy, _ = kernels.ppo_loss_fwd(logits, tokens.actions, options.temperature)
        coefficients = loss_coefficients(logprobs, entropy, tokens, options)
    return kernels.ppo_loss_fwd_vjp(
        logits, tokens.actions, *coefficients, options.temperature, grad
    )


# --- validation -------------------------------------------------------------------------------


def _finite(value, name, low=None):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return float(value)


def _positive(value, name):
    value = _finite(value, name)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value:g}")
    return value


def _one_of(value, name, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def check_options(
    *,
    clip_eps,
    clip_eps_high,
    dual_clip,
    kl_coef,
    kl_estimator,
    entropy_coef,
    temperature: float,
    loss_agg,
    ref_logprobs,
    loss_agg_norm=None,
    num_items_in_batch=None,
    policy_loss="ppo",
    importance_sampling_level="token",
    rollout_logprobs=None,
    rollout_correction=None,
    rollout_cap=2.0,
) -> PPOOptions:
    """The public functions' scalar options, checked (temperature already is), as PPOOptions.
    The aggregation and rollout options are only checked: they reach the op as token weights."""
    clip_eps = _finite(clip_eps, "clip_eps", 0.0)
    eps_high = clip_eps if clip_eps_high is None else _finite(clip_eps_high, "clip_eps_high", 0.0)
    _one_of(policy_loss, "policy_loss", POLICY_LOSSES)
    _one_of(importance_sampling_level, "importance_sampling_level", IMPORTANCE_SAMPLING_LEVELS)
    if dual_clip is not None:
        dual_clip = _finite(dual_clip, "dual_clip")
        if dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
        if policy_loss != "ppo":
            raise ValueError(f"dual_clip applies to policy_loss='ppo' only, got {policy_loss!r}")
    _finite(kl_coef, "kl_coef")
    _finite(entropy_coef, "entropy_coef")
    _one_of(kl_estimator, "kl_estimator", KL_ESTIMATORS)
    _one_of(loss_agg, "loss_agg", LOSS_AGGS)
    if kl_coef != 0 and ref_logprobs is None:
        raise ValueError("kl_coef != 0 needs ref_logprobs (the reference policy's log-probs)")
    if loss_agg_norm is not None:
        _positive(loss_agg_norm, "loss_agg_norm")
        if loss_agg != "seq-mean-token-sum-norm":
            raise ValueError(
                f"loss_agg_norm applies to loss_agg='seq-mean-token-sum-norm' only, got "
                f"loss_agg={loss_agg!r}"
            )
    if num_items_in_batch is not None:
        _positive(num_items_in_batch, "num_items_in_batch")
        if loss_agg != "token-mean":
            raise ValueError(
                f"num_items_in_batch applies to loss_agg='token-mean' only, got "
                f"loss_agg={loss_agg!r}"
            )
    if (rollout_logprobs is None) != (rollout_correction is None):
        raise ValueError(
            "rollout_logprobs and rollout_correction go together: give both or neither, got "
            f"rollout_logprobs {'None' if rollout_logprobs is None else 'given'} and "
            f"rollout_correction={rollout_correction!r}"
        )
    if rollout_correction is not None:
        _one_of(rollout_correction, "rollout_correction", ROLLOUT_CORRECTIONS)
    _positive(rollout_cap, "rollout_cap")
    return PPOOptions(
        ratio_low=1.0 - clip_eps,
        ratio_high=1.0 + eps_high,
        dual_clip=0.0 if dual_clip is None else dual_clip,
        kl_coef=float(kl_coef),
        kl_estimator=kl_estimator,
        entropy_coef=float(entropy_coef),
        temperature=temperature,
        policy_loss=policy_loss,
        importance_sampling_level=importance_sampling_level,
    )


def check_tokens(
    actions, old_logprobs, advantages, mask, ref_logprobs, shape, device, V, rollout_logprobs=None
):
    """Checks the per-token tensors against the token shape; value checks run in eager mode
    only (under torch.compile they would be data-dependent branches)."""
    check_tensor(actions, "actions")
    if actions.dtype.is_floating_point or actions.dtype.is_complex or actions.dtype == torch.bool:
        raise TypeError(f"actions must be an integer tensor, got {actions.dtype}")
    named = [("actions", actions), ("old_logprobs", old_logprobs), ("advantages", advantages)]
    if ref_logprobs is not None:
        named.append(("ref_logprobs", ref_logprobs))
    if rollout_logprobs is not None:
        named.append(("rollout_logprobs", rollout_logprobs))
    if mask is not None:
        named.append(("mask", check_tensor(mask, "mask")))
    for name, t in named:
        if name not in ("actions", "mask"):
            check_floating(t, name)
        if tuple(t.shape) != tuple(shape):
            raise ValueError(
                f"{name} must have the token shape {list(shape)} (the logits' "
                f"shape without the vocabulary), got {list(t.shape)}"
            )
        if t.device != device:
            raise ValueError(f"{name} must be on the logits' device {device}, got {t.device}")
    if torch.compiler.is_compiling() or actions.numel() == 0:
        return
    checks = [
        (((actions < 0) | (actions >= V)).any(), f"actions must be in [0, V) = [0, {V})"),
        (~torch.isfinite(advantages).all(), "advantages must be finite"),
        (~torch.isfinite(old_logprobs).all(), "old_logprobs must be finite"),
    ]
    if ref_logprobs is not None:
        checks.append((~torch.isfinite(ref_logprobs).all(), "ref_logprobs must be finite"))
    if rollout_logprobs is not None:
        checks.append((~torch.isfinite(rollout_logprobs).all(), "rollout_logprobs must be finite"))
    if mask is not None and mask.dtype != torch.bool:
        checks.append((((mask != 0) & (mask != 1)).any(), "mask must hold only 0 and 1 (or bool)"))
    failed = torch.stack([c for c, _ in checks]).tolist()  # one device sync for all checks
    for bad, (_, message) in zip(failed, checks, strict=True):
        if bad:
            raise ValueError(message)


def flat(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.detach().reshape(-1).to(dtype).contiguous()


def token_inputs(
    mask: Tensor | None,
    shape: torch.Size,
    source: Tensor,
    actions: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    ref_logprobs: Tensor | None,
    options: PPOOptions,
    *,
    loss_agg: str,
    loss_agg_norm: float | None = None,
    num_items_in_batch: float | None = None,
    rollout_logprobs: Tensor | None = None,
    rollout_correction: str | None = None,
    rollout_cap: float = 2.0,
) -> tuple[Tensor, TokenInputs]:
    """The fused paths' flat mask and per-token inputs, in the compute dtype of ``source`` (the
    logits or hidden states), with the aggregation weights times the rollout correction."""
    dtype = compute_dtype(source.dtype)
    mask_c = (
        torch.ones(shape, dtype=dtype, device=source.device)
        if mask is None
        else (mask.detach().to(dtype))
    )
    weight = token_weights(mask_c, loss_agg, loss_agg_norm, num_items_in_batch).reshape(-1)
    old_f = flat(old_logprobs, dtype)
    if rollout_logprobs is not None:
        weight = weight * reference.rollout_weight(
            old_f, flat(rollout_logprobs, dtype), rollout_correction, rollout_cap
        )
    ref_f = None if ref_logprobs is None else flat(ref_logprobs, dtype)
    sequence_mask = None
    if options.couples_tokens:
        sequence_mask = mask_c.reshape(reference._sequences(mask_c))
    tokens = TokenInputs(
        actions=actions.detach().reshape(-1).long().contiguous(),
        old_logprobs=old_f,
        advantages=flat(advantages, dtype),
        ref_logprobs=ref_f,
        token_weight=weight.contiguous(),
        sequence_mask=sequence_mask,
    )
    return mask_c.reshape(-1), tokens


def output(
    loss: Tensor,
    logprobs: Tensor,
    entropy: Tensor,
    tokens: TokenInputs,
    mask_f: Tensor,
    options: PPOOptions,
    shape: torch.Size,
) -> PPOLossOutput:
    """The result with its metrics (masked token means) from the detached per-token values."""
    with torch.no_grad():
        _, ratio, clipped, kl = token_terms(logprobs, entropy, tokens, options)
        count = mask_f.sum().clamp(min=1)

        def mean(x):
            return reference._masked(x.to(mask_f.dtype), mask_f).sum() / count

        return PPOLossOutput(
            loss=loss,
            logprobs=logprobs.reshape(shape),
            entropy=entropy.reshape(shape),
            clipfrac=mean(clipped),
            approx_kl=mean(tokens.old_logprobs - logprobs),
            ratio_mean=mean(ratio),
            kl=None if kl is None else mean(kl),
        )
