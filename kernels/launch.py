"""Launch helpers shared by the Triton kernel modules of ``rlgaf_fast.kernels``: the device
scope, what a launch runs on (GPU or interpreter), output buffers, 1 / tau as float32 parts, and
the launchers' argument checks. The kernel modules call them as ``launch.<name>``, so that one
attribute here (patched by benchmarks/triton_compile_check.py) governs every launcher.

The folder has no ``__init__.py`` on purpose: it is installed as ``rlgaf_fast.kernels``, and as a
namespace portion at the repository root it cannot hide another distribution's ``kernels``
package (Hugging Face's, which transformers imports) from scripts run there.
"""

from __future__ import annotations

import contextlib
import functools
import struct
from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)


def on_tensor_device(launcher: F) -> F:
    """Run ``launcher`` with its first argument's GPU as the current device: Triton launches on
    the current device and its current stream, which need not be the tensors' (a model on
    cuda:1 in a process whose current device is cuda:0)."""

    @functools.wraps(launcher)
    def wrapper(tensor: torch.Tensor, *args, **kwargs):
        scope = torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()
        with scope:
            return launcher(tensor, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def on_gpu(t: torch.Tensor) -> bool:
    """True for a real GPU launch; CPU tensors mean the interpreter (TRITON_INTERPRET=1)."""
    return t.device.type != "cpu"


def ptx_log(t: torch.Tensor) -> bool:
    """The hardware log2 approximation is PTX: NVIDIA GPUs only."""
    return t.device.type == "cuda" and torch.version.hip is None


@functools.cache
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def result_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output buffer of a kernel. The interpreter rounds float32 to bfloat16 toward zero where a
    GPU rounds to nearest even, so there bfloat16 results are written in float32 and rounded by
    torch (the caller converts with .to(dtype), a no-op on a GPU)."""
    if device.type == "cpu" and dtype == torch.bfloat16:
        dtype = torch.float32
    return torch.empty(shape, dtype=dtype, device=device)


def inv_tau_parts(tau: float) -> tuple[float, float]:
    """1 / tau split into float32 hi + lo (the kernels take float32 scalars)."""
    inv = 1.0 / tau
    try:
        hi = struct.unpack("f", struct.pack("f", inv))[0]
    except OverflowError:
        return float("inf"), 0.0
    lo = struct.unpack("f", struct.pack("f", inv - hi))[0]
    return hi, lo


def check_grid(grid: tuple[int, int], kernel: str) -> tuple[int, int]:
    """A launch grid within CUDA's limits (2^31 - 1 programs on axis 0, 65535 on axis 1), or a
    clear error instead of the launch's "invalid argument"."""
    if grid[0] > 2**31 - 1 or grid[1] > 65535:
        raise ValueError(
            f"{kernel}: the problem is too large for one launch (grid {grid}, "
            "limits 2^31 - 1 and 65535)"
        )
    return grid


def check_matrix(name: str, t: torch.Tensor) -> None:
    """A 2-D contiguous floating tensor, as every Gumbel-Softmax kernel takes."""
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"tensors must be on one device, got {devices}")


def check_tau_seed(tau: float, seed: int | None = None) -> None:
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if seed is not None and not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2^63), got {seed}")
