"""Gumbel-Softmax and the fused Gumbel-Softmax -> embedding lookup: public functions, their
custom operators with autograd, and backend dispatch.

The fused backends (cpp, triton) share one kernel contract (see
csrc/cpu/gumbel_softmax.cpp, kernels/gumbel_softmax.py and kernels/gumbel_softmax_embedding.py) on
2-D contiguous inputs; this module does the shape handling, validation and autograd. The torch
backend is rlgaf_fast.reference itself.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlgaf_fast import reference
from rlgaf_fast._backend import kernel_module, resolve_backend
from rlgaf_fast.ops._checks import (
    check_dim,
    check_floating,
    check_positive,
    check_same_device,
    check_vocab_weight,
    resolve_seed,
)
from rlgaf_fast.ops.registry import OPS

_EMBEDDING = "gumbel_softmax_embedding"


# --- Gumbel-Softmax -------------------------------------------------------------------------


@torch.library.custom_op("rlgaf_fast::gumbel_softmax", mutates_args=())
def _gumbel_softmax_op(
    logits: Tensor, tau: float, hard: bool, seed: int, backend: str
) -> tuple[Tensor, Tensor]:
    y, index = kernel_module("gumbel_softmax", backend).gumbel_softmax_fwd(logits, tau, hard, seed)
    return y, index


@_gumbel_softmax_op.register_fake
def _(logits, tau, hard, seed, backend):
    return torch.empty_like(logits), logits.new_empty(logits.shape[:1], dtype=torch.int64)


@torch.library.custom_op("rlgaf_fast::gumbel_softmax_backward", mutates_args=())
def _gumbel_softmax_backward_op(
    grad_y: Tensor, saved: Tensor, tau: float, from_logits: bool, seed: int, backend: str
) -> Tensor:
    kernels = kernel_module("gumbel_softmax", backend)
    grad_y = grad_y.contiguous()
    if from_logits:  # saved are the logits: the soft sample is regenerated from the seed
        return kernels.gumbel_softmax_bwd_from_logits(grad_y, saved, tau, seed)
    return kernels.gumbel_softmax_bwd(grad_y, saved, tau)


@_gumbel_softmax_backward_op.register_fake
def _(grad_y, saved, tau, from_logits, seed, backend):
    return torch.empty_like(saved)


def _gumbel_softmax_setup_context(ctx, inputs, output):
    logits, tau, hard, seed, backend = inputs
    # The backward needs the soft sample. A hard sample's output is the one-hot, and a 16-bit
    # soft output is the sample rounded, whose gradient would be worse than torch's (which keeps
    # it in float32): both regenerate it from the logits and the seed, in float32.
    ctx.from_logits = hard or logits.dtype in (torch.float16, torch.bfloat16)
    ctx.save_for_backward(logits if ctx.from_logits else output[0])
    ctx.tau, ctx.seed, ctx.backend = tau, seed, backend


def _gumbel_softmax_backward(ctx, grad_y, grad_index):
    (saved,) = ctx.saved_tensors
    grad = _gumbel_softmax_backward_op(
        grad_y, saved, ctx.tau, ctx.from_logits, ctx.seed, ctx.backend
    )
    return grad, None, None, None, None


_gumbel_softmax_op.register_autograd(
    _gumbel_softmax_backward, setup_context=_gumbel_softmax_setup_context
)


def gumbel_softmax(
    logits: Tensor,
    tau: float = 1.0,
    hard: bool = False,
    dim: int = -1,
    *,
    seed: int | None = None,
    backend: str = "auto",
) -> Tensor:
    """Draw a Gumbel-Softmax sample; a drop-in for ``torch.nn.functional.gumbel_softmax``.

    Args:
        logits: ``[..., V, ...]`` unnormalised log-probabilities, float16, bfloat16, float32 or
            float64 (arithmetic in float32; float64 in float64). As in torch, a 0-d tensor is
            one category (the sample is 1) and an empty vocabulary gives an empty sample.
        tau: temperature, > 0.
        hard: return the one-hot of the sample's argmax, with the gradient of the soft sample
            (straight-through).
        dim: the vocabulary dimension.
        seed: keys the counter-based noise (Philox on (seed, row, column)); ``None`` draws one
            from torch's default generator.
        backend: ``"auto"``, ``"torch"``, ``"cpp"`` or ``"triton"``.

    Returns:
        ``softmax((logits + g) / tau, dim)`` in the dtype and shape of ``logits``.
    """
    check_floating(logits, "logits", OPS["gumbel_softmax"].dtypes)
    tau = check_positive(tau, "tau")
    dim = check_dim(dim, logits.dim())
    seed = resolve_seed(seed)
    name = resolve_backend(backend, logits, "gumbel_softmax")
    if name == "torch" or logits.dim() == 0 or logits.shape[dim] == 0:
        # no kernel for a 0-d input (one category) or an empty vocabulary: the reference's
        # torch ops handle both (sample 1 and an empty sample)
        return reference.gumbel_softmax(logits, tau, hard, dim, seed=seed)
    x = logits.movedim(dim, -1)
    y, _ = _gumbel_softmax_op(x.reshape(-1, x.shape[-1]).contiguous(), tau, bool(hard), seed, name)
    return y.reshape(x.shape).movedim(-1, dim)


# --- fused Gumbel-Softmax -> embedding --------------------------------------------------------


@torch.library.custom_op("rlgaf_fast::gumbel_softmax_embedding", mutates_args=())
def _gumbel_softmax_embedding_op(
    logits: Tensor, weight: Tensor, tau: float, seed: int, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    out, tokens, lse = kernel_module(_EMBEDDING, backend).gumbel_softmax_embedding_fwd(
        logits, weight, tau, seed
    )
    return out, tokens, lse


def _embedding_out_dtype(logits: Tensor, weight: Tensor) -> torch.dtype:
    """The fused op's out: float32, float64 where an input is. The public function returns it in
    the weight's dtype; the backward reads it unrounded (grad_out . out enters every gradient of
    the logits, and a 16-bit out made them worse than torch's in that dtype)."""
    return torch.float64 if torch.float64 in (logits.dtype, weight.dtype) else torch.float32


@_gumbel_softmax_embedding_op.register_fake
def _(logits, weight, tau, seed, backend):
    n = logits.shape[0]
    lse_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return (
        weight.new_empty((n, weight.shape[1]), dtype=_embedding_out_dtype(logits, weight)),
        logits.new_empty((n,), dtype=torch.int64),
        logits.new_empty((n,), dtype=lse_dtype),
    )


@torch.library.custom_op("rlgaf_fast::gumbel_softmax_embedding_backward", mutates_args=())
def _gumbel_softmax_embedding_backward_op(
    grad_out: Tensor,
    logits: Tensor,
    weight: Tensor,
    out: Tensor,
    lse: Tensor,
    tau: float,
    seed: int,
    backend: str,
    weight_grad: bool,
) -> tuple[Tensor, Tensor]:
    # weight_grad False (the weight needs no gradient: hard mode detaches it): grad_weight, a
    # product as large as the forward's, is skipped and comes back empty
    grad_logits, grad_weight = kernel_module(_EMBEDDING, backend).gumbel_softmax_embedding_bwd(
        grad_out.contiguous(), logits, weight, out, lse, tau, seed, weight_grad
    )
    return grad_logits, grad_weight


@_gumbel_softmax_embedding_backward_op.register_fake
def _(grad_out, logits, weight, out, lse, tau, seed, backend, weight_grad):
    return (
        torch.empty_like(logits),
        torch.empty_like(weight) if weight_grad else weight.new_empty((0,)),
    )


def _embedding_setup_context(ctx, inputs, output):
    logits, weight, tau, seed, backend = inputs
    out, _, lse = output
    ctx.save_for_backward(logits, weight, out, lse)
    ctx.tau, ctx.seed, ctx.backend = tau, seed, backend


def _embedding_backward(ctx, grad_out, grad_tokens, grad_lse):
    logits, weight, out, lse = ctx.saved_tensors
    weight_grad = ctx.needs_input_grad[1]
    grad_logits, grad_weight = _gumbel_softmax_embedding_backward_op(
        grad_out, logits, weight, out, lse, ctx.tau, ctx.seed, ctx.backend, weight_grad
    )
    return grad_logits, grad_weight if weight_grad else None, None, None, None


_gumbel_softmax_embedding_op.register_autograd(
    _embedding_backward, setup_context=_embedding_setup_context
)


def gumbel_softmax_embedding(
    logits: Tensor,
    weight: Tensor,
    tau: float = 1.0,
    hard: bool = False,
    *,
    seed: int | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Embed a Gumbel-Softmax sample without holding all its ``[N, V]`` probabilities at once.

    Equal to ``soft_embedding(gumbel_softmax(logits, tau, hard, seed=s), weight)`` for the same
    seed; the backward pass regenerates the noise from the seed.

    Args:
        logits: ``[..., V]``, float16, bfloat16, float32 or float64.
        weight: ``[V, D]`` embedding matrix, floating, on the logits' device.
        tau: temperature, > 0.
        hard: embed the one-hot of the argmax (``weight[token]``); the gradient to the logits is
            the soft sample's (straight-through), the gradient to ``weight`` the one-hot's.
        seed: as in :func:`gumbel_softmax`.
        backend: ``"auto"``, ``"torch"``, ``"cpp"`` or ``"triton"``.

    Returns:
        ``(embeddings [..., D] in weight's dtype, tokens [...] int64)``.
    """
    check_floating(logits, "logits", OPS[_EMBEDDING].dtypes)
    check_floating(weight, "weight", OPS[_EMBEDDING].dtypes)
    check_same_device(logits, "logits", weight, "weight")
    check_vocab_weight(logits, "logits", weight)
    tau = check_positive(tau, "tau")
    seed = resolve_seed(seed)
    name = resolve_backend(backend, logits, _EMBEDDING)
    if name == "torch":
        return reference.gumbel_softmax_embedding(logits, weight, tau, hard, seed=seed)
    lead = logits.shape[:-1]
    x = logits.reshape(-1, logits.shape[-1]).contiguous()
    # In hard mode the weight's gradient is the one-hot's and comes from the gather below, so
    # the fused op sees a detached weight and contributes the logits' gradient alone.
    out, tokens, _ = _gumbel_softmax_embedding_op(
        x, (weight.detach() if hard else weight).contiguous(), tau, seed, name
    )
    if hard:
        out = weight[tokens] + (out - out.detach()).to(weight.dtype)
    else:
        out = out.to(weight.dtype)
    return out.reshape(*lead, weight.shape[1]), tokens.reshape(lead)
