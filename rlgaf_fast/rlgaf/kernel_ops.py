"""The one place where ``use_fused_kernels`` chooses between rlgaf_fast's fused ops and their
pure-PyTorch references. Everything else in the loop calls ``ops.<name>`` on what this returns.
"""

from __future__ import annotations

from types import SimpleNamespace

from rlgaf_fast import reference

OP_NAMES = (
    "gumbel_softmax",
    "soft_embedding",
    "gumbel_softmax_embedding",
    "ppo_loss",
    "value_loss",
    "gae",
)


def kernel_ops(use_fused_kernels: bool) -> SimpleNamespace:
    """A namespace with the six ops the loop uses: from ``rlgaf_fast`` (fused, backend "auto")
    when ``use_fused_kernels`` is true, else from ``rlgaf_fast.reference``."""
    if not use_fused_kernels:
        return SimpleNamespace(**{name: getattr(reference, name) for name in OP_NAMES})
    import rlgaf_fast

    return SimpleNamespace(
        **{name: getattr(rlgaf_fast, name, None) or _missing(name) for name in OP_NAMES}
    )


def _missing(name: str):
    def fail(*args, **kwargs):
        raise RuntimeError(
            f"use_fused_kernels=True but this rlgaf_fast has no {name}; "
            "rebuild it, or set use_fused_kernels=False for the reference ops"
        )

    return fail
