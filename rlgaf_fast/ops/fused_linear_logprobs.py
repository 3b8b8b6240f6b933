"""Per-token log-probabilities and entropies from hidden states and the LM head, a chunk of tokens
at a time without materialising all logits: public function, custom operators with autograd,
and backend dispatch.

The per-chunk kernels are the PPO kernels (rlgaf_fast.ops._ppo): ppo_loss_fwd gives each row's
log-probability of its label, its entropy and its logsumexp in one read of the row, and
ppo_loss_vjp_lse, from the last two, the gradient of sum_n g_n * logp_n + e_n * H_n for the
incoming gradients g, e in one more. As g and e are known only in backward, the backward either
forms each chunk's logits again (one more matrix product per chunk, no [N, V] tensor kept
between the passes) or, with save_logits, reads the logits the forward kept and overwrites them
with their gradient (three matrix products in all, [N, V] logits held from forward to backward).
The torch backend is rlgaf_fast.reference.fused_linear_logprobs.
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


def _head_logits(y, hidden, weight, bias, start, end):
    """Writes y = hidden[start:end] @ weight.T + bias into y, in hidden's dtype as an LM head
    computes it."""
    if bias is None:
        torch.mm(hidden[start:end], weight.t(), out=y)
    else:
        torch.addmm(bias, hidden[start:end], weight.t(), out=y)


def _scaled_logits(y, logit_scale, softcap):
    """(logits z before the temperature, dz/dy or None) from the head's output y: scaled and
    soft-capped in the compute dtype (without either, z is y itself)."""
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
    save_logits: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """(log_probs [N], entropy [N], row_stats [2N], logits) in the compute dtype for hidden
    [N, H], weight [V, H], bias [V] or None, int64 labels [N] (IGNORE_INDEX: 0 and 0); softcap 0
    means none. row_stats: each row's logsumexp of the logits over the temperature, then its
    entropy (not zeroed where ignored), for the backward. logits: with save_logits the head's
    output, one [chunk, V] tensor per chunk in hidden's dtype (so that the backward can free each
    when done), else empty."""
    kernels = kernel_module(_OP, backend)
    n, V = hidden.shape[0], weight.shape[0]
    dtype = compute_dtype(hidden.dtype)
    log_probs = hidden.new_empty((n,), dtype=dtype)
    entropy = hidden.new_empty((n,), dtype=dtype)
    lse = hidden.new_empty((n,), dtype=dtype)
    actions, ignored = _labels(labels)
    saved = []
    buffer = None if save_logits else hidden.new_empty((min(chunk_size, n), V))
    for start, end in _chunks(n, chunk_size):
        y = hidden.new_empty((end - start, V)) if save_logits else buffer[: end - start]
        _head_logits(y, hidden, weight, bias, start, end)
        z, _ = _scaled_logits(y, logit_scale, softcap)
        log_probs[start:end], entropy[start:end], lse[start:end] = kernels.ppo_loss_fwd(
            z, actions[start:end], temperature
        )
        if save_logits:
            saved.append(y)
    zero = torch.zeros((), dtype=dtype, device=hidden.device)
    masked = [torch.where(ignored, zero, t) for t in (log_probs, entropy)]
    return *masked, torch.cat([lse, entropy]), saved


@_fused_linear_logprobs_op.register_fake
def _(
    hidden,
    weight,
    bias,
    labels,
    temperature,
    logit_scale,
    softcap,
    chunk_size,
    save_logits,
    backend,
):
    dtype = compute_dtype(hidden.dtype)
    n, V = hidden.shape[0], weight.shape[0]
    out = [hidden.new_empty((n,), dtype=dtype) for _ in _OUTPUTS]
    saved = [hidden.new_empty((end - start, V)) for start, end in _chunks(n, chunk_size)]
    return (*out, hidden.new_empty((2 * n,), dtype=dtype), saved if save_logits else [])


def _backward_chunks(
    grad_log_probs: Tensor,
    grad_entropy: Tensor,
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    row_stats: Tensor,
    saved_logits: list[Tensor],
    temperature: float,
    logit_scale: float,
    softcap: float,
    chunk_size: int,
    grad_hidden_needed: bool,
    grad_weight_needed: bool,
    grad_bias_needed: bool,
    backend: str,
    consume: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_hidden, grad_weight, grad_bias) of sum_n grad_log_probs[n] * logp_n +
    grad_entropy[n] * H_n ([N] in the compute dtype); a gradient not needed comes back empty.
    row_stats: the forward's lse and entropy, concatenated ([2N]). saved_logits: the forward's
    logits chunks, or empty: the logits are formed again a chunk at
    a time. With consume, each saved chunk becomes its own gradient buffer and is released from
    saved_logits when done, so the peak is the saved logits plus the weight's gradient and one
    chunk of the hidden's. consume is for the eager backward, which calls this directly: the
    custom operator below declares no mutation and is always called without it."""
    kernels = kernel_module(_OP, backend)
    n, V = hidden.shape[0], weight.shape[0]
    dtype = compute_dtype(hidden.dtype)
    actions, ignored = _labels(labels)
    zero = torch.zeros((), dtype=dtype, device=hidden.device)
    # an ignored position adds nothing: coefficients 0 give its row a gradient of exactly 0
    g_lp = torch.where(ignored, zero, grad_log_probs.to(dtype)).contiguous()
    g_h = torch.where(ignored, zero, grad_entropy.to(dtype)).contiguous()
    lse, entropy = row_stats[:n], row_stats[n:]
    in_place = consume and len(saved_logits) > 0
    grad_hidden = hidden.new_empty(0)
    if grad_hidden_needed and not in_place:
        grad_hidden = torch.empty_like(hidden)
    grad_hidden_chunks = []
    grad_weight = weight.new_zeros(weight.shape, dtype=dtype) if grad_weight_needed else None
    grad_bias = weight.new_zeros((V,), dtype=dtype) if grad_bias_needed else None
    buffer = None if in_place else hidden.new_empty((min(chunk_size, n), V))
    for i, (start, end) in enumerate(_chunks(n, chunk_size)):
        if in_place:
            y, saved_logits[i] = saved_logits[i], None
        elif saved_logits:
            y = buffer[: end - start].copy_(saved_logits[i])
        else:
            y = buffer[: end - start]
            _head_logits(y, hidden, weight, bias, start, end)
        z, dz_dy = _scaled_logits(y, logit_scale, softcap)
        # the gradient overwrites the chunk's logits
        kernels.ppo_loss_vjp_lse(
            z,
            actions[start:end],
            g_lp[start:end],
            g_h[start:end],
            lse[start:end],
            entropy[start:end],
            temperature,
            z,
        )
        if dz_dy is not None:
            z = z * dz_dy
        elif logit_scale != 1.0:
            z = z * logit_scale
        grad_y = z.to(hidden.dtype)
        if grad_hidden_needed and in_place:
            grad_hidden_chunks.append(grad_y @ weight)
        elif grad_hidden_needed:
            torch.mm(grad_y, weight, out=grad_hidden[start:end])
        if grad_weight_needed:
            _accumulate_product(grad_weight, grad_y.t(), hidden[start:end])
        if grad_bias_needed:
            grad_bias += grad_y.sum(0, dtype=dtype)
    if grad_hidden_chunks:
        grad_hidden = torch.cat(grad_hidden_chunks)
    return (
        grad_hidden,
        weight.new_empty(0) if grad_weight is None else grad_weight.to(weight.dtype),
        weight.new_empty(0) if grad_bias is None else grad_bias.to(bias.dtype),
    )


_fused_linear_logprobs_backward_op = torch.library.custom_op(
    "rlgaf_fast::fused_linear_logprobs_backward", _backward_chunks, mutates_args=()
)


@_fused_linear_logprobs_backward_op.register_fake
def _(
    grad_log_probs,
    grad_entropy,
    hidden,
    weight,
    bias,
    labels,
    row_stats,
    saved_logits,
    temperature,
    logit_scale,
    softcap,
    chunk_size,
    grad_hidden_needed,
    grad_weight_needed,
    grad_bias_needed,
    backend,
    consume=False,
):
    return (
        torch.empty_like(hidden) if grad_hidden_needed else hidden.new_empty(0),
        torch.empty_like(weight) if grad_weight_needed else weight.new_empty(0),
        torch.empty_like(bias) if grad_bias_needed else weight.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, *options = inputs
    row_stats, saved_logits = output[2:]
    ctx.mark_non_differentiable(row_stats, *saved_logits)
    # else autograd would hand the backward zero gradients for the saved logits
    ctx.set_materialize_grads(False)
    ctx.options = options
    # Eager autograd keeps the saved logits outside save_for_backward, so that the backward can
    # release each chunk when done with it (which a saved tensor cannot be); a traced graph
    # (tensor subclasses: fake, functional) saves them as usual.
    eager = not torch.compiler.is_compiling() and type(hidden) is torch.Tensor
    ctx.logit_chunks = list(saved_logits) if eager and saved_logits else None
    if ctx.logit_chunks is not None:
        ctx.save_for_backward(hidden, weight, bias, labels, row_stats)
    else:
        ctx.save_for_backward(hidden, weight, bias, labels, row_stats, *saved_logits)


def _backward(ctx, grad_log_probs, grad_entropy, *_grad_saved):
    refuse_double_backward(_OP)
    hidden, weight, bias, labels, row_stats, *saved_logits = ctx.saved_tensors
    temperature, logit_scale, softcap, chunk_size, save_logits, backend = ctx.options
    n, dtype = hidden.shape[0], compute_dtype(hidden.dtype)
    if grad_log_probs is None:
        grad_log_probs = hidden.new_zeros((n,), dtype=dtype)
    if grad_entropy is None:
        grad_entropy = hidden.new_zeros((n,), dtype=dtype)
    args = (grad_log_probs.contiguous(), grad_entropy.contiguous(), hidden, weight, bias, labels)
    args = (*args, row_stats)
    options = (temperature, logit_scale, softcap, chunk_size, *ctx.needs_input_grad[:3], backend)
    if save_logits and not saved_logits:
        if ctx.logit_chunks is None:
            raise RuntimeError(
                "fused_linear_logprobs with save_logits=True takes one backward: the first "
                "used up the saved logits (call it again, or use save_logits=False, to "
                "backward twice)"
            )
        chunks, ctx.logit_chunks = ctx.logit_chunks, None
        grads = _backward_chunks(*args, chunks, *options, consume=True)
    else:
        grads = _fused_linear_logprobs_backward_op(*args, saved_logits, *options)
    grads = [g if n else None for g, n in zip(grads, ctx.needs_input_grad[:3], strict=True)]
    return (*grads, None, None, None, None, None, None, None)


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
    save_logits: bool = False,
    backend: str = "auto",
) -> LogProbsOutput:
    """Log-probabilities of ``labels`` and the entropy per token under
    ``logits = softcap * tanh((hidden @ weight.T + bias) * logit_scale / softcap) / temperature``
    (without softcap: ``(hidden @ weight.T + bias) * logit_scale / temperature``), without
    materialising the ``[N, V]`` logits.

    The tokens are taken ``chunk_size`` at a time (default: about 128 MiB of logits per chunk on
    a CPU, 1 GiB on a GPU); the backward forms each chunk's logits again and overwrites them
    with their gradient, which goes at once into the gradients of hidden, weight and bias. With
    ``save_logits`` the forward keeps all ``[N, V]`` logits (in hidden's dtype, exactly as it
    formed them) until the backward, which then needs no matrix product to form them again:
    three matrix products in all instead of four, for ``N * V * hidden.itemsize`` bytes held
    between the passes (released chunk by chunk during the backward). A graph built with it
    takes a single backward.

    Args:
        hidden: ``[N, H]`` or ``[B, T, H]``, float16/bfloat16/float32/float64; the softmax is
            computed in float32 (float64 for float64).
        weight: the LM head ``[V, H]``, hidden's dtype and device. bias: ``[V]`` or None.
        labels: integer, hidden's shape without H, in [0, V) or -100 (ignored: log-probability
            and entropy 0, no gradient).
        temperature, logit_scale, softcap: > 0 (softcap None for none).
        outputs: which of "log_probs" and "entropy" to return (the other is None).
        chunk_size: tokens per chunk, or None for the default above.
        save_logits: keep the logits from forward to backward (faster, more memory).
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
    if not isinstance(save_logits, bool):
        raise ValueError(f"save_logits must be a bool, got {save_logits!r}")
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
        log_probs, entropy, _, _ = _fused_linear_logprobs_op(
            hidden.reshape(-1, hidden.shape[-1]).contiguous(),
            weight.contiguous(),
            None if bias is None else bias.contiguous(),
            labels.reshape(-1).long().contiguous(),
            temperature,
            logit_scale,
            0.0 if softcap is None else softcap,
            chunk_size or _default_chunk(V, hidden.dtype, hidden.device),
            save_logits,
            name,
        )
        log_probs, entropy = log_probs.reshape(shape), entropy.reshape(shape)
    return LogProbsOutput(
        log_probs if "log_probs" in outputs else None,
        entropy if "entropy" in outputs else None,
    )
