"""PPO clipped policy loss from logits (ppo_loss: its custom operator, autograd and dispatch),
and the plain-torch clipped value loss and GAE. The fused kernels' contract and what the fused
losses share is in rlgaf_fast.ops._ppo; the loss from hidden states is
rlgaf_fast.ops.fused_linear_ppo_loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlgaf_fast import reference
from rlgaf_fast._backend import kernel_module, resolve_backend
from rlgaf_fast.ops._checks import check_floating, check_positive, check_tensor
from rlgaf_fast.ops._ppo import (
    OpArguments,
    PPOOptions,
    TokenInputs,
    check_options,
    check_tokens,
    compute_dtype,
    fused_rows,
    handed_out,
    output,
    refuse_double_backward,
    saved_gradients,
    scaled,
    token_inputs,
    weighted_loss,
)
from rlgaf_fast.ops.registry import OPS
from rlgaf_fast.reference import PPOLossOutput

__all__ = ["PPOLossOutput", "PPOOptions", "gae", "ppo_loss", "value_loss"]


# --- the fused op from logits -----------------------------------------------------------------


def _ppo_loss_impl(
    logits: Tensor,
    actions: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    ref_logprobs: Tensor | None,
    token_weight: Tensor,
    ratio_low: float,
    ratio_high: float,
    dual_clip: float,
    kl_coef: float,
    kl_estimator: str,
    entropy_coef: float,
    temperature: float,
    policy_loss: str,
    importance_sampling_level: str,
    compute_grad: bool,
    backend: str,
    sequence_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, logprobs, entropy, grad_logits) for 2-D logits and [N] compute-dtype tensors;
    grad_logits is d loss / d logits, or empty without compute_grad. The options between
    token_weight and compute_grad are PPOOptions' fields (PPOOptions.op_arguments)."""
    tokens = TokenInputs(
        actions, old_logprobs, advantages, ref_logprobs, token_weight, sequence_mask
    )
    options = PPOOptions.from_op_arguments(locals())
    grad = torch.empty_like(logits) if compute_grad else logits.new_empty(0)
    logprobs, entropy = fused_rows(
        kernel_module("ppo_loss", backend), logits, tokens, options, grad if compute_grad else None
    )
    return weighted_loss(logprobs, entropy, tokens, options), logprobs, entropy, grad


_PPO_ARGS = OpArguments(_ppo_loss_impl)
_ppo_loss_op = torch.library.custom_op("rlgaf_fast::ppo_loss", mutates_args=())(_ppo_loss_impl)


@_ppo_loss_op.register_fake
def _(*args, **kwargs):
    arguments = _PPO_ARGS.named(args, kwargs)
    logits = arguments["logits"]
    dtype = compute_dtype(logits.dtype)
    n = logits.shape[0]
    return (
        logits.new_empty((), dtype=dtype),
        logits.new_empty((n,), dtype=dtype),
        logits.new_empty((n,), dtype=dtype),
        torch.empty_like(logits) if arguments["compute_grad"] else logits.new_empty(0),
    )


def _ppo_loss_setup_context(ctx, inputs, output):
    # Only the loss is differentiable; the saved gradient is an output so that it can be saved.
    _, logprobs, entropy, grad_logits = output
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(logprobs, entropy, grad_logits)
    arguments = _PPO_ARGS.named(inputs)
    ctx.arguments = None if arguments["compute_grad"] else arguments
    ctx.save_for_backward(grad_logits)


def _ppo_loss_backward(ctx, grad_loss, *unused):
    if grad_loss is None:
        return _PPO_ARGS.gradients()
    refuse_double_backward("ppo_loss")
    if ctx.arguments is not None:  # the forward did not expect a gradient: run it again with one
        # (a fresh tensor on every backward: nothing to copy)
        *_, grad_logits = _ppo_loss_op(**{**ctx.arguments, "compute_grad": True})
        (grad_logits,) = scaled([grad_logits], grad_loss)
    else:
        (grad_logits,) = handed_out(ctx, list(saved_gradients(ctx, "ppo_loss")), grad_loss)
    return _PPO_ARGS.gradients(logits=grad_logits)


_ppo_loss_op.register_autograd(_ppo_loss_backward, setup_context=_ppo_loss_setup_context)


class _InplacePPOLoss(torch.autograd.Function):
    """The fused loss that writes its gradient over the logits (eager mode only)."""

    @staticmethod
    def forward(ctx, logits, kernels, tokens: TokenInputs, options: PPOOptions):
        rows = logits.detach()
        logprobs, entropy = fused_rows(kernels, rows, tokens, options, grad=rows)
        torch.autograd.graph.increment_version(logits)  # later readers of logits fail loudly
        ctx.grad_logits = rows
        ctx.mark_non_differentiable(logprobs, entropy)
        return weighted_loss(logprobs, entropy, tokens, options), logprobs, entropy

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        refuse_double_backward("ppo_loss")
        grad, ctx.grad_logits = ctx.grad_logits, None  # a second backward would see a stale buffer
        if grad is None:
            raise RuntimeError(
                "ppo_loss: with inplace_grad=True the fused op's backward can run once (its "
                "gradient lives in the logits' memory and went to the first backward). "
                "retain_graph is not supported with this op; use inplace_grad=False or "
                "backend='torch'"
            )
        return (*scaled([grad], grad_loss), None, None, None)


# --- public: ppo_loss -------------------------------------------------------------------------


def ppo_loss(
    logits: Tensor,
    actions: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor | None = None,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    temperature: float = 1.0,
    loss_agg: str = "token-mean",
    loss_agg_norm: float | None = None,
    num_items_in_batch: float | None = None,
    policy_loss: str = "ppo",
    importance_sampling_level: str = "token",
    rollout_logprobs: Tensor | None = None,
    rollout_correction: str | None = None,
    rollout_cap: float = 2.0,
    inplace_grad: bool = False,
    backend: str = "auto",
) -> PPOLossOutput:
    """PPO clipped policy loss, as TRL, OpenRLHF and verl write it, fused over the vocabulary.

    Per token, with A the advantage:
        logp  = log_softmax(logits / temperature)[action], entropy H of that softmax
        ratio = exp(clamp(logp - old_logprobs, -20, 20))
        pg    = max(-A * ratio, -A * clip(ratio, 1 - clip_eps, 1 + (clip_eps_high or clip_eps)))
        with dual_clip = c > 1: pg = min(pg, -c * A) where A < 0
        loss_t = pg + kl_coef * kl - entropy_coef * H,
    kl the estimator of KL(policy || reference) from d = logp - ref_logprobs: k1 = d,
    k2 = d^2 / 2, k3 = exp(-d) + d - 1. The loss is loss_t aggregated over the tokens where the
    mask is 1: "token-mean" (over all tokens), "seq-mean-token-mean" (mean within each sequence,
    then over sequences), "seq-mean-token-sum" (sum within each sequence, mean over sequences);
    sequences without an unmasked token are left out of the mean over sequences, and with no
    unmasked token the loss is 0.

    Args:
        logits: ``[B, T, V]`` or ``[N, V]`` (any ``[..., V]``), float16/bfloat16/float32/float64;
            arithmetic in float32 (float64 for float64 logits).
        actions: integer ``[B, T]`` (the logits' shape without V), values in [0, V).
        old_logprobs, advantages: floating, the token shape; finite.
        mask: the token shape, bool or 0/1 numbers; None means all ones. The sequence
            aggregations take the last dimension as the sequence.
        clip_eps, clip_eps_high: the ratio clip range [1 - clip_eps, 1 + clip_eps_high];
            clip_eps_high defaults to clip_eps.
        dual_clip: the dual-clip constant c > 1, or None.
        ref_logprobs: the reference policy's log-probs of the actions (the token shape), for the
            KL term and the ``kl`` metric; needed when kl_coef != 0.
        kl_coef, kl_estimator: weight and estimator ("k1", "k2", "k3") of the KL term.
        entropy_coef: weight of the entropy bonus (subtracted from the loss).
        temperature: > 0; the logits are divided by it.
        loss_agg: "token-mean", "seq-mean-token-mean", "seq-mean-token-sum" or
            "seq-mean-token-sum-norm" (the masked sum over B * loss_agg_norm, Dr. GRPO).
        loss_agg_norm: > 0, the constant of "seq-mean-token-sum-norm"; default T.
        num_items_in_batch: > 0, with "token-mean": the masked sum is divided by it instead of
            the local token count (DAPO's normalisation by the global count across ranks and
            micro-batches).
        policy_loss: "ppo" (the clipped objective above) or "cispo":
            pg = -stopgrad(min(ratio, 1 + clip_eps_high)) * A * logp.
        importance_sampling_level: "token", or "sequence" (GSPO): each token of a sequence uses
            its ratio exp(clamp(masked mean of logp - old_logprobs, -20, 20)), through which
            the gradient reaches every token of the sequence (the last dimension).
        rollout_logprobs, rollout_correction, rollout_cap: the rollout engine's log-probs of the
            actions (the token shape) and the correction of its mismatch with old_logprobs,
            rho = exp(old_logprobs - rollout_logprobs): "truncate" multiplies each token's loss
            by min(rho, rollout_cap) (TIS), "mask" gives the tokens with rho > rollout_cap
            weight 0; the normalisation stays the mask's. Given together or not at all.
        kl_estimator "k3+": k3's value with k2's gradient.
        The variants the kernels do not derive themselves (cispo, "sequence") read the logits
        once more on the fused backends.
        inplace_grad: with a fused backend and a gradient to compute, write d loss / d logits
            over the logits' storage in the forward pass, which DESTROYS the logits: saves the
            memory of a second ``[N, V]`` buffer. logits must be contiguous; eager mode only.
            The loss's backward can then run only once. The torch backend leaves the logits
            intact.
        backend: "auto", "torch", "cpp" or "triton".

    Returns:
        :class:`PPOLossOutput`: ``loss`` (scalar, compute dtype; the only differentiable field,
        its gradient flowing to ``logits`` alone: the other inputs are data), ``logprobs`` and
        ``entropy`` (the token shape), and masked token means ``clipfrac`` (fraction of tokens
        where the clipped term was the larger), ``approx_kl`` = mean(old_logprobs - logp),
        ``ratio_mean`` and ``kl`` (the estimator's mean; None without ref_logprobs).
    """
    check_floating(logits, "logits", OPS["ppo_loss"].dtypes)
    if logits.dim() < 2 or logits.shape[-1] < 1:
        raise ValueError(
            f"logits must be [..., V] with at least 2 dimensions and V >= 1, got "
            f"{list(logits.shape)}"
        )
    temperature = check_positive(temperature, "temperature")
    weighting = {
        "loss_agg": loss_agg,
        "loss_agg_norm": loss_agg_norm,
        "num_items_in_batch": num_items_in_batch,
        "rollout_logprobs": rollout_logprobs,
        "rollout_correction": rollout_correction,
        "rollout_cap": rollout_cap,
    }
    options = check_options(
        clip_eps=clip_eps,
        clip_eps_high=clip_eps_high,
        dual_clip=dual_clip,
        kl_coef=kl_coef,
        kl_estimator=kl_estimator,
        entropy_coef=entropy_coef,
        temperature=temperature,
        ref_logprobs=ref_logprobs,
        policy_loss=policy_loss,
        importance_sampling_level=importance_sampling_level,
        **weighting,
    )
    shape, V = logits.shape[:-1], logits.shape[-1]
    check_tokens(
        actions,
        old_logprobs,
        advantages,
        mask,
        ref_logprobs,
        shape,
        logits.device,
        V,
        rollout_logprobs,
    )
    name = resolve_backend(backend, logits, "ppo_loss")
    if name == "torch":
        return reference.ppo_loss(
            logits,
            actions,
            old_logprobs,
            advantages,
            mask,
            clip_eps=clip_eps,
            clip_eps_high=clip_eps_high,
            dual_clip=dual_clip,
            ref_logprobs=ref_logprobs,
            kl_coef=kl_coef,
            kl_estimator=kl_estimator,
            entropy_coef=entropy_coef,
            temperature=temperature,
            policy_loss=policy_loss,
            importance_sampling_level=importance_sampling_level,
            **weighting,
        )
    mask_f, tokens = token_inputs(
        mask, shape, logits, actions, old_logprobs, advantages, ref_logprobs, options, **weighting
    )
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    if inplace_grad and compute_grad:
        if torch.compiler.is_compiling():
            raise RuntimeError(
                "ppo_loss: inplace_grad=True works in eager mode only, not under torch.compile"
            )
        if not logits.is_contiguous():
            raise ValueError("ppo_loss: inplace_grad=True needs contiguous logits")
        loss, logprobs, entropy = _InplacePPOLoss.apply(
            logits.view(-1, V), kernel_module("ppo_loss", name), tokens, options
        )
    else:
        loss, logprobs, entropy, _ = _ppo_loss_op(
            logits.reshape(-1, V).contiguous(),
            **tokens._asdict(),
            **options.op_arguments(),
            compute_grad=compute_grad,
            backend=name,
        )
    return output(loss, logprobs, entropy, tokens, mask_f, options, shape)


# --- value loss and GAE (plain torch) -----------------------------------------------------------


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor | None = None,
    *,
    clip: float | None = 0.2,
) -> Tensor:
    """Clipped value loss, as TRL: ``0.5 * masked_mean(max((v - R)^2, (v_clip - R)^2))`` with
    ``v_clip = old_values + clamp(values - old_values, -clip, clip)``.

    values, old_values, returns, mask: floating tensors of one shape (mask bool or 0/1; None is
    all ones). clip: > 0, or None for the unclipped loss. Returns a scalar in values' dtype.
    """
    dtypes = OPS["value_loss"].dtypes
    check_floating(values, "values", dtypes)
    for name, t in (("old_values", old_values), ("returns", returns)):
        check_floating(t, name, dtypes)
        if t.shape != values.shape:
            raise ValueError(
                f"{name} must have values' shape {list(values.shape)}, got {list(t.shape)}"
            )
    if mask is not None and check_tensor(mask, "mask").shape != values.shape:
        raise ValueError(
            f"mask must have values' shape {list(values.shape)}, got {list(mask.shape)}"
        )
    if clip is not None:
        clip = check_positive(clip, "clip")
    return reference.value_loss(values, old_values, returns, mask, clip=clip)


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over ``[B, T]`` (or ``[T]``) rewards and values.

    Scans each sequence from the end: delta_t = r_t + gamma * V_next - V_t and
    A_t = delta_t + gamma * lam * A_next; tokens where mask is 0 are skipped (they pass V_next and
    A_next through), after the last unmasked token both are 0. Returns ``(advantages,
    returns = advantages + values)``, 0 where the mask is 0, without gradient.
    """
    check_floating(rewards, "rewards", OPS["gae"].dtypes)
    check_floating(values, "values", OPS["gae"].dtypes)
    check_tensor(mask, "mask")
    if values.dim() < 1:
        raise ValueError("values must have a time dimension: [B, T] or [T]")
    for name, t in (("rewards", rewards), ("mask", mask)):
        if t.shape != values.shape:
            raise ValueError(
                f"{name} must have values' shape {list(values.shape)}, got {list(t.shape)}"
            )
    for name, value in (("gamma", gamma), ("lam", lam)):
        if not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return reference.gae(rewards, values, mask, gamma=float(gamma), lam=float(lam))
