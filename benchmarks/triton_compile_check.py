"""Compile every Triton kernel of rlgaf_fast for an NVIDIA GPU target, on a machine without one.

Triton compiles ahead of time without a device: Python AST -> TTIR -> TTGIR -> LLVM IR -> PTX ->
cubin (ptxas, shipped in the triton wheel). This script drives the real launchers in kernels/
with small CPU tensors, with the launch replaced by compilation for the target, so each kernel
is compiled with the GPU configuration (block sizes, warps, the PTX logarithm) and the argument
types of a real launch, for every dtype the ops accept. It catches what the interpreter cannot:
code that the compiler rejects, and the size of each kernel (registers are known only at load
time, on a GPU; shared memory and spills in the PTX are reported here).

    python benchmarks/triton_compile_check.py [--arch 90]

Exits 1 if any kernel fails to compile. Not a test of results: run the GPU tests for those.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
import traceback

os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class CompileOnlyDriver:
    """Stands in for the CUDA driver: names the target; nothing is ever launched."""

    def __init__(self, arch: int) -> None:
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


def compile_instead_of_launch(compiled: list) -> None:
    run = JITFunction.run

    def compile_without_launch(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.fn.__name__, kernel))
        return kernel

    JITFunction.run = compile_without_launch


def use_gpu_configuration() -> None:
    """The launchers pick interpreter-sized blocks for CPU tensors; make them pick the GPU's."""
    from rlgaf_fast.kernels import launch
    from rlgaf_fast.kernels import ppo_loss as pl

    launch.on_gpu = lambda t: True
    launch.ptx_log = lambda t: True
    launch.sm_count = lambda device_index: 132
    launch.result_buffer = lambda shape, dtype, device: torch.empty(
        shape, dtype=dtype, device=device
    )
    block = pl._block
    pl._block = lambda V, on_gpu: block(V, True)


def cases():
    """(name, thunk) for each launcher call: every kernel, each dtype and specialisation."""
    from rlgaf_fast.kernels import gumbel_softmax as gs
    from rlgaf_fast.kernels import gumbel_softmax_embedding as gse
    from rlgaf_fast.kernels import ppo_loss as pl

    # A small and a large vocabulary and width: the launchers' block sizes and warps follow them.
    sizes = [(8, 1000, 64), (4, 151936, 4096)]
    pairs = [(dtype, dtype) for dtype in DTYPES] + [(torch.float32, torch.bfloat16)]
    for (N, V, D), (logits_dtype, weight_dtype) in itertools.product(sizes, pairs):
        x = torch.randn(N, V).to(logits_dtype)
        w = torch.randn(V, D).to(weight_dtype)
        name = f"V={V} D={D} {str(logits_dtype).removeprefix('torch.')}"
        if weight_dtype != logits_dtype:
            name += f" weight {str(weight_dtype).removeprefix('torch.')}"
        else:
            for hard in (False, True):
                yield (
                    f"gumbel_softmax_fwd {name} hard={hard}",
                    lambda x=x, hard=hard: gs.gumbel_softmax_fwd(x, 0.7, hard, 3),
                )
            yield f"gumbel_softmax_bwd {name}", lambda x=x: gs.gumbel_softmax_bwd(x, x, 0.7)
            yield (
                f"gumbel_softmax_bwd_from_logits {name}",
                lambda x=x: gs.gumbel_softmax_bwd_from_logits(x, x, 0.7, 3),
            )
        yield f"gumbel_softmax_embedding fwd+bwd {name}", lambda x=x, w=w: _embedding(gse, x, w)
        if weight_dtype != logits_dtype:
            continue
        actions = torch.randint(V, (N,))
        z = torch.zeros(N, dtype=torch.float64 if logits_dtype == torch.float64 else torch.float32)
        yield f"ppo_loss_fwd {name}", lambda x=x, a=actions: pl.ppo_loss_fwd(x, a, 1.0)
        for kl, dual_clip, entropy in ((0, 0.0, 0.0), (3, 3.0, 0.01)):
            yield (
                (
                    f"ppo_loss_fwd_grad {name} kl_estimator={kl} dual_clip={dual_clip} "
                    f"entropy_coef={entropy}"
                ),
                lambda x=x, a=actions, z=z, k=kl, c=dual_clip, e=entropy: pl.ppo_loss_fwd_grad(
                    x,
                    a,
                    z,
                    z,
                    z if k else None,
                    z + 1,
                    0.8,
                    1.2,
                    c,
                    0.1 if k else 0.0,
                    k,
                    e,
                    1.0,
                    torch.empty_like(x),
                ),
            )


def _embedding(gse, x, w):
    out, _, lse = gse.gumbel_softmax_embedding_fwd(x, w, 0.7, 3)
    return gse.gumbel_softmax_embedding_bwd(torch.randn_like(out), x, w, out, lse, 0.7, 3, True)


def compile_only(arch: int) -> list:
    """Make every Triton launch in this process compile for sm_<arch> instead of running, with
    the launchers' GPU configuration. Returns the list that collects (kernel name, compiled
    kernel) per launch; the process cannot launch kernels afterwards."""
    driver.set_active(CompileOnlyDriver(arch))
    compiled: list = []
    compile_instead_of_launch(compiled)
    use_gpu_configuration()
    return compiled


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100)")
    args = parser.parse_args()
    compiled = compile_only(args.arch)
    print(f"triton {triton.__version__}, torch {torch.__version__}, target sm_{args.arch}")
    failures = 0
    for name, thunk in cases():
        start, before = time.perf_counter(), len(compiled)
        try:
            thunk()
        except Exception:  # noqa: BLE001 - report every failure, then exit 1
            failures += 1
            print(f"FAIL {name}\n{traceback.format_exc()}")
            continue
        missing = [
            kernel_name for kernel_name, kernel in compiled[before:] if not kernel.asm.get("cubin")
        ]
        if missing or len(compiled) == before:
            failures += 1
            print(f"FAIL {name}: no cubin for {missing or 'any kernel'}")
            continue
        kernels = ", ".join(
            f"{kernel_name} (shared {kernel.metadata.shared} B, {kernel.metadata.num_warps} warps)"
            for kernel_name, kernel in compiled[before:]
        )
        print(f"ok   {name}: {kernels} [{time.perf_counter() - start:.1f} s]")
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
