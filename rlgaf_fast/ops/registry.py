"""The op table: which backends have a kernel of which op, where their kernels live, and which
dtypes the op takes. Dispatch (rlgaf_fast._backend), the benchmark's providers
(rlgaf_fast.bench.cases) and the training loop's op set (rlgaf_fast.rlgaf.kernel_ops) all read
it, so that no other module lists ops or backends per op.

Every op has the torch backend, rlgaf_fast.reference, which is the readable truth the fused
kernels are tested against. ``kernels`` names the fused backends on top of it:

- ``cpp``: the C++ CPU kernels of the extension rlgaf_fast._C, ``torch.ops.rlgaf_fast_C.<fn>``
  (schema declared once in csrc/ops.cpp, CPU implementation registered in csrc/cpu/);
- ``triton``: the launchers of the module ``rlgaf_fast.kernels.<triton_module>``.

"auto" passes over a backend that has no kernel of the op, and asking for one explicitly is an
error naming the op.

Adding an op: one row here, its reference function in rlgaf_fast/reference.py, its public
function in an rlgaf_fast/ops module (validation, then ``resolve_backend(backend, x, "<op>")``
and ``kernel_module("<op>", backend)``), the kernels (a schema in csrc/ops.cpp plus its
TORCH_LIBRARY_IMPL in csrc/cpu/; a Triton module under kernels/), and tests against the
reference on every backend. Adding a backend: its name in rlgaf_fast._backend.BACKENDS with
its availability and device rules there, and its name in the ``kernels`` of each op it serves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlgaf_fast.ops._checks import FLOAT_DTYPES

FUSED_BACKENDS = ("cpp", "triton")


@dataclass(frozen=True)
class OpSpec:
    """One row of the table.

    kernels: the fused backends that run the op (besides torch, which always does).
    triton_module: the module of rlgaf_fast.kernels with its Triton launchers (None: the op's
        triton path is made of torch ops).
    dtypes: the floating dtypes its float tensor inputs may have; arithmetic is float32 for
        the 16-bit ones and float32, float64 for float64 (ops without a kernel follow their
        inputs' dtype).
    training_loop: the training loop takes it from rlgaf_fast.rlgaf.kernel_ops, fused or
        reference (so the reference module must have a function of that name).
    """

    kernels: tuple[str, ...]
    triton_module: str | None = None
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
    training_loop: bool = False

    def __post_init__(self) -> None:
        unknown = set(self.kernels) - set(FUSED_BACKENDS)
        if unknown:
            raise ValueError(f"kernels must be among {FUSED_BACKENDS}, got {sorted(unknown)}")


_ALL = FUSED_BACKENDS

OPS: dict[str, OpSpec] = {
    "gumbel_softmax": OpSpec(_ALL, "gumbel_softmax", training_loop=True),
    "gumbel_softmax_embedding": OpSpec(_ALL, "gumbel_softmax_embedding", training_loop=True),
    # dense mode is one matrix product on every backend; top-k is a cpp kernel, and on a GPU
    # topk + embedding_bag (ATen's fused gather), so no Triton module
    "soft_embedding": OpSpec(_ALL, training_loop=True),
    "ppo_loss": OpSpec(_ALL, "ppo_loss", training_loop=True),
    "fused_linear_ppo_loss": OpSpec(_ALL, "ppo_loss"),
    "token_logprobs": OpSpec(_ALL, "ppo_loss", training_loop=True),
    "fused_linear_logprobs": OpSpec(_ALL, "ppo_loss"),
    "value_loss": OpSpec((), training_loop=True),
    "gae": OpSpec((), training_loop=True),
}


def spec(op: str) -> OpSpec:
    """The row of ``op``; KeyError naming the known ops otherwise."""
    try:
        return OPS[op]
    except KeyError:
        raise KeyError(f"op must be one of {sorted(OPS)}, got {op!r}") from None


def backends(op: str) -> tuple[str, ...]:
    """Every backend that runs ``op``: torch, then its fused ones."""
    return ("torch", *spec(op).kernels)


def has_kernel(op: str, backend: str) -> bool:
    """Whether ``backend`` runs ``op`` (torch always does)."""
    return backend == "torch" or backend in spec(op).kernels


def training_loop_ops() -> tuple[str, ...]:
    """The ops the training loop takes from rlgaf_fast.rlgaf.kernel_ops, in table order."""
    return tuple(name for name, row in OPS.items() if row.training_loop)
