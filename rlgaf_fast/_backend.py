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

from rlgaf_fast.ops import registry

BACKENDS = ("torch", "cpp", "triton")
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


def resolve_backend(backend: str, tensor: torch.Tensor, op: str) -> str:
    """The concrete backend that runs ``op`` on ``tensor``'s device for the user's ``backend``.
    "auto" passes over the backends that have no kernel of ``op`` (rlgaf_fast.ops.registry).

    Raises ValueError for an unknown name and RuntimeError for one that cannot run here or has
    no kernel of ``op``.
    """
    return _resolve_for_device(backend, tensor.device.type, op)


# The choice depends only on strings, the environment and what is installed, so torch.compile may
# run it once while tracing and keep the answer, instead of tracing into imports.
@torch.compiler.assume_constant_result
def _resolve_for_device(backend: str, device: str, op: str) -> str:
    _check_name(backend, "backend")
    kernels = registry.spec(op).kernels  # KeyError naming the known ops
    if backend == "auto":
        backend = _scoped_backend.get() or os.environ.get("RLGAF_FAST_BACKEND") or "auto"
        _check_name(backend, "RLGAF_FAST_BACKEND")
    if backend == "auto":
        return _auto_backend(device, kernels)
    _require(backend, device)
    if not registry.has_kernel(op, backend):
        others = [b for b in registry.backends(op) if _runs_on(b, device)]
        raise RuntimeError(
            f"{op} has no {backend!r} kernel; the backends of {op} for tensors on {device}: "
            f"{others}"
        )
    return backend


def _runs_on(backend: str, device: str) -> bool:
    """Whether ``backend`` takes tensors of ``device`` (not whether it is installed)."""
    if backend == "cpp":
        return device == "cpu"
    if backend == "triton":
        return device == "cuda" or _triton_interpreted()
    return True


def _auto_backend(device: str, kernels: tuple[str, ...]) -> str:
    """The fastest available backend for ``device`` among torch and ``kernels``."""
    if device == "cuda" and "triton" in kernels:
        if _triton()[0]:
            return "triton"
        _say_torch_fallback_once(f"Triton is not available ({_triton()[1]}); pip install triton")
    if device == "cpu" and "cpp" in kernels:
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


def extension_ops():
    """The C++ CPU operators of rlgaf_fast._C (the cpp backend), ``torch.ops.rlgaf_fast_C``."""
    _extension()
    return torch.ops.rlgaf_fast_C


def triton_module(name: str) -> ModuleType:
    """The Triton kernel module ``rlgaf_fast.kernels.<name>`` (imported on first use)."""
    return importlib.import_module(f"rlgaf_fast.kernels.{name}")


def kernel_module(op: str, backend: str):
    """Where the kernels of ``op`` on the fused ``backend`` live: an object whose attributes are
    the kernel functions (the extension's operators or a Triton module's launchers)."""
    row = registry.spec(op)
    if backend not in row.kernels:
        raise ValueError(f"backend must be one of {row.kernels} for {op}, got {backend!r}")
    if backend == "cpp":
        return extension_ops()
    if row.triton_module is None:
        raise ValueError(f"{op} has no Triton module: its triton path is torch ops")
    return triton_module(row.triton_module)
