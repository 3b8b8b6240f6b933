"""Per-token log-probabilities and entropies from hidden states and the LM head, a chunk of tokens
at a time without materialising all logits: public function, custom operators with autograd,
and backend dispatch.

The per-chunk kernels are the PPO kernels (rlgaf_fast.ops._ppo): ppo_loss_fwd gives each row's
log-probability of its label and its entropy in one read of the row, and ppo_loss_fwd_vjp the
gradient of sum_n g_n * logp_n + e_n * H_n for the incoming gradients g, e. As those are known
only in backward, the backward forms each chunk's logits again (one more matrix product per
chunk, no [N, V] tensor kept between the passes). The torch backend is
rlgaf_fast.reference.fused_linear_logprobs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from rlgaf_fast import reference
from rlgaf_fast._backend import kernel_module, resolve_backend
from rlgaf_fast.ops._checks import check_lm_head, check_positive, check_tensor
from rlgaf_fast.ops._ppo import compute_dtype, refuse_double_backward
from rlgaf_fast.ops.fused_linear_ppo_loss import _accumulate_product, _default_chunk
from rlgaf_fast.ops.registry import OPS

__all__ = ["LogProbsOutput", "fused_linear_logprobs"]

_OP = "fused_linear_logprobs"
_OUTPUTS = ("log_probs", "entropy")
IGNORE_INDEX = reference.IGNORE_INDEX


class LogProbsOutput(NamedTuple):
    """What :func:`fused_linear_logprobs` returns: per token (the labels' shape), in float32
    (float64 for float64 inputs); None for an output not asked for."""

    log_probs: Tensor | None
    entropy: Tensor | None


def _chunks(n: int, chunk_size: int):
    for start in range(0, n, chunk_size):
        yield start, min(start + chunk_size, n)


def _chunk_logits(buffer, hidden, weight, bias, start, end, logit_scale, softcap):
    """(logits z of the chunk before the temperature, dz/dy or None): y = hidden @ weight.T +
    bias in hidden's dtype as an LM head computes it, then scaled and soft-capped in the compute
    dtype (without either, z is y itself in hidden's dtype, written into buffer)."""
    y = buffer[: end - start]
    if bias is None:
        torch.mm(hidden[start:end], weight.t(), out=y)
    else:
        torch.addmm(bias, hidden[start:end], weight.t(), out=y)
    if logit_scale == 1.0 and softcap == 0.0:
        return y, None
    z = y.to(compute_dtype(y.dtype)) * logit_scale
    if softcap == 0.0:
        return z, None
    t = torch.tanh(z / softcap)
    return (softcap * t).contiguous(), logit_scale * (1 - t * t)


def _labels(labels: Tensor) -> tuple[Tensor, Tensor]:
    """(labels the kernels can read: 0 where ignored, the ignored positions)."""
    ignored = labels == IGNORE_INDEX
    return torch.where(ignored, 0, labels).contiguous(), ignored


@torch.library.custom_op("rlgaf_fast::fused_linear_logprobs", mutates_args=())
def _fused_linear_logprobs_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    temperature: float,
    logit_scale: float,
    softcap: float,
    chunk_size: int,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """(log_probs [N], entropy [N]) in the compute dtype for hidden [N, H], weight [V, H], bias
    [V] or None, int64 labels [N] (IGNORE_INDEX: 0 and 0); softcap 0 means none."""
    kernels = kernel_module(_OP, backend)
    n, V = hidden.shape[0], weight.shape[0]
    dtype = compute_dtype(hidden.dtype)
    log_probs = hidden.new_empty((n,), dtype=dtype)
    entropy = hidden.new_empty((n,), dtype=dtype)
    actions, ignored = _labels(labels)
    buffer = hidden.new_empty((min(chunk_size, n), V))
    for start, end in _chunks(n, chunk_size):
        z, _ = _chunk_logits(buffer, hidden, weight, bias, start, end, logit_scale, softcap)
        log_probs[start:end], entropy[start:end] = kernels.ppo_loss_fwd(
            z, actions[start:end], temperature
        )
    zero = torch.zeros((), dtype=dtype, device=hidden.device)
    return torch.where(ignored, zero, log_probs), torch.where(ignored, zero, entropy)


@_fused_linear_logprobs_op.register_fake
def _(hidden, weight, bias, labels, temperature, logit_scale, softcap, chunk_size, backend):
    dtype = compute_dtype(hidden.dtype)
    return tuple(hidden.new_empty(hidden.shape[:1], dtype=dtype) for _ in _OUTPUTS)


@torch.library.custom_op("rlgaf_fast::fused_linear_logprobs_backward", mutates_args=())
def _fused_linear_logprobs_backward_op(
    grad_log_probs: Tensor,
    grad_entropy: Tensor,
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    temperature: float,
    logit_scale: float,
    softcap: float,
    chunk_size: int,
    grad_hidden_needed: bool,
    grad_weight_needed: bool,
    grad_bias_needed: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_hidden, grad_weight, grad_bias) of sum_n grad_log_probs[n] * logp_n +
    grad_entropy[n] * H_n ([N] in the compute dtype); a gradient not needed comes back empty."""
    kernels = kernel_module(_OP, backend)
    n, V = hidden.shape[0], weight.shape[0]
    dtype = compute_dtype(hidden.dtype)
    actions, ignored = _labels(labels)
    zero = torch.zeros((), dtype=dtype, device=hidden.device)
    # an ignored position adds nothing: coefficients 0 give its row a gradient of exactly 0
    g_lp = torch.where(ignored, zero, grad_log_probs.to(dtype)).contiguous()
    g_h = torch.where(ignored, zero, grad_entropy.to(dtype)).contiguous()
    grad_hidden = torch.empty_like(hidden) if grad_hidden_needed else hidden.new_empty(0)
    grad_weight = weight.new_zeros(weight.shape, dtype=dtype) if grad_weight_needed else None
    grad_bias = weight.new_zeros((V,), dtype=dtype) if grad_bias_needed else None
    buffer = hidden.new_empty((min(chunk_size, n), V))
    for start, end in _chunks(n, chunk_size):
        z, dz_dy = _chunk_logits(buffer, hidden, weight, bias, start, end, logit_scale, softcap)
        # the gradient overwrites the chunk's logits
        kernels.ppo_loss_fwd_vjp(
            z, actions[start:end], g_lp[start:end], g_h[start:end], temperature, z
        )
        if dz_dy is not None:
            z = z * dz_dy
        elif logit_scale != 1.0:
            z = z * logit_scale
        grad_y = z.to(hidden.dtype)
        if grad_hidden_needed:
            torch.mm(grad_y, weight, out=grad_hidden[start:end])
        if grad_weight_needed:
            _accumulate_product(grad_weight, grad_y.t(), hidden[start:end])
        if grad_bias_needed:
            grad_bias += grad_y.sum(0, dtype=dtype)
    return (
        grad_hidden,
        weight.new_empty(0) if grad_weight is None else grad_weight.to(weight.dtype),
        weight.new_empty(0) if grad_bias is None else grad_bias.to(bias.dtype),
    )


@_fused_linear_logprobs_backward_op.register_fake
def _(
    grad_log_probs,
    grad_entropy,
    hidden,
    weight,
    bias,
    labels,
    temperature,
    logit_scale,
    softcap,
    chunk_size,
    grad_hidden_needed,
    grad_weight_needed,
    grad_bias_needed,
    backend,
):
    return (
        torch.empty_like(hidden) if grad_hidden_needed else hidden.new_empty(0),
        torch.empty_like(weight) if grad_weight_needed else weight.new_empty(0),
        torch.empty_like(bias) if grad_bias_needed else weight.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, *options = inputs
    ctx.save_for_backward(hidden, weight, bias, labels)
    ctx.options = options


def _backward(ctx, grad_log_probs, grad_entropy):
    refuse_double_backward(_OP)
    hidden, weight, bias, labels = ctx.saved_tensors
    temperature, logit_scale, softcap, chunk_size, backend = ctx.options
    needed = ctx.needs_input_grad[:3]
    grad_hidden, grad_weight, grad_bias = _fused_linear_logprobs_backward_op(
        grad_log_probs.contiguous(),
        grad_entropy.contiguous(),
        hidden,
        weight,
        bias,
        labels,
        temperature,
        logit_scale,
        softcap,
        chunk_size,
        *needed,
        backend,
    )
    grads = (grad_hidden, grad_weight, grad_bias)
    grads = [g if n else None for g, n in zip(grads, needed, strict=True)]
    return (*grads, None, None, None, None, None, None)


_fused_linear_logprobs_op.register_autograd(_backward, setup_context=_setup_context)


def fused_linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    outputs: tuple[str, ...] = _OUTPUTS,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> LogProbsOutput:
    """Log-probabilities of ``labels`` and the entropy per token under
    ``logits = softcap * tanh((hidden @ weight.T + bias) * logit_scale / softcap) / temperature``
    (without softcap: ``(hidden @ weight.T + bias) * logit_scale / temperature``), without
    materialising the ``[N, V]`` logits.

    The tokens are taken ``chunk_size`` at a time (default: about 128 MiB of logits per chunk on
    a CPU, 1 GiB on a GPU); the backward forms each chunk's logits again and overwrites them
    with their gradient, which goes at once into the gradients of hidden, weight and bias.

    Args:
        hidden: ``[N, H]`` or ``[B, T, H]``, float16/bfloat16/float32/float64; the softmax is
            computed in float32 (float64 for float64).
        weight: the LM head ``[V, H]``, hidden's dtype and device. bias: ``[V]`` or None.
        labels: integer, hidden's shape without H, in [0, V) or -100 (ignored: log-probability
            and entropy 0, no gradient).
        temperature, logit_scale, softcap: > 0 (softcap None for none).
        outputs: which of "log_probs" and "entropy" to return (the other is None).
        backend: "auto", "torch" (the reference on the full logits), "cpp" or "triton".

    Returns:
        :class:`LogProbsOutput` of tensors of the labels' shape, differentiable with respect to
        hidden, weight and bias.
    """
    V = check_lm_head(hidden, weight, bias, OPS[_OP].dtypes, min_hidden_dim=1)
    check_tensor(labels, "labels")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    shape = hidden.shape[:-1]
    if tuple(labels.shape) != tuple(shape) or labels.device != hidden.device:
        raise ValueError(
            f"labels must have hidden's shape without H {list(shape)} on {hidden.device}, got "
            f"{list(labels.shape)} on {labels.device}"
        )
    if not torch.compiler.is_compiling() and labels.numel() > 0:
        if bool((((labels < 0) | (labels >= V)) & (labels != IGNORE_INDEX)).any()):
            raise ValueError(f"labels must be in [0, V) = [0, {V}) or {IGNORE_INDEX}")
    temperature = check_positive(temperature, "temperature")
    logit_scale = check_positive(logit_scale, "logit_scale")
    if softcap is not None:
        softcap = check_positive(softcap, "softcap")
    if isinstance(outputs, str) or not set(outputs) <= set(_OUTPUTS) or not outputs:
        raise ValueError(f"outputs must be a non-empty subset of {_OUTPUTS}, got {outputs!r}")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    name = resolve_backend(backend, hidden, _OP)
    if name == "torch":
        log_probs, entropy = reference.fused_linear_logprobs(
            hidden,
            weight,
            labels,
            bias=bias,
            temperature=temperature,
            logit_scale=logit_scale,
            softcap=softcap,
        )
    else:
        log_probs, entropy = _fused_linear_logprobs_op(
            hidden.reshape(-1, hidden.shape[-1]).contiguous(),
            weight.contiguous(),
            None if bias is None else bias.contiguous(),
            labels.reshape(-1).long().contiguous(),
            temperature,
            logit_scale,
            0.0 if softcap is None else softcap,
            chunk_size or _default_chunk(V, hidden.dtype, hidden.device),
            name,
        )
        log_probs, entropy = log_probs.reshape(shape), entropy.reshape(shape)
    return LogProbsOutput(
        log_probs if "log_probs" in outputs else None,
        entropy if "entropy" in outputs else None,
    )
