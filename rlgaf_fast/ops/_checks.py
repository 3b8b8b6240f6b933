"""Input checks shared by the op modules: each error names the argument and what was expected."""

from __future__ import annotations

import math

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SEED_LIMIT = 2**63


def check_tensor(x: object, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_floating(x: object, name: str, dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES) -> Tensor:
    """``x`` is a tensor of one of ``dtypes`` (an op's are in rlgaf_fast.ops.registry)."""
    x = check_tensor(x, name)
    if x.dtype not in dtypes:
        names = [str(d).removeprefix("torch.") for d in dtypes]
        expected = " or ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
        raise TypeError(f"{name} must be {expected}, got {x.dtype}")
    return x


def check_positive(value: float, name: str) -> float:
    if isinstance(value, Tensor):
        value = float(value)
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return float(value)


def check_same_device(a: Tensor, a_name: str, b: Tensor, b_name: str) -> None:
    if a.device != b.device:
        raise ValueError(
            f"{a_name} and {b_name} must be on the same device, got {a.device} and {b.device}"
        )


def check_vocab_weight(x: Tensor, name: str, weight: Tensor) -> None:
    """``x`` is ``[..., V]`` and ``weight`` ``[V, D]``."""
    if x.dim() < 1:
        raise ValueError(f"{name} must be [..., V] (at least 1-D), got shape {list(x.shape)}")
    if weight.dim() != 2 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"weight must be [V, D] with V = {name}.shape[-1] = {x.shape[-1]}, "
            f"got {list(weight.shape)}"
        )


def check_dim(dim: int, ndim: int, name: str = "dim") -> int:
    if not isinstance(dim, int) or not -max(ndim, 1) <= dim < max(ndim, 1):
        raise IndexError(f"{name} must be in [{-max(ndim, 1)}, {max(ndim, 1) - 1}], got {dim}")
    return dim % max(ndim, 1)


def resolve_seed(seed: int | None) -> int:
    """The user's seed, or one drawn from torch's default generator (so that
    ``torch.manual_seed`` makes runs reproducible)."""
    if seed is None:
        return int(torch.randint(0, SEED_LIMIT - 1, (), dtype=torch.int64).item())
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    return seed


def check_lm_head(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    dtypes: tuple[torch.dtype, ...],
    min_hidden_dim: int = 2,
) -> int:
    """Checks hidden states ``[..., H]`` against an LM head ``weight [V, H]`` and ``bias [V]``
    (same dtype and device); returns V."""
    check_floating(hidden, "hidden", dtypes)
    check_floating(weight, "weight", dtypes)
    if hidden.dim() < min_hidden_dim:
        raise ValueError(f"hidden must be [N, H] or [B, T, H], got {list(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] < 1:
        raise ValueError(
            f"weight must be [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, "
            f"got {list(weight.shape)}"
        )
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(
            f"weight must have hidden's dtype and device ({hidden.dtype}, {hidden.device}), got "
            f"{weight.dtype}, {weight.device}"
        )
    V = weight.shape[0]
    if bias is not None:
        check_floating(bias, "bias", dtypes)
        if bias.shape != (V,) or bias.dtype != weight.dtype or bias.device != weight.device:
            raise ValueError(
                f"bias must be [V] = [{V}] with weight's dtype and device, got "
                f"{list(bias.shape)} {bias.dtype} {bias.device}"
            )
    return V
