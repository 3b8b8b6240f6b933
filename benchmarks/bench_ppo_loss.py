"""Benchmark of the fused PPO losses against their goals (standalone script).

    python benchmarks/bench_ppo_loss.py [--quick] [--skip-linear] [--sweep] [--json PATH]

CPU (the goals of issue 3 on the 2-core development machine):
1. ppo_loss, logits [2048, 32000] float32, clipped loss with an entropy bonus, forward +
   backward: the eager reference, torch.compile of the reference, and the cpp backend (out of
   place and with inplace_grad=True). Goal: cpp >= 8x faster than eager and >= 3x faster than
   torch.compile; peak memory <= logits + gradient + O(N).
2. fused_linear_ppo_loss, N = 4096, H = 1024, V = 32000 float32, forward + backward to hidden
   and weight, against "logits = hidden @ weight.T, then the reference loss" in eager mode.
   Goal: <= 1/4 of eager's peak memory at <= 1.2x its time.
GPU (triton):
1. ppo_loss, logits [16384, 128256] bfloat16, forward + backward, against the time of a copy of
   the logits (the same bytes: read N*V, write N*V). Goal: >= 85% of the copy's bandwidth.
2. fused_linear_ppo_loss, N = 8192, H = 4096, V = 128256 bfloat16, against its three matrix
   products alone (goal: <= 1.15x) and eager's peak memory (goal: <= 1/5).
--sweep (GPU): kernel time for several (BLOCK, num_warps) of the Triton kernel.

Time: the median of several runs after warm-up (wall clock, CUDA synchronised), and beside it
the median CPU time of the process (all threads): on a machine shared with other work the wall
clock of each variant depends on the load, the CPU time much less.
Peak memory, CPU: the process's peak resident set (VmHWM in /proc/self/status, reset before the
measured step by writing 5 to /proc/self/clear_refs) minus the resident set before the step:
what the step allocates and touches beyond its inputs, the gradients it returns included,
whatever allocator made it (torch's CPU allocator keeps no statistics). GPU:
torch.cuda.max_memory_allocated() minus memory_allocated() before the step.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import rlgaf_fast  # noqa: E402
from rlgaf_fast import reference  # noqa: E402
from rlgaf_fast.ops.ppo_loss import fused_linear_ppo_loss, ppo_loss  # noqa: E402

OPTIONS = dict(clip_eps=0.2, entropy_coef=0.01)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_mib(step, device: torch.device, clear=None) -> float:
    """Peak memory a call of step() adds beyond what exists before it (after clear(), which
    drops the gradients of an earlier step), in MiB."""
    if clear is not None:
        clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current resident set
    before = _rss_kib("VmRSS")
    step()
    return (_rss_kib("VmHWM") - before) / 1024


# CPU time (all threads) of the last median_ms call: a measure of the work that other processes
# on a shared machine disturb less than the wall clock.
_last_cpu_ms: list[float] = [0.0]


def median_ms(step, device: torch.device, runs: int, warmup: int = 1, prepare=None) -> float:
    times, cpu_times = [], []
    for i in range(warmup + runs):
        if prepare is not None:
            prepare()
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        _sync(device)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
            cpu_times.append((time.process_time() - cpu_start) * 1e3)
    _last_cpu_ms[0] = statistics.median(cpu_times)
    return statistics.median(times)


def _fused_backends(device: torch.device) -> list[str]:
    return [b for b in rlgaf_fast.available_backends()
            if b == ("triton" if device.type == "cuda" else "cpp")]


def _tokens(N: int, V: int, device: torch.device, gen: torch.Generator):
    actions = torch.randint(0, V, (N,), generator=gen).to(device)
    old = (torch.randn(N, generator=gen) - 10).to(device)
    adv = torch.randn(N, generator=gen).to(device)
    return actions, old, adv


def _report(results: dict, title: str, name: str, ms: float, peak: float | None) -> None:
    cpu_ms = _last_cpu_ms[0]  # measured by the median_ms call that produced ms
    results[name] = {"ms": round(ms, 2), "cpu_ms": round(cpu_ms, 2)}
    line = f"{title}  {name:28s} {ms:10.2f} ms (cpu {cpu_ms:10.2f} ms)"
    if peak is not None:
        results[name]["peak_extra_mib"] = round(peak, 1)
        line += f"   peak +{peak:9.1f} MiB"
    print(line, flush=True)


def bench_ppo_loss(device: torch.device, runs: int) -> dict:
    on_gpu = device.type == "cuda"
    N, V, dtype = (16384, 128256, torch.bfloat16) if on_gpu else (2048, 32000, torch.float32)
    title = f"ppo_loss [{N}, {V}] {str(dtype)[6:]} fwd+bwd"
    gen = torch.Generator().manual_seed(0)
    master = torch.randn(N, V, generator=gen).to(device, dtype)
    actions, old, adv = _tokens(N, V, device, gen)
    x = master.clone().requires_grad_()
    results = {"logits_mib": round(master.numel() * master.element_size() / 2**20, 1)}

    def loss_step(fn):
        def step():
            x.grad = None
            fn(x, actions, old, adv, **OPTIONS).loss.backward()
        return step

    def clear():
        x.grad = None

    if on_gpu:  # the bandwidth yardstick: a copy reads and writes the same bytes as the op
        copy_out = torch.empty_like(master)
        ms = median_ms(lambda: copy_out.copy_(master), device, runs, warmup=3)
        del copy_out
        results["copy_GBps"] = round(2 * master.numel() * master.element_size() / ms / 1e6, 1)
        _report(results, title, "copy of the logits", ms, None)
    else:
        _report(results, title, "eager", median_ms(loss_step(reference.ppo_loss), device, runs),
                peak_extra_mib(loss_step(reference.ppo_loss), device, clear))
        compiled = loss_step(torch.compile(reference.ppo_loss))
        _report(results, title, "torch.compile", median_ms(compiled, device, runs, warmup=2),
                peak_extra_mib(compiled, device, clear))
    for name in _fused_backends(device):
        step = loss_step(lambda *a, _n=name, **k: ppo_loss(*a, **k, backend=_n))
        _report(results, title, name, median_ms(step, device, runs, warmup=2),
                peak_extra_mib(step, device, clear))
        inplace_x = master.clone().requires_grad_()

        def inplace_step(_n=name, _x=inplace_x):
            _x.grad = None
            ppo_loss(_x.view(N, V), actions, old, adv, **OPTIONS, backend=_n,
                     inplace_grad=True).loss.backward()

        def refill(_x=inplace_x):  # the step overwrote the logits with their gradient
            with torch.no_grad():
                _x.copy_(master)

        ms = median_ms(inplace_step, device, runs, warmup=2, prepare=refill)
        refill()
        inplace_x.grad = None
        _report(results, title, name + " inplace_grad", ms, peak_extra_mib(inplace_step, device))
        del inplace_x
    x.grad = None
    return results


def bench_fused_linear(device: torch.device, runs: int) -> dict:
    on_gpu = device.type == "cuda"
    N, H, V, dtype = (8192, 4096, 128256, torch.bfloat16) if on_gpu else (
        4096, 1024, 32000, torch.float32)
    title = f"fused_linear N={N} H={H} V={V} {str(dtype)[6:]} fwd+bwd"
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(N, H, generator=gen).to(device, dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=gen) / H**0.5).to(device, dtype).requires_grad_()
    actions, old, adv = _tokens(N, V, device, gen)
    results = {}

    def clear():
        hidden.grad = weight.grad = None

    def eager():
        clear()
        logits = hidden @ weight.t()
        reference.ppo_loss(logits, actions, old, adv, **OPTIONS).loss.backward()

    if on_gpu:
        h, w = hidden.detach(), weight.detach()
        g = torch.empty(N, V, device=device, dtype=dtype)
        products = []

        def three_products():
            products.clear()
            torch.mm(h, w.t(), out=g)
            products.extend([g @ w, g.t() @ h])

        _report(results, title, "its three matrix products", median_ms(three_products, device,
                                                                         runs), None)
        del g, products
    _report(results, title, "eager logits+reference", median_ms(eager, device, runs),
            peak_extra_mib(eager, device, clear))
    for name in _fused_backends(device):
        def unfused(_n=name):
            clear()
            logits = hidden @ weight.t()
            ppo_loss(logits, actions, old, adv, **OPTIONS, backend=_n).loss.backward()

        def fused(_n=name):
            clear()
            fused_linear_ppo_loss(hidden, weight, actions, old, adv, **OPTIONS,
                                  backend=_n).loss.backward()

        _report(results, title, f"logits+{name} ppo_loss", median_ms(unfused, device, runs),
                peak_extra_mib(unfused, device, clear))
        _report(results, title, f"fused_linear {name}", median_ms(fused, device, runs),
                peak_extra_mib(fused, device, clear))
    clear()
    return results


def sweep_triton(device: torch.device, runs: int) -> dict:
    """Kernel-only time of the Triton forward+gradient for several (BLOCK, num_warps)."""
    from rlgaf_fast._backend import triton_module

    kernels = triton_module("ppo_loss")
    N, V = 16384, 128256
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(N, V, generator=gen).to(device, torch.bfloat16)
    actions, old, adv = _tokens(N, V, device, gen)
    weight = torch.full((N,), 1.0 / N, device=device)
    params = torch.tensor([1.0, 0.8, 1.2, 0.0, 0.0, 0.01], device=device)
    grad = torch.empty_like(x)
    copy_ms = median_ms(lambda: grad.copy_(x), device, runs, warmup=3)
    results = {"copy": round(copy_ms, 3)}
    print(f"sweep [{N}, {V}] bf16: copy {copy_ms:.3f} ms", flush=True)
    for block in (1024, 2048, 4096, 8192):
        for num_warps in (4, 8, 16, 32):
            if block // (32 * num_warps) < 2:
                continue

            def step(_c=(block, num_warps)):
                kernels._launch(x, actions, old, adv, None, weight, params, grad, 0, False, True,
                                config=_c)

            ms = median_ms(step, device, runs, warmup=2)
            results[f"{block}x{num_warps}"] = round(ms, 3)
            print(f"  BLOCK={block:5d} num_warps={num_warps:2d}: {ms:.3f} ms "
                  f"({copy_ms / ms:.0%} of the copy's bandwidth)", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 runs instead of 7")
    parser.add_argument("--skip-linear", action="store_true", help="only the logits benchmark")
    parser.add_argument("--sweep", action="store_true", help="Triton block/warps sweep (GPU)")
    parser.add_argument("--json", help="write the results there")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    runs = 3 if args.quick else 7
    info = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else (
            platform.processor() or platform.machine()),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    print(info, flush=True)
    results = {"info": info}
    if args.sweep and device.type == "cuda":
        results["sweep"] = sweep_triton(device, runs)
    results["ppo_loss"] = bench_ppo_loss(device, runs)
    if not args.skip_linear:
        results["fused_linear_ppo_loss"] = bench_fused_linear(device, max(3, runs // 2))
    results["info"]["load_average_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)


if __name__ == "__main__":
    main()
