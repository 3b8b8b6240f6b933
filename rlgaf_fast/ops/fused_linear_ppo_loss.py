"""The PPO clipped policy loss from hidden states and the LM head, ``ppo_loss(hidden @ weight.T
+ bias, ...)``, a chunk of tokens at a time without materialising all logits: its custom
operator, autograd and dispatch. The per-chunk kernel is ppo_loss's (rlgaf_fast.ops._ppo).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from rlgaf_fast import reference
from rlgaf_fast._backend import kernel_module, resolve_backend
from rlgaf_fast.ops._checks import check_lm_head, check_positive
from rlgaf_fast.ops._ppo import (
    OpArguments,
    PPOOptions,
    TokenInputs,
    check_options,
    check_tokens,
    compute_dtype,
    fused_rows,
    handed_out,
    loss_coefficients,
    output,
    refuse_double_backward,
    saved_gradients,
    scaled,
    token_inputs,
    weighted_loss,
)
from rlgaf_fast.ops.registry import OPS
from rlgaf_fast.reference import PPOLossOutput

__all__ = ["fused_linear_ppo_loss"]

_OP = "fused_linear_ppo_loss"
# Bytes of logits that fused_linear_ppo_loss materialises per chunk of tokens.
_CHUNK_BYTES_CPU = 128 << 20
_CHUNK_BYTES_GPU = 1 << 30
# The gradients the op can return, named as the inputs they belong to; the op's flag
# grad_<name>_needed says whether the forward computes each.
_GRADIENTS = ("hidden", "weight", "bias")


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


def _fused_linear_impl(
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
    policy_loss: str,
    importance_sampling_level: str,
    chunk_size: int,
    grad_hidden_needed: bool,
    grad_weight_needed: bool,
    grad_bias_needed: bool,
    backend: str,
    sequence_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, logprobs, entropy, grad_hidden, grad_weight, grad_bias) for hidden [N, H],
    weight [V, H], bias [V] or None; a gradient not needed comes back empty. The options
    between token_weight and chunk_size are PPOOptions' fields (PPOOptions.op_arguments)."""
    kernels = kernel_module(_OP, backend)
    tokens = TokenInputs(
        actions, old_logprobs, advantages, ref_logprobs, token_weight, sequence_mask
    )
    options = PPOOptions.from_op_arguments(locals())
    n, V = hidden.shape[0], weight.shape[0]
    dtype = compute_dtype(hidden.dtype)
    compute_grad = grad_hidden_needed or grad_weight_needed or grad_bias_needed
    logprobs = hidden.new_empty((n,), dtype=dtype)
    entropy = hidden.new_empty((n,), dtype=dtype)
    grad_hidden = torch.empty_like(hidden) if grad_hidden_needed else hidden.new_empty(0)
    # the weight and bias gradients accumulate over chunks in float32 (float64 for float64)
    grad_weight = weight.new_zeros(weight.shape, dtype=dtype) if grad_weight_needed else None
    grad_bias = weight.new_zeros((V,), dtype=dtype) if grad_bias_needed else None
    # one buffer for every chunk's logits (fresh memory costs page faults on each chunk)
    buffer = hidden.new_empty((min(chunk_size, n), V))

    def chunk_logits(start: int, end: int) -> Tensor:
        """The chunk's logits in hidden's dtype, as an LM head computes them."""
        logits = buffer[: end - start]
        if bias is None:
            return torch.mm(hidden[start:end], weight.t(), out=logits)
        return torch.addmm(bias, hidden[start:end], weight.t(), out=logits)

    coefficients = None
    if compute_grad and options.couples_tokens:
        # a token's gradient needs its whole sequence's log-probabilities: a first pass over the
        # chunks gives them all, then the coefficients of every token are known
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            logprobs[start:end], entropy[start:end] = fused_rows(
                kernels, chunk_logits(start, end), tokens.rows(start, end), options, None
            )
        coefficients = loss_coefficients(logprobs, entropy, tokens, options)
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        h = hidden[start:end]
        logits = chunk_logits(start, end)
        # the gradient overwrites the chunk's logits
        lp, ent = fused_rows(
            kernels,
            logits,
            tokens.rows(start, end),
            options,
            logits if compute_grad else None,
            None if coefficients is None else tuple(c[start:end] for c in coefficients),
        )
        logprobs[start:end], entropy[start:end] = lp, ent
        if not compute_grad:
            continue
        if grad_hidden_needed:
            torch.mm(logits, weight, out=grad_hidden[start:end])
        if grad_weight_needed:
            _accumulate_product(grad_weight, logits.t(), h)
        if grad_bias_needed:
            grad_bias += logits.sum(0, dtype=dtype)
    return (
        weighted_loss(logprobs, entropy, tokens, options),
        logprobs,
        entropy,
        grad_hidden,
        weight.new_empty(0) if grad_weight is None else grad_weight.to(weight.dtype),
        weight.new_empty(0) if grad_bias is None else grad_bias.to(bias.dtype),
    )


_FUSED_LINEAR_ARGS = OpArguments(_fused_linear_impl)
_fused_linear_op = torch.library.custom_op("rlgaf_fast::fused_linear_ppo_loss", mutates_args=())(
    _fused_linear_impl
)


@_fused_linear_op.register_fake
def _(*args, **kwargs):
    arguments = _FUSED_LINEAR_ARGS.named(args, kwargs)
    hidden, weight, bias = arguments["hidden"], arguments["weight"], arguments["bias"]
    dtype = compute_dtype(hidden.dtype)
    n = hidden.shape[0]

    def gradient(name: str, like: Tensor | None) -> Tensor:
        return torch.empty_like(like) if arguments[f"grad_{name}_needed"] else weight.new_empty(0)

    return (
        hidden.new_empty((), dtype=dtype),
        hidden.new_empty((n,), dtype=dtype),
        hidden.new_empty((n,), dtype=dtype),
        torch.empty_like(hidden) if arguments["grad_hidden_needed"] else hidden.new_empty(0),
        gradient("weight", weight),
        gradient("bias", bias),
    )


def _fused_linear_setup_context(ctx, inputs, output):
    _, logprobs, entropy, *gradients = output
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(logprobs, entropy, *gradients)
    ctx.save_for_backward(*gradients)
    ctx.arguments = _FUSED_LINEAR_ARGS.named(inputs)


def _fused_linear_backward(ctx, grad_loss, *unused):
    if grad_loss is None:
        return _FUSED_LINEAR_ARGS.gradients()
    refuse_double_backward(_OP)
    arguments = ctx.arguments
    names = _FUSED_LINEAR_ARGS.names
    wanted = [ctx.needs_input_grad[names.index(name)] for name in _GRADIENTS]
    needed = [arguments[f"grad_{name}_needed"] for name in _GRADIENTS]
    # a gradient that the forward did not compute (its input did not require grad then) is
    # computed now by running the op again
    if any(w and not n for w, n in zip(wanted, needed, strict=True)):
        flags = {f"grad_{name}_needed": w for name, w in zip(_GRADIENTS, wanted, strict=True)}
        _, _, _, *saved = _fused_linear_op(**{**arguments, **flags})
        grads = [g if w else None for g, w in zip(saved, wanted, strict=True)]
        grads = scaled(grads, grad_loss)  # fresh tensors on every backward: nothing to copy
    else:
        saved = saved_gradients(ctx, _OP)
        grads = [g if n else None for g, n in zip(saved, needed, strict=True)]
        grads = handed_out(ctx, grads, grad_loss)
    return _FUSED_LINEAR_ARGS.gradients(**dict(zip(_GRADIENTS, grads, strict=True)))


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
    loss_agg_norm: float | None = None,
    num_items_in_batch: float | None = None,
    policy_loss: str = "ppo",
    importance_sampling_level: str = "token",
    rollout_logprobs: Tensor | None = None,
    rollout_correction: str | None = None,
    rollout_cap: float = 2.0,
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
        The other arguments and the result are those of :func:`ppo_loss`, its policy-loss
        variants included (with importance_sampling_level="sequence" the logits are formed
        twice: a first pass gives every token's log-probability, which a sequence's ratio
        needs before any gradient); gradients flow to hidden, weight and bias.
    """
    V = check_lm_head(hidden, weight, bias, OPS[_OP].dtypes, min_hidden_dim=2)
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
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
    shape = hidden.shape[:-1]
    check_tokens(
        actions,
        old_logprobs,
        advantages,
        mask,
        ref_logprobs,
        shape,
        hidden.device,
        V,
        rollout_logprobs,
    )
    name = resolve_backend(backend, hidden, _OP)
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
            policy_loss=policy_loss,
            importance_sampling_level=importance_sampling_level,
            **weighting,
        )
    mask_f, tokens = token_inputs(
        mask, shape, hidden, actions, old_logprobs, advantages, ref_logprobs, options, **weighting
    )
    grad_on = torch.is_grad_enabled()
    loss, logprobs, entropy, *_ = _fused_linear_op(
        hidden=hidden.reshape(-1, hidden.shape[-1]).contiguous(),
        weight=weight.contiguous(),
        bias=None if bias is None else bias.contiguous(),
        **tokens._asdict(),
        **options.op_arguments(),
        chunk_size=chunk_size or _default_chunk(V, hidden.dtype, hidden.device),
        grad_hidden_needed=grad_on and hidden.requires_grad,
        grad_weight_needed=grad_on and weight.requires_grad,
        grad_bias_needed=grad_on and bias is not None and bias.requires_grad,
        backend=name,
    )
    return output(loss, logprobs, entropy, tokens, mask_f, options, shape)
