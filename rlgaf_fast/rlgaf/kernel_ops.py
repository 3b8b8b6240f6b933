"""The one place where ``use_fused_kernels`` chooses between rlgaf_fast's fused ops and their
pure-PyTorch references. Everything else in the loop calls ``ops.<name>`` on what this returns.
The plain tensor helpers the loop uses beside them (masked means) are here too.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor

from rlgaf_fast import reference
from rlgaf_fast.ops.registry import training_loop_ops

# the ops of the op table (rlgaf_fast.ops.registry) that the training loop takes from here
OP_NAMES = training_loop_ops()


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """The mean of ``x`` where ``mask`` is set (0 where it is set nowhere)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """``x`` shifted and scaled to mean 0 and variance 1 where ``mask`` is set, 0 elsewhere."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask.to(x.dtype)


def kernel_ops(use_fused_kernels: bool) -> SimpleNamespace:
    """A namespace with the ops the loop uses: from ``rlgaf_fast`` (fused, backend "auto") when
    ``use_fused_kernels`` is true, else from ``rlgaf_fast.reference``. Each set's
    ``token_logprobs`` computes exactly the log-probabilities its ``ppo_loss`` computes, so the
    first ratio of a PPO update is 1 to the bit."""
    if not use_fused_kernels:
        ops = {name: getattr(reference, name) for name in OP_NAMES}
    else:
        import rlgaf_fast

        ops = {name: getattr(rlgaf_fast, name, None) or _missing(name) for name in OP_NAMES}
    return SimpleNamespace(**ops)


def _missing(name: str):
    def fail(*args, **kwargs):
        raise RuntimeError(
            f"use_fused_kernels=True but this rlgaf_fast has no {name}; "
            "rebuild it, or set use_fused_kernels=False for the reference ops"
        )

    return fail
