"""Which implementation runs an op: availability, the user's choice, and the automatic pick.

A backend is chosen per call (``backend=``), per scope (``use_backend``), or by the environment
(``RLGAF_FAST_BACKEND``), in that order; ``"auto"`` picks the fastest one available for the
tensor's device. Asking for one that is not available raises an error naming what is missing.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
import warnings
from collections.abc import Iterator
from types import ModuleType

import torch

BACKENDS = ("torch", "cpp", "triton", "cuda")
_REINSTALL = "reinstall with: pip install --no-build-isolation -e . (a C++ compiler is needed)"
_scoped_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "rlgaf_fast_backend", default=None
)


@functools.cache
def _extension() -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module("rlgaf_fast._C"), ""
    except ImportError as error:
        return None, str(error)


@functools.cache
def _triton() -> tuple[bool, str]:
    try:
        importlib.import_module("triton")
    except ImportError as error:
        return False, str(error)
    return True, ""


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def cpp_available() -> bool:
    """Whether the C++ CPU kernels of the extension rlgaf_fast._C are built and importable."""
    return _extension()[0] is not None


def cuda_available() -> bool:
    """Whether the extension holds the CUDA kernels and a CUDA device is present."""
    ext = _extension()[0]
    return ext is not None and ext.built_with_cuda() and torch.cuda.is_available()


def triton_available() -> bool:
    """Whether Triton kernels can run: Triton imports and a GPU is present (or the interpreter)."""
    return _triton()[0] and (torch.cuda.is_available() or _triton_interpreted())


def available_backends() -> list[str]:
    """The backends this install can run, fastest CPU and GPU paths included, e.g.
    ``["torch", "cpp"]`` on a CPU machine with the extension built."""
    found = ["torch"]
    if cpp_available():
        found.append("cpp")
    if triton_available():
        found.append("triton")
    if cuda_available():
        found.append("cuda")
    return found


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run every rlgaf_fast op inside the ``with`` block on backend ``name`` (or ``"auto"``)."""
    _check_name(name, "name")
    token = _scoped_backend.set(name)
    try:
        yield
    finally:
        _scoped_backend.reset(token)


def _check_name(name: str, argument: str) -> None:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"{argument} must be 'auto' or one of {BACKENDS}, got {name!r}")


@functools.cache
def _say_torch_fallback_once(reason: str) -> None:
    warnings.warn(f"rlgaf_fast: running on the torch backend because {reason}", stacklevel=6)


def resolve_backend(backend: str, tensor: torch.Tensor, lacks: tuple[str, ...] = ()) -> str:
    """The concrete backend that runs an op on ``tensor``'s device for the user's ``backend``.
    ``lacks``: backends that have no kernel of this op, which "auto" passes over.

    Raises ValueError for an unknown name and RuntimeError for one that cannot run here.
    """
    return _resolve_for_device(backend, tensor.device.type, lacks)


# The choice depends only on strings, the environment and what is installed, so torch.compile may
# run it once while tracing and keep the answer, instead of tracing into imports.
@torch.compiler.assume_constant_result
def _resolve_for_device(backend: str, device: str, lacks: tuple[str, ...] = ()) -> str:
    _check_name(backend, "backend")
    if backend == "auto":
        backend = _scoped_backend.get() or os.environ.get("RLGAF_FAST_BACKEND") or "auto"
        _check_name(backend, "RLGAF_FAST_BACKEND")
    if backend == "auto":
        return _auto_backend(device, lacks)
    _require(backend, device)
    return backend


def _auto_backend(device: str, lacks: tuple[str, ...] = ()) -> str:
    if device == "cuda":
        if _triton()[0] and "triton" not in lacks:
            return "triton"
        if cuda_available() and "cuda" not in lacks:
            return "cuda"
        _say_torch_fallback_once(
            "Triton is not available and the CUDA extension has no kernel of this op"
            if cuda_available()
            else "neither Triton nor the CUDA extension is available"
        )
        return "torch"
    if device == "cpu":
        if cpp_available():
            return "cpp"
        _say_torch_fallback_once(
            f"the C++ extension was not built ({_extension()[1]}); " + _REINSTALL
        )
    return "torch"


def _require(backend: str, device: str) -> None:
    if backend == "cpp":
        if not cpp_available():
            raise RuntimeError(
                f"backend 'cpp' is not available: the C++ extension was not built "
                f"({_extension()[1]}); {_REINSTALL}"
            )
        if device != "cpu":
            raise RuntimeError(f"backend 'cpp' runs on CPU tensors, got a tensor on {device}")
    elif backend == "cuda":
        if not cuda_available():
            raise RuntimeError(
                "backend 'cuda' is not available: the extension was built without "
                "its CUDA kernels or no CUDA device is present (build on a machine "
                "with nvcc and a CUDA build of torch)"
            )
        if device != "cuda":
            raise RuntimeError(f"backend 'cuda' runs on CUDA tensors, got a tensor on {device}")
    elif backend == "triton":
        if not _triton()[0]:
            raise RuntimeError(
                f"backend 'triton' is not available: {_triton()[1]} (pip install triton)"
            )
        if device != "cuda" and not _triton_interpreted():
            raise RuntimeError(
                f"backend 'triton' runs on CUDA tensors (or on the CPU under "
                f"TRITON_INTERPRET=1), got a tensor on {device}"
            )


def cpp_ops():
    """The C++ CPU operators, ``torch.ops.rlgaf_fast_cpu``."""
    _extension()
    return torch.ops.rlgaf_fast_cpu


def cuda_ops():
    """The CUDA C++ operators, ``torch.ops.rlgaf_fast_cuda``."""
    _extension()
    return torch.ops.rlgaf_fast_cuda


def triton_module(name: str) -> ModuleType:
    """The Triton kernel module ``rlgaf_fast.kernels.<name>`` (imported on first use)."""
    return importlib.import_module(f"rlgaf_fast.kernels.{name}")


def kernel_module(backend: str, triton_name: str):
    """Where the kernels of ``backend`` live: an object whose attributes are the launchers."""
    if backend == "cpp":
        return cpp_ops()
    if backend == "cuda":
        return cuda_ops()
    if backend == "triton":
        return triton_module(triton_name)
    raise ValueError(f"backend {backend!r} has no kernel module")
