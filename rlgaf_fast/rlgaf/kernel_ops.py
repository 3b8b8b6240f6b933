"""The one place where ``use_fused_kernels`` chooses between rlgaf_fast's fused ops and their
pure-PyTorch references. Everything else in the loop calls ``ops.<name>`` on what this returns.
"""

from __future__ import annotations

from types import SimpleNamespace

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

