"""Launch helpers shared by the Triton kernel modules of ``rlgaf_fast.kernels``.

The folder has no ``__init__.py`` on purpose: it is installed as ``rlgaf_fast.kernels``, and as a
namespace portion at the repository root it cannot hide another distribution's ``kernels``
package (Hugging Face's, which transformers imports) from scripts run there.
"""

from __future__ import annotations

import contextlib
import functools
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
