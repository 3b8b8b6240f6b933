"""Pure-PyTorch references: the readable ground truth that every backend is tested against.

Everything here is written for clarity, not speed. The Gumbel noise follows the randomness
contract of DESIGN.md: Philox4x32-10 keyed by the seed, counter (column // 4, row_lo, row_hi, 0),
output word column % 4, mapped to the open interval (0, 1) as (2 * (word >> 9) + 1) * 2**-24.
The fused backends (C++, Triton, CUDA) implement exactly this generator, so a seed gives the
same samples on every backend and device.
"""

from __future__ import annotations

import torch
from torch import Tensor

PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUNDS = 10
_MASK32 = 0xFFFFFFFF


def _mul_hi_lo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """High and low 32-bit words of the 64-bit product a * b (a a constant, b < 2**32), in int64
    arithmetic that never overflows: b is split into 16-bit halves."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    t = a * b_lo  # < 2**48
    u = a * b_hi  # < 2**48
    hi = (u + (t >> 16)) >> 16
    lo = (((u & 0xFFFF) << 16) + t) & _MASK32
    return hi & _MASK32, lo


def philox4x32(
    c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, seed: int, rounds: int = PHILOX_ROUNDS
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32 (Salmon et al., 2011), as Triton's ``tl.philox``; int64 tensors holding uint32."""
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32
    for _ in range(rounds):
        hi_a, lo_a = _mul_hi_lo(PHILOX_ROUND_A, c0)
        hi_b, lo_b = _mul_hi_lo(PHILOX_ROUND_B, c2)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & _MASK32
        k1 = (k1 + PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def uniform_noise(seed: int, rows: int, cols: int, device: torch.device | str = "cpu") -> Tensor:
    """Uniform samples in (0, 1), float32 ``[rows, cols]``, keyed by (seed, row, column)."""
    row = torch.arange(rows, device=device, dtype=torch.int64)[:, None].expand(rows, cols)
    col = torch.arange(cols, device=device, dtype=torch.int64)[None, :].expand(rows, cols)
    zero = torch.zeros_like(row)
    words = philox4x32(col >> 2, row & _MASK32, row >> 32, zero, seed)
    word = torch.stack(words, dim=-1).gather(-1, (col & 3).unsqueeze(-1)).squeeze(-1)
    return ((word >> 9) * 2 + 1).to(torch.float32) * 2.0**-24


def gumbel_noise(seed: int, rows: int, cols: int, device: torch.device | str = "cpu") -> Tensor:
    """Standard Gumbel samples ``-log(-log(u))``, float32 ``[rows, cols]``."""
    u = uniform_noise(seed, rows, cols, device)
    return -torch.log(-torch.log(u))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def gumbel_softmax(
    logits: Tensor, tau: float = 1.0, hard: bool = False, dim: int = -1, *, seed: int = 0
) -> Tensor:
    """Gumbel-Softmax sample of ``logits`` along ``dim`` with the contract's noise.

    ``softmax((logits + g) / tau)`` computed in float32 (float64 for float64 input) and returned
    in the input dtype; with ``hard`` the one-hot of the argmax, straight-through gradient.
    Rows are the positions of the other dimensions in row-major order.
    """
    x = logits.movedim(dim, -1)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).to(_compute_dtype(logits.dtype))
    g = gumbel_noise(seed, x2.shape[0], x2.shape[1], logits.device).to(x2.dtype)
    y = torch.softmax((x2 + g) / tau, dim=-1)
    if hard:
        index = y.argmax(dim=-1, keepdim=True)
        y_hard = torch.zeros_like(y).scatter_(-1, index, 1.0)
        y = y_hard - y.detach() + y
    return y.to(logits.dtype).reshape(shape).movedim(-1, dim)


def gumbel_argmax(logits: Tensor, tau: float = 1.0, *, seed: int = 0) -> Tensor:
    """Index of the Gumbel-max sample of each row of ``logits [..., V]`` (int64 ``[...]``)."""
    x2 = logits.reshape(-1, logits.shape[-1]).to(_compute_dtype(logits.dtype))
    g = gumbel_noise(seed, x2.shape[0], x2.shape[1], logits.device).to(x2.dtype)
    return ((x2 + g) / tau).argmax(dim=-1).reshape(logits.shape[:-1])


def soft_embedding(probs: Tensor, weight: Tensor, *, top_k: int | None = None) -> Tensor:
    """``probs @ weight`` for ``probs [..., V]`` and ``weight [V, D]``.

    With ``top_k`` only the k largest probabilities of each row are kept and renormalised to sum
    to one, so a row reads k embedding rows instead of V.
    """
    if top_k is None:
        return probs.to(weight.dtype) @ weight
    values, index = probs.topk(top_k, dim=-1)
    values = values / values.sum(dim=-1, keepdim=True)
    rows = weight[index]  # [..., k, D]
    return (values.to(weight.dtype).unsqueeze(-2) @ rows).squeeze(-2)


def gumbel_softmax_embedding(
    logits: Tensor, weight: Tensor, tau: float = 1.0, hard: bool = False, *, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """``(soft_embedding(gumbel_softmax(logits, tau, hard, seed=seed), weight), tokens)``.

    logits ``[..., V]``, weight ``[V, D]``; returns embeddings ``[..., D]`` in the weight's dtype
    and the sampled token of each row, int64 ``[...]``.
    """
    y = gumbel_softmax(logits.to(_compute_dtype(logits.dtype)), tau, hard, seed=seed)
    out = y.to(weight.dtype) @ weight
    return out, y.argmax(dim=-1)
