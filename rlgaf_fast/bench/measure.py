"""How the suite measures: wall time of a call, its peak memory, and the device's ceilings.

Time. On a CPU, ``time.perf_counter`` around each call (the ops are synchronous there); on a
GPU, a pair of CUDA events around each call, recorded on the current stream, read after
synchronisations every few calls. The caller warms up first (the suite's first call of each
provider is its checked, memory-measured call; torch.compile gets one more call before that, its
compilation). Calls are repeated until ``max_repeats`` or until ``budget_s`` has passed, with
at least ``min_repeats``; the report gives their median and 20th/80th percentiles.

Peak memory, the extra bytes a call needs above what was allocated before it (its outputs,
intermediates and gradients). On a GPU, ``torch.cuda.max_memory_allocated`` after a reset minus
``torch.cuda.memory_allocated`` before. On a CPU there is no allocator statistic, so the call
runs once under ``torch.profiler`` with ``profile_memory=True`` and the peak of the running sum
of the tensor allocations and frees it records is taken (None where it records no allocation);
with ``RLGAF_BENCH_CPU_MEMORY=rss`` the process's resident-set high-water mark (reset through
/proc/self/clear_refs) is used instead. ``memory_method`` says which.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

T = TypeVar("T")
CPU_MEMORY_METHOD = "torch.profiler profile_memory: peak of the running sum of tensor allocations"
RSS_MEMORY_METHOD = "process RSS high-water mark (VmHWM after clear_refs) minus RSS before"
CUDA_MEMORY_METHOD = "torch.cuda.max_memory_allocated after reset minus memory_allocated before"


@dataclass
class Timing:
    """Times of the repeated calls, in milliseconds."""

    times_ms: list[float]

    @property
    def median_ms(self) -> float:
        return float(np.percentile(self.times_ms, 50))

    @property
    def p20_ms(self) -> float:
        return float(np.percentile(self.times_ms, 20))

    @property
    def p80_ms(self) -> float:
        return float(np.percentile(self.times_ms, 80))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(
    fn: Callable[[], object],
    device: torch.device,
    *,
    setup: Callable[[], None] | None = None,
    min_repeats: int = 3,
    max_repeats: int = 20,
    budget_s: float = 2.0,
) -> Timing:
    """Time ``fn()`` (already warmed up) repeatedly; ``setup()`` runs untimed before each call
    (e.g. clearing gradients)."""
    times: list[float] = []
    started = time.perf_counter()
    if device.type == "cuda":
        pairs = []
        while len(pairs) < max_repeats and (
            len(pairs) < min_repeats or time.perf_counter() - started < budget_s
        ):
            if setup is not None:
                setup()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            pairs.append((start, end))
            if len(pairs) % 5 == 0:  # keep the host from racing far ahead of the budget
                torch.cuda.synchronize(device)
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in pairs]
    else:
        while len(times) < max_repeats and (
            len(times) < min_repeats or time.perf_counter() - started < budget_s
        ):
            if setup is not None:
                setup()
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return Timing(times)


@contextlib.contextmanager
def _quiet_profiler_log() -> Iterator[None]:
    """Drop the profiler library's start/stop lines ("USDT: ... profiler_start") that it writes
    straight to file descriptor 2, and pass on anything else written there meanwhile."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode(errors="replace")
            kept = [line for line in text.splitlines(keepends=True) if "USDT:" not in line]
            sys.stderr.write("".join(kept))


def _profiled_peak_bytes(fn: Callable[[], T]) -> tuple[T, int | None]:
    """``fn()`` and the peak of the running sum of CPU tensor allocations during it, from the
    profiler's allocation events; None where this torch's profiler does not expose them."""
    from torch.profiler import ProfilerActivity, profile

    with (
        _quiet_profiler_log(),
        profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        result = fn()
    try:
        tree = prof.profiler.kineto_results.experimental_event_tree()
        allocation = torch._C._profiler._EventType.Allocation
    except (AttributeError, RuntimeError):
        return result, None
    events: list[tuple[int, int]] = []
    stack = list(tree)
    while stack:
        node = stack.pop()
        if node.tag == allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    events.sort()
    running = peak = 0
    for _, size in events:
        running += size
        peak = max(peak, running)
    return result, peak


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _rss_peak_bytes(fn: Callable[[], T]) -> tuple[T, int | None]:
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets VmHWM to the current RSS
        before = _rss_kib("VmRSS")
    except (OSError, RuntimeError):
        return fn(), None
    result = fn()
    return result, max(0, _rss_kib("VmHWM") - before) * 1024


def memory_method(device: torch.device) -> str:
    """How :func:`peak_memory` measures on ``device`` (one of the *_MEMORY_METHOD strings)."""
    if device.type == "cuda":
        return CUDA_MEMORY_METHOD
    if os.environ.get("RLGAF_BENCH_CPU_MEMORY") == "rss":
        return RSS_MEMORY_METHOD
    return CPU_MEMORY_METHOD


def peak_memory(fn: Callable[[], T], device: torch.device) -> tuple[T, int | None, str]:
    """``fn()``, the extra bytes allocated at its peak, and the method used to measure them."""
    method = memory_method(device)
    if method == CUDA_MEMORY_METHOD:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - before, method
    if method == CPU_MEMORY_METHOD:
        # No profiler events: the peak is unknown (None), as fn must run once only (a second
        # fwd+bwd would accumulate its gradients twice before the result is checked).
        return *_profiled_peak_bytes(fn), method
    return *_rss_peak_bytes(fn), method


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Measured device-memory bandwidth in bytes/s: a copy of ``nbytes`` reads and writes them."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    timing = time_call(lambda: dst.copy_(src), device, min_repeats=5, max_repeats=30, budget_s=1.0)
    return 2 * nbytes / (min(timing.times_ms) * 1e-3)


def matmul_flops(device: torch.device, size: int, dtype: torch.dtype) -> float:
    """Measured matrix-product throughput in FLOP/s for a ``size``-cubed product in ``dtype``."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)
    timing = time_call(lambda: torch.mm(a, b), device, min_repeats=3, max_repeats=20, budget_s=1.5)
    return 2 * size**3 / (min(timing.times_ms) * 1e-3)
