"""Drop-in swaps for code that cannot be edited: route torch.nn.functional.gumbel_softmax
through rlgaf_fast."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch.nn.functional as F

from rlgaf_fast.ops.gumbel_softmax import gumbel_softmax

_original_gumbel_softmax = F.gumbel_softmax


def _patched_gumbel_softmax(logits, tau=1.0, hard=False, eps=1e-10, dim=-1):
    # eps is accepted for signature compatibility; torch deprecated it and ignores it too.
    return gumbel_softmax(logits, tau=tau, hard=hard, dim=dim)


def patch_torch() -> None:
    """Make ``torch.nn.functional.gumbel_softmax`` call :func:`rlgaf_fast.gumbel_softmax`."""
    F.gumbel_softmax = _patched_gumbel_softmax


def unpatch_torch() -> None:
    """Restore the original ``torch.nn.functional.gumbel_softmax``."""
    F.gumbel_softmax = _original_gumbel_softmax


@contextlib.contextmanager
def patched_torch() -> Iterator[None]:
    """``with rlgaf_fast.patched_torch(): ...`` swaps rlgaf_fast in for the block only."""
    previous = F.gumbel_softmax
    patch_torch()
    try:
        yield
    finally:
        F.gumbel_softmax = previous
