"""PPO losses: the fused clipped policy loss from logits (ppo_loss) and from hidden states
(fused_linear_ppo_loss), and the plain-torch clipped value loss and GAE.

The fused backends (cpp, triton) share one kernel contract (csrc/cpu/ppo_loss.cpp,
kernels/ppo_loss.py): per row of logits [N, V] one read computes logsumexp, the action's
log-prob and the entropy, and, when a gradient is wanted, the same kernel call writes
d loss / d logits. The gradient is produced in the forward pass because it depends only on
per-token values and on the per-token weights w[n] = d loss / d loss_n of the aggregation, which
this module computes beforehand from the mask alone; backward then only scales it by the
incoming gradient (nothing at all in the usual case where that is exactly 1: the first backward
gets the saved gradient itself, later ones a copy). Hence two limits of the fused backends, both
clear errors: no second derivative (create_graph=True), and no further backward once the
handed-out gradient has been changed in place (e.g. accumulated into .grad by a second
backward of a retained graph). The torch backend is rlgaf_fast.reference itself, without them.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from rlgaf_fast import reference
from rlgaf_fast._backend import kernel_module, resolve_backend
from rlgaf_fast.ops._checks import check_floating, check_positive, check_tensor
from rlgaf_fast.reference import KL_ESTIMATORS, LOSS_AGGS, PPOLossOutput

__all__ = ["PPOLossOutput", "fused_linear_ppo_loss", "gae", "ppo_loss", "value_loss"]

_KL_CODES = {"k1": 1, "k2": 2, "k3": 3}
LACKS = ("cuda",)  # backends without a kernel of the PPO losses (no CUDA C++ one)
# Bytes of logits that fused_linear_ppo_loss materialises per chunk of tokens.
_CHUNK_BYTES_CPU = 128 << 20
_CHUNK_BYTES_GPU = 1 << 30


def _kernels(backend: str):
    return kernel_module(backend, "ppo_loss")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- per-token terms and aggregation weights (O(N) torch) -------------------------------------


def _token_terms(
    logprobs: Tensor,
    entropy: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    ref_logprobs: Tensor | None,
    ratio_low: float,
    ratio_high: float,
    dual_clip: float,
    kl_coef: float,
    kl_estimator: str,
    entropy_coef: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(loss_n, ratio, clipped indicator, kl_n or None) per token; dual_clip <= 0 is none."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, ratio_low, ratio_high)
    token_loss = torch.maximum(unclipped, clipped)
    if dual_clip > 0:
        token_loss = torch.where(
            advantages < 0, torch.minimum(token_loss, -dual_clip * advantages), token_loss
        )
    kl = None
    if ref_logprobs is not None:
        kl = reference.kl_estimate(logprobs, ref_logprobs, kl_estimator)
        token_loss = token_loss + kl_coef * kl
    token_loss = token_loss - entropy_coef * entropy
    return token_loss, ratio, clipped > unclipped, kl


def _token_weights(mask: Tensor, loss_agg: str) -> Tensor:
    """w = d loss / d loss_n for the aggregation (same shape as mask, [..., T])."""
    if loss_agg == "token-mean":
        return mask / mask.sum().clamp(min=1)
    seqs = mask.reshape(-1, mask.shape[-1])
    count = seqs.sum(-1, keepdim=True)
    n_seqs = (count > 0).sum().clamp(min=1)
    if loss_agg == "seq-mean-token-mean":
        return (seqs / (count.clamp(min=1) * n_seqs)).reshape(mask.shape)
    return (seqs / n_seqs).reshape(mask.shape)


def _is_exactly_one(grad: Tensor) -> bool:
    """Whether an incoming gradient is a concrete tensor equal to 1 (never while tracing)."""
    if type(grad) is not Tensor or is_fake(grad) or torch.compiler.is_compiling():
        return False
    if torch._C._functorch.is_functorch_wrapped_tensor(grad):
        return False
    return bool(grad == 1)


def _refuse_double_backward(op: str) -> None:
    """Raises when a backward runs with create_graph=True (grad mode is then on in backward):
    the fused gradient is a plain tensor, so its own gradient would silently be missing."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(
            f"{op}: the fused backends have no second derivative, so create_graph=True (double "
            f"backward, e.g. a gradient penalty) is not supported; use backend='torch'"
        )


def _saved_gradients(ctx, op: str) -> tuple[Tensor, ...]:
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


def _times(grads: list[Tensor | None], scale: Tensor) -> list[Tensor | None]:
    """grad * scale, in each gradient's dtype."""
    return [None if g is None else g * scale.to(g.dtype) for g in grads]


def _scaled(grads: list[Tensor | None], scale: Tensor) -> list[Tensor | None]:
    """grad * scale (in each gradient's dtype), or the gradients themselves for a scale of
    exactly 1."""
    return grads if _is_exactly_one(scale) else _times(grads, scale)


def _handed_out(ctx, grads: list[Tensor | None], scale: Tensor) -> list[Tensor | None]:
    """grad * scale of each saved gradient for a backward of ctx's node. For a scale of exactly
    1 the first backward gets the saved buffers themselves, so that the usual single backward
    never copies an [N, V] gradient; as they may become .grad tensors that are later changed in
    place, every further backward gets copies."""
    if not _is_exactly_one(scale):
        return _times(grads, scale)
    if getattr(ctx, "gradients_handed_out", False):
        return [None if g is None else g.clone() for g in grads]
    ctx.gradients_handed_out = True
    return grads


# --- the fused op from logits -----------------------------------------------------------------


def _fused_rows(
    kernels,
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
    grad: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """The kernel call: (logprobs, entropy) of logits [N, V], the gradient into grad if given."""
    if grad is None:
        return kernels.ppo_loss_fwd(logits, actions, temperature)
    return kernels.ppo_loss_fwd_grad(
        logits,
        actions,
        old_logprobs,
        advantages,
        ref_logprobs,
        token_weight,
        ratio_low,
        ratio_high,
        dual_clip,
        kl_coef,
        _KL_CODES[kl_estimator],
        entropy_coef,
        temperature,
        grad,
    )


@torch.library.custom_op("rlgaf_fast::ppo_loss", mutates_args=())
def _ppo_loss_op(
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
    compute_grad: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, logprobs, entropy, grad_logits) for 2-D logits and [N] compute-dtype tensors;
    grad_logits is d loss / d logits, or empty without compute_grad."""
    grad = torch.empty_like(logits) if compute_grad else logits.new_empty(0)
    logprobs, entropy = _fused_rows(
        _kernels(backend),
        logits,
        actions,
        old_logprobs,
        advantages,
        ref_logprobs,
        token_weight,
        ratio_low,
        ratio_high,
        dual_clip,
        kl_coef,
        kl_estimator,
        entropy_coef,
        temperature,
        grad if compute_grad else None,
    )
    token_loss = _token_terms(
        logprobs,
        entropy,
        old_logprobs,
        advantages,
        ref_logprobs,
        ratio_low,
        ratio_high,
        dual_clip,
        kl_coef,
        kl_estimator,
        entropy_coef,
    )[0]
    return (token_weight * token_loss).sum(), logprobs, entropy, grad


@_ppo_loss_op.register_fake
def _(
    logits,
    actions,
    old_logprobs,
    advantages,
    ref_logprobs,
    token_weight,
    ratio_low,
    ratio_high,
    dual_clip,
    kl_coef,
    kl_estimator,
    entropy_coef,
    temperature,
    compute_grad,
    backend,
):
    dtype = _compute_dtype(logits.dtype)
    n = logits.shape[0]
    return (
        logits.new_empty((), dtype=dtype),
        logits.new_empty((n,), dtype=dtype),
        logits.new_empty((n,), dtype=dtype),
        torch.empty_like(logits) if compute_grad else logits.new_empty(0),
    )


def _ppo_loss_setup_context(ctx, inputs, output):
    # Only the loss is differentiable; the saved gradient is an output so that it can be saved.
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(*output[1:])
    compute_grad = inputs[13]
    ctx.inputs = None if compute_grad else inputs
    ctx.save_for_backward(output[3])


def _ppo_loss_backward(ctx, grad_loss, *unused):
    if grad_loss is None:
        return (None,) * 15
    _refuse_double_backward("ppo_loss")
    if ctx.inputs is not None:  # the forward did not expect a gradient: run it again with one
        # (a fresh tensor on every backward: nothing to copy)
        grads = _scaled([_ppo_loss_op(*ctx.inputs[:13], True, ctx.inputs[14])[3]], grad_loss)
    else:
        grads = _handed_out(ctx, _saved_gradients(ctx, "ppo_loss"), grad_loss)
    return (*grads, *(None,) * 14)


_ppo_loss_op.register_autograd(_ppo_loss_backward, setup_context=_ppo_loss_setup_context)


class _InplacePPOLoss(torch.autograd.Function):
    """The fused loss that writes its gradient over the logits (eager mode only)."""

    @staticmethod
    def forward(ctx, logits, kernels, args):
        rows = logits.detach()
        logprobs, entropy = _fused_rows(kernels, rows, *args, grad=rows)
        torch.autograd.graph.increment_version(logits)  # later readers of logits fail loudly
        ctx.grad_logits = rows
        ctx.mark_non_differentiable(logprobs, entropy)
        old_logprobs, advantages, ref_logprobs, token_weight = args[1:5]
        token_loss = _token_terms(
            logprobs, entropy, old_logprobs, advantages, ref_logprobs, *args[5:11]
        )[0]
        return (token_weight * token_loss).sum(), logprobs, entropy

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        _refuse_double_backward("ppo_loss")
        grad, ctx.grad_logits = ctx.grad_logits, None  # a second backward would see a stale buffer
        if grad is None:
            raise RuntimeError(
                "ppo_loss: with inplace_grad=True the fused op's backward can run once (its "
                "gradient lives in the logits' memory and went to the first backward). "
                "retain_graph is not supported with this op; use inplace_grad=False or "
                "backend='torch'"
            )
        return (*_scaled([grad], grad_loss), None, None)


# --- validation -------------------------------------------------------------------------------


def _check_options(
    clip_eps, clip_eps_high, dual_clip, kl_coef, kl_estimator, entropy_coef, loss_agg, ref_logprobs
) -> tuple[float, float, float]:
    """(ratio_low, ratio_high, dual_clip or 0) after checking the scalar options."""

    def finite(value, name, low=None):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        if low is not None and value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
        return float(value)

    clip_eps = finite(clip_eps, "clip_eps", 0.0)
    eps_high = clip_eps if clip_eps_high is None else finite(clip_eps_high, "clip_eps_high", 0.0)
    if dual_clip is not None:
        dual_clip = finite(dual_clip, "dual_clip")
        if dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    finite(kl_coef, "kl_coef")
    finite(entropy_coef, "entropy_coef")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {loss_agg!r}")
    if kl_coef != 0 and ref_logprobs is None:
        raise ValueError("kl_coef != 0 needs ref_logprobs (the reference policy's log-probs)")
    return 1.0 - clip_eps, 1.0 + eps_high, 0.0 if dual_clip is None else dual_clip


def _check_tokens(actions, old_logprobs, advantages, mask, ref_logprobs, shape, device, V):
    """Checks the per-token tensors against the token shape; value checks run in eager mode
    only (under torch.compile they would be data-dependent branches)."""
    check_tensor(actions, "actions")
    if actions.dtype.is_floating_point or actions.dtype.is_complex or actions.dtype == torch.bool:
        raise TypeError(f"actions must be an integer tensor, got {actions.dtype}")
    named = [("actions", actions), ("old_logprobs", old_logprobs), ("advantages", advantages)]
    if ref_logprobs is not None:
        named.append(("ref_logprobs", ref_logprobs))
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
    if mask is not None and mask.dtype != torch.bool:
        checks.append((((mask != 0) & (mask != 1)).any(), "mask must hold only 0 and 1 (or bool)"))
    failed = torch.stack([c for c, _ in checks]).tolist()  # one device sync for all checks
    for bad, (_, message) in zip(failed, checks, strict=True):
        if bad:
            raise ValueError(message)


def _flat(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.detach().reshape(-1).to(dtype).contiguous()


def _token_inputs(
    mask: Tensor | None,
    shape: torch.Size,
    source: Tensor,
    loss_agg: str,
    old_logprobs: Tensor,
    advantages: Tensor,
    ref_logprobs: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """The fused paths' flat per-token inputs in the compute dtype of ``source`` (the logits or
    hidden states): (mask, aggregation weights, old_logprobs, advantages, ref_logprobs)."""
    dtype = _compute_dtype(source.dtype)
    mask_c = (
        torch.ones(shape, dtype=dtype, device=source.device)
        if mask is None
        else (mask.detach().to(dtype))
    )
    weight = _token_weights(mask_c, loss_agg).reshape(-1).contiguous()
    ref_f = None if ref_logprobs is None else _flat(ref_logprobs, dtype)
    return mask_c.reshape(-1), weight, _flat(old_logprobs, dtype), _flat(advantages, dtype), ref_f


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
    inplace_grad: bool = False,
    backend: str = "auto",
) -> PPOLossOutput:
    """PPO clipped policy loss, as TRL, OpenRLHF and verl write it, fused over the vocabulary.

    Per token, with A the advantage:
        logp  = log_softmax(logits / temperature)[action], entropy H of that softmax
        ratio = exp(logp - old_logprobs)
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
        loss_agg: "token-mean", "seq-mean-token-mean" or "seq-mean-token-sum".
        inplace_grad: with a fused backend and a gradient to compute, write d loss / d logits
            over the logits' storage in the forward pass, which DESTROYS the logits: saves the
            memory of a second ``[N, V]`` buffer. logits must be contiguous; eager mode only.
            The loss's backward can then run only once. The torch backend leaves the logits
            intact.
        backend: "auto", "torch", "cpp", "triton" (or "cuda": no CUDA kernel of this op yet).

    Returns:
        :class:`PPOLossOutput`: ``loss`` (scalar, compute dtype; the only differentiable field,
        its gradient flowing to ``logits`` alone: the other inputs are data), ``logprobs`` and
        ``entropy`` (the token shape), and masked token means ``clipfrac`` (fraction of tokens
        where the clipped term was the larger), ``approx_kl`` = mean(old_logprobs - logp),
        ``ratio_mean`` and ``kl`` (the estimator's mean; None without ref_logprobs).
    """
    check_floating(logits, "logits")
    if logits.dim() < 2 or logits.shape[-1] < 1:
        raise ValueError(
            f"logits must be [..., V] with at least 2 dimensions and V >= 1, got "
            f"{list(logits.shape)}"
        )
    temperature = check_positive(temperature, "temperature")
    ratio_low, ratio_high, dual = _check_options(
        clip_eps,
        clip_eps_high,
        dual_clip,
        kl_coef,
        kl_estimator,
        entropy_coef,
        loss_agg,
        ref_logprobs,
    )
    shape, V = logits.shape[:-1], logits.shape[-1]
    _check_tokens(actions, old_logprobs, advantages, mask, ref_logprobs, shape, logits.device, V)
    name = resolve_backend(backend, logits, lacks=LACKS)
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
            loss_agg=loss_agg,
        )
    if name == "cuda":
        raise RuntimeError("ppo_loss has no 'cuda' kernel: use backend='triton' on GPUs")
    mask_f, weight, old_f, adv_f, ref_f = _token_inputs(
        mask, shape, logits, loss_agg, old_logprobs, advantages, ref_logprobs
    )
    actions_f = actions.detach().reshape(-1).long().contiguous()
    options = (
        ratio_low,
        ratio_high,
        dual,
        float(kl_coef),
        kl_estimator,
        float(entropy_coef),
        temperature,
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
            logits.view(-1, V),
            _kernels(name),
            (actions_f, old_f, adv_f, ref_f, weight) + options,
        )
    else:
        loss, logprobs, entropy, _ = _ppo_loss_op(
            logits.reshape(-1, V).contiguous(),
            actions_f,
            old_f,
            adv_f,
            ref_f,
            weight,
            *options,
            compute_grad,
            name,
        )
    return _output(loss, logprobs, entropy, old_f, adv_f, ref_f, mask_f, options, shape)


def _output(loss, logprobs, entropy, old_f, adv_f, ref_f, mask_f, options, shape):
    """The metrics (masked token means) from the detached per-token values."""
    with torch.no_grad():
        _, ratio, clipped, kl = _token_terms(logprobs, entropy, old_f, adv_f, ref_f, *options[:6])
        count = mask_f.sum().clamp(min=1)

        def mean(x):
            return (x.to(mask_f.dtype) * mask_f).sum() / count

        return PPOLossOutput(
            loss=loss,
            logprobs=logprobs.reshape(shape),
            entropy=entropy.reshape(shape),
            clipfrac=mean(clipped),
            approx_kl=mean(old_f - logprobs),
            ratio_mean=mean(ratio),
            kl=None if kl is None else mean(kl),
        )


# --- fused linear: from hidden states ----------------------------------------------------------


def _default_chunk(V: int, dtype: torch.dtype, device: torch.device) -> int:
    budget = _CHUNK_BYTES_GPU if device.type == "cuda" else _CHUNK_BYTES_CPU
    return max(1, budget // (dtype.itemsize * V))


def _accumulate_product(out: Tensor, a: Tensor, b: Tensor) -> None:
    """out += a @ b, with out in a higher precision than a and b when they are float16/bfloat16:
    on CUDA in one mixed-precision matrix product, elsewhere through a temporary."""
    if a.dtype == out.dtype:
        out.addmm_(a, b)
    elif out.is_cuda and _has_mixed_addmm():
        torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
    else:
        out += a @ b


@functools.cache
def _has_mixed_addmm() -> bool:
    try:
        a = torch.ones(2, 2, device="cuda", dtype=torch.bfloat16)
        out = torch.ones(2, 2, device="cuda")
        torch.addmm(out, a, a, out_dtype=torch.float32, out=out)
        return bool((out == 3).all())
    except (TypeError, RuntimeError, NotImplementedError):
        return False


@torch.library.custom_op("rlgaf_fast::fused_linear_ppo_loss", mutates_args=())
def _fused_linear_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
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
    chunk_size: int,
    grad_hidden_needed: bool,
    grad_weight_needed: bool,
    grad_bias_needed: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, logprobs, entropy, grad_hidden, grad_weight, grad_bias) for hidden [N, H],
    weight [V, H], bias [V] or None; a gradient not needed comes back empty."""
    kernels = _kernels(backend)
    n, V = hidden.shape[0], weight.shape[0]
    dtype = _compute_dtype(hidden.dtype)
    compute_grad = grad_hidden_needed or grad_weight_needed or grad_bias_needed
    logprobs = hidden.new_empty((n,), dtype=dtype)
    entropy = hidden.new_empty((n,), dtype=dtype)
    grad_hidden = torch.empty_like(hidden) if grad_hidden_needed else hidden.new_empty(0)
    # the weight and bias gradients accumulate over chunks in float32 (float64 for float64)
    grad_weight = weight.new_zeros(weight.shape, dtype=dtype) if grad_weight_needed else None
    grad_bias = weight.new_zeros((V,), dtype=dtype) if grad_bias_needed else None
    # one buffer for every chunk's logits (fresh memory costs page faults on each chunk)
    buffer = hidden.new_empty((min(chunk_size, n), V))
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        h = hidden[start:end]
        # the chunk's logits in hidden's dtype, as an LM head computes them
        logits = buffer[: end - start]
        if bias is None:
            torch.mm(h, weight.t(), out=logits)
        else:
            torch.addmm(bias, h, weight.t(), out=logits)
        rows = slice(start, end)
        lp, ent = _fused_rows(
            kernels,
            logits,
            actions[rows],
            old_logprobs[rows],
            advantages[rows],
            None if ref_logprobs is None else ref_logprobs[rows],
            token_weight[rows],
            ratio_low,
            ratio_high,
            dual_clip,
            kl_coef,
            kl_estimator,
            entropy_coef,
            temperature,
            logits if compute_grad else None,  # the gradient overwrites the chunk's logits
        )
        logprobs[rows], entropy[rows] = lp, ent
        if not compute_grad:
            continue
        if grad_hidden_needed:
            torch.mm(logits, weight, out=grad_hidden[rows])
        if grad_weight_needed:
            _accumulate_product(grad_weight, logits.t(), h)
        if grad_bias_needed:
            grad_bias += logits.sum(0, dtype=dtype)
    token_loss = _token_terms(
        logprobs,
        entropy,
        old_logprobs,
        advantages,
        ref_logprobs,
        ratio_low,
        ratio_high,
        dual_clip,
        kl_coef,
        kl_estimator,
        entropy_coef,
    )[0]
    return (
        (token_weight * token_loss).sum(),
        logprobs,
        entropy,
        grad_hidden,
        weight.new_empty(0) if grad_weight is None else grad_weight.to(weight.dtype),
        weight.new_empty(0) if grad_bias is None else grad_bias.to(bias.dtype),
    )


@_fused_linear_op.register_fake
def _(
    hidden,
    weight,
    bias,
    actions,
    old_logprobs,
    advantages,
    ref_logprobs,
    token_weight,
    ratio_low,
    ratio_high,
    dual_clip,
    kl_coef,
    kl_estimator,
    entropy_coef,
    temperature,
    chunk_size,
    grad_hidden_needed,
    grad_weight_needed,
    grad_bias_needed,
    backend,
):
    dtype = _compute_dtype(hidden.dtype)
    n = hidden.shape[0]
    return (
        hidden.new_empty((), dtype=dtype),
        hidden.new_empty((n,), dtype=dtype),
        hidden.new_empty((n,), dtype=dtype),
        torch.empty_like(hidden) if grad_hidden_needed else hidden.new_empty(0),
        torch.empty_like(weight) if grad_weight_needed else weight.new_empty(0),
        torch.empty_like(bias) if grad_bias_needed else weight.new_empty(0),
    )


def _fused_linear_setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(*output[3:])
    ctx.inputs = inputs


def _fused_linear_backward(ctx, grad_loss, *unused):
    if grad_loss is None:
        return (None,) * 20
    _refuse_double_backward("fused_linear_ppo_loss")
    inputs = ctx.inputs
    # a gradient that the forward did not compute (its input did not require grad then) is
    # computed now by running the op again
    wanted = ctx.needs_input_grad[:3]
    needed = inputs[16:19]
    if any(w and not n for w, n in zip(wanted, needed, strict=True)):
        saved = _fused_linear_op(*inputs[:16], *wanted, inputs[19])[3:]
        grads = [g if w else None for g, w in zip(saved, wanted, strict=True)]
        grads = _scaled(grads, grad_loss)  # fresh tensors on every backward: nothing to copy
    else:
        saved = _saved_gradients(ctx, "fused_linear_ppo_loss")
        grads = [g if n else None for g, n in zip(saved, needed, strict=True)]
        grads = _handed_out(ctx, grads, grad_loss)
    return (*grads, *([None] * 17))


_fused_linear_op.register_autograd(
    _fused_linear_backward, setup_context=_fused_linear_setup_context
)


def fused_linear_ppo_loss(
    hidden: Tensor,
    weight: Tensor,
    actions: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor | None = None,
    *,
    bias: Tensor | None = None,
    chunk_size: int | None = None,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    temperature: float = 1.0,
    loss_agg: str = "token-mean",
    backend: str = "auto",
) -> PPOLossOutput:
    """:func:`ppo_loss` of ``logits = hidden @ weight.T + bias`` without materialising them.

    The tokens are taken ``chunk_size`` at a time: a chunk's logits ``[chunk, V]`` are formed
    (in hidden's dtype, as the LM head would), the fused kernel turns them into per-token values
    and overwrites them with their gradient, which goes at once into
    ``grad_hidden = grad_logits @ weight`` and ``grad_weight += grad_logits.T @ hidden``
    (accumulated in float32). Peak memory beyond the inputs is one chunk of logits plus the
    gradients.

    Args:
        hidden: ``[N, H]`` or ``[B, T, H]``, floating; the loss is computed in float32 (float64
            for float64).
        weight: the LM head ``[V, H]``, same dtype and device as hidden.
        bias: ``[V]`` or None.
        chunk_size: tokens per chunk; default: chunks of about 128 MiB of logits on CPU (1 GiB
            on GPU).
        backend: "auto", "torch" (reference.ppo_loss on the full logits: the readable truth,
            materialises them), "cpp" or "triton" (the per-chunk kernel).
        The other arguments and the result are those of :func:`ppo_loss`; gradients flow to
        hidden, weight and bias.
    """
    check_floating(hidden, "hidden")
    check_floating(weight, "weight")
    if hidden.dim() < 2:
        raise ValueError(f"hidden must be [N, H] or [B, T, H], got {list(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] < 1:
        raise ValueError(
            f"weight must be [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, "
            f"got {list(weight.shape)}"
        )
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(
            f"weight must have hidden's dtype and device ({hidden.dtype}, "
            f"{hidden.device}), got {weight.dtype}, {weight.device}"
        )
    V = weight.shape[0]
    if bias is not None:
        check_floating(bias, "bias")
        if bias.shape != (V,) or bias.dtype != weight.dtype or bias.device != weight.device:
            raise ValueError(
                f"bias must be [V] = [{V}] with weight's dtype and device, got "
                f"{list(bias.shape)} {bias.dtype} {bias.device}"
            )
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    temperature = check_positive(temperature, "temperature")
    ratio_low, ratio_high, dual = _check_options(
        clip_eps,
        clip_eps_high,
        dual_clip,
        kl_coef,
        kl_estimator,
        entropy_coef,
        loss_agg,
        ref_logprobs,
    )
    shape = hidden.shape[:-1]
    _check_tokens(actions, old_logprobs, advantages, mask, ref_logprobs, shape, hidden.device, V)
    name = resolve_backend(backend, hidden, lacks=LACKS)
    if name == "torch":
        logits = torch.nn.functional.linear(hidden, weight, bias)
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
            loss_agg=loss_agg,
        )
    if name == "cuda":
        raise RuntimeError("fused_linear_ppo_loss has no 'cuda' kernel: use backend='triton'")
    mask_f, token_weight, old_f, adv_f, ref_f = _token_inputs(
        mask, shape, hidden, loss_agg, old_logprobs, advantages, ref_logprobs
    )
    options = (
        ratio_low,
        ratio_high,
        dual,
        float(kl_coef),
        kl_estimator,
        float(entropy_coef),
        temperature,
    )
    grad_on = torch.is_grad_enabled()
    loss, logprobs, entropy, *_ = _fused_linear_op(
        hidden.reshape(-1, hidden.shape[-1]).contiguous(),
        weight.contiguous(),
        None if bias is None else bias.contiguous(),
        actions.detach().reshape(-1).long().contiguous(),
        old_f,
        adv_f,
        ref_f,
        token_weight,
        *options,
        chunk_size or _default_chunk(V, hidden.dtype, hidden.device),
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
        name,
    )
    return _output(loss, logprobs, entropy, old_f, adv_f, ref_f, mask_f, options, shape)


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
    check_floating(values, "values")
    for name, t in (("old_values", old_values), ("returns", returns)):
        check_floating(t, name)
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
    check_floating(rewards, "rewards")
    check_floating(values, "values")
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
