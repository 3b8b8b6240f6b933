"""The one place where ``use_fused_kernels`` chooses between rlgaf_fast's fused ops and their
pure-PyTorch references. Everything else in the loop calls ``ops.<name>`` on what this returns.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor

from rlgaf_fast import reference

OP_NAMES = ("gumbel_softmax", "soft_embedding", "gumbel_softmax_embedding", "ppo_loss",
            "value_loss", "gae")


def kernel_ops(use_fused_kernels: bool) -> SimpleNamespace:
    """A namespace with the six ops the loop uses: from ``rlgaf_fast`` (fused, backend "auto")
    when ``use_fused_kernels`` is true, else from ``rlgaf_fast.reference``."""
    if use_fused_kernels:
        import rlgaf_fast as library

        missing = [name for name in OP_NAMES if not hasattr(library, name)]
        if missing:
            raise RuntimeError(f"use_fused_kernels=True but rlgaf_fast does not provide {missing}; "
                               "set use_fused_kernels=False to run on the reference ops")
    else:
        library = reference
    return SimpleNamespace(**{name: getattr(library, name) for name in OP_NAMES})


def gumbel_noise_rows(seed: int, rows: Tensor, vocab_size: int) -> Tensor:
    """The contract's Gumbel noise, float32 ``[len(rows), V]``, for arbitrary problem rows.

    Generation draws token t of sequence b by Gumbel-max on row ``b * T + t`` of the [B * T, V]
    problem, so that the training pass can regenerate the very same noise for the whole
    sequence at once (``gumbel_softmax_embedding(..., seed=seed)`` on [B * T, V] logits).
    """
    row = rows.to(torch.int64)[:, None].expand(-1, vocab_size)
    col = torch.arange(vocab_size, device=rows.device, dtype=torch.int64)[None, :]
    col = col.expand_as(row)
    words = reference.philox4x32(col >> 2, row & 0xFFFFFFFF, row >> 32, torch.zeros_like(row),
                                 seed)
    word = torch.stack(words, dim=-1).gather(-1, (col & 3).unsqueeze(-1)).squeeze(-1)
    u = ((word >> 9) * 2 + 1).to(torch.float32) * 2.0**-24
    return -torch.log(-torch.log(u))
