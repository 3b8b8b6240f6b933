"""Soft-embedding lookup ``probs @ weight``: how a discriminator reads relaxed (soft one-hot)
tokens. Public function, the top-k custom operator with its autograd, and backend dispatch.

Dense mode is a matrix product, which cuBLAS (tensor cores) and the CPU BLAS already run at the
hardware's limit, so every fused backend calls it. The top-k mode gathers k rows per token
instead of reading all V rows: the cpp backend selects the k largest probabilities of a row in
one pass and gathers in the same kernel (csrc/cpu/soft_embedding.cpp); the GPU backends use
``topk`` and ATen's fused gather-and-weighted-sum (``embedding_bag``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rlgaf_fast import reference
from rlgaf_fast._backend import extension_ops, resolve_backend
from rlgaf_fast.ops._checks import check_floating, check_same_device, check_vocab_weight
from rlgaf_fast.ops.registry import OPS


@torch.library.custom_op("rlgaf_fast::soft_embedding_topk", mutates_args=())
def _soft_embedding_topk_op(
    probs: Tensor, weight: Tensor, top_k: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    out, index, coef, row_sum = extension_ops().soft_embedding_topk_fwd(probs, weight, top_k)
    return out, index, coef, row_sum


@_soft_embedding_topk_op.register_fake
def _(probs, weight, top_k):
    acc = torch.float64 if probs.dtype == torch.float64 else torch.float32
    n = probs.shape[0]
    return (
        weight.new_empty(n, weight.shape[1]),
        probs.new_empty(n, top_k, dtype=torch.int64),
        probs.new_empty(n, top_k, dtype=acc),
        probs.new_empty(n, dtype=acc),
    )


@torch.library.custom_op("rlgaf_fast::soft_embedding_topk_backward", mutates_args=())
def _soft_embedding_topk_backward_op(
    grad_out: Tensor,
    weight: Tensor,
    out: Tensor,
    index: Tensor,
    coef: Tensor,
    row_sum: Tensor,
    probs_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    grad_probs, grad_weight = extension_ops().soft_embedding_topk_bwd(
        grad_out.contiguous(), weight, out, index, coef, row_sum, probs_dtype
    )
    return grad_probs, grad_weight


@_soft_embedding_topk_backward_op.register_fake
def _(grad_out, weight, out, index, coef, row_sum, probs_dtype):
    return (
        weight.new_empty(index.shape[0], weight.shape[0], dtype=probs_dtype),
        torch.empty_like(weight),
    )


def _soft_embedding_topk_setup_context(ctx, inputs, output):
    probs, weight, _ = inputs
    out, index, coef, row_sum = output
    ctx.save_for_backward(weight, out, index, coef, row_sum)
    ctx.probs_dtype = probs.dtype


def _soft_embedding_topk_backward(ctx, grad_out, *_):
    weight, out, index, coef, row_sum = ctx.saved_tensors
    grad_probs, grad_weight = _soft_embedding_topk_backward_op(
        grad_out, weight, out, index, coef, row_sum, ctx.probs_dtype
    )
    return grad_probs, grad_weight, None


_soft_embedding_topk_op.register_autograd(
    _soft_embedding_topk_backward, setup_context=_soft_embedding_topk_setup_context
)


def soft_embedding(
    probs: Tensor, weight: Tensor, *, top_k: int | None = None, backend: str = "auto"
) -> Tensor:
    """Embed soft tokens: ``probs @ weight``.

    Args:
        probs: ``[..., V]`` probabilities (rows need not sum to one in dense mode), floating.
        weight: ``[V, D]`` embedding matrix, floating, same device.
        top_k: keep only the k largest probabilities of each row, renormalised to sum to one, and
            gather those k rows (1 <= top_k <= V).
        backend: ``"auto"``, ``"torch"``, ``"cpp"`` or ``"triton"``.

    Returns:
        ``[..., D]`` in weight's dtype; differentiable with respect to both inputs.
    """
    check_floating(probs, "probs", OPS["soft_embedding"].dtypes)
    check_floating(weight, "weight", OPS["soft_embedding"].dtypes)
    check_same_device(probs, "probs", weight, "weight")
    check_vocab_weight(probs, "probs", weight)
    vocab = weight.shape[0]
    if top_k is not None and (
        isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= vocab
    ):
        raise ValueError(f"top_k must be an int in [1, {vocab}] or None, got {top_k!r}")
    name = resolve_backend(backend, probs, "soft_embedding")
    if name == "torch":
        return reference.soft_embedding(probs, weight, top_k=top_k)
    if top_k is None:
        return probs.to(weight.dtype) @ weight
    lead = probs.shape[:-1]
    if name == "cpp":
        out = _soft_embedding_topk_op(
            probs.reshape(-1, vocab).contiguous(), weight.contiguous(), top_k
        )[0]
        return out.reshape(*lead, weight.shape[1])
    values, index = probs.topk(top_k, dim=-1)
    values = (values / values.sum(dim=-1, keepdim=True)).to(weight.dtype)
    out = F.embedding_bag(
        index.reshape(-1, top_k), weight, per_sample_weights=values.reshape(-1, top_k), mode="sum"
    )
    return out.reshape(*lead, weight.shape[1])
