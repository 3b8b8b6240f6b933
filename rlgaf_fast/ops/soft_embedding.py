"""Soft-embedding lookup ``probs @ weight``: how a discriminator reads relaxed (soft one-hot)
tokens. Public function and backend dispatch.

Dense mode is a matrix product, which cuBLAS (tensor cores) and the CPU BLAS already run at the
hardware's limit, so every fused backend calls it; the top-k mode gathers k rows per token with
ATen's fused gather-and-weighted-sum (``embedding_bag``) instead of reading all V rows.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from rlgaf_fast import reference
from rlgaf_fast._backend import resolve_backend
from rlgaf_fast.ops._checks import check_floating, check_same_device


def soft_embedding(
    probs: Tensor, weight: Tensor, *, top_k: int | None = None, backend: str = "auto"
) -> Tensor:
    """Embed soft tokens: ``probs @ weight``.

    Args:
        probs: ``[..., V]`` probabilities (rows need not sum to one in dense mode), floating.
        weight: ``[V, D]`` embedding matrix, floating, same device.
        top_k: keep only the k largest probabilities of each row, renormalised to sum to one, and
            gather those k rows (1 <= top_k <= V).
        backend: ``"auto"``, ``"torch"``, ``"cpp"``, ``"triton"`` or ``"cuda"``.

    Returns:
        ``[..., D]`` in weight's dtype; differentiable with respect to both inputs.
    """
    check_floating(probs, "probs")
    check_floating(weight, "weight")
    check_same_device(probs, "probs", weight, "weight")
    if probs.dim() < 1 or weight.dim() != 2 or weight.shape[0] != probs.shape[-1]:
        raise ValueError(f"weight must be [V, D] with V = probs.shape[-1] = "
                         f"{probs.shape[-1] if probs.dim() else None}, got {list(weight.shape)}")
    vocab = weight.shape[0]
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                              or not 1 <= top_k <= vocab):
        raise ValueError(f"top_k must be an int in [1, {vocab}] or None, got {top_k!r}")
    name = resolve_backend(backend, probs)
    if name == "torch":
        return reference.soft_embedding(probs, weight, top_k=top_k)
    if top_k is None:
        return probs.to(weight.dtype) @ weight
    values, index = probs.topk(top_k, dim=-1)
    values = (values / values.sum(dim=-1, keepdim=True)).to(weight.dtype)
    lead = probs.shape[:-1]
    out = F.embedding_bag(
        index.reshape(-1, top_k), weight, per_sample_weights=values.reshape(-1, top_k), mode="sum"
    )
    return out.reshape(*lead, weight.shape[1])
