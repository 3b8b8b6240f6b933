"""Self-check of the CUDA C++ Gumbel-Softmax kernels (the CUDA implementations of
torch.ops.rlgaf_fast_C.*) on a GPU.

Compares every op of csrc/cuda/*.cu with rlgaf_fast/reference.py on random inputs
(float32, bfloat16 and a few float16 / float64 / mixed cases; V = 1, 7, 4099, 32000, 151936;
N = 0; misaligned rows), prints one line per check and exits non-zero on any mismatch.

    python benchmarks/cuda_selfcheck.py            # uses the installed extension if it has the ops
    python benchmarks/cuda_selfcheck.py --build    # always compiles csrc/ops.cpp and csrc/cuda/*.cu

The ops come from `import rlgaf_fast` when the installed extension registers them; otherwise the
schemas (csrc/ops.cpp) and the .cu files are compiled with torch.utils.cpp_extension.load (about
a minute).
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch

ROOT = Path(__file__).resolve().parents[1]
# the operators' schemas, then their CUDA implementations
SOURCES = [ROOT / "csrc" / "ops.cpp", *sorted((ROOT / "csrc" / "cuda").glob("*.cu"))]
SEED = 2**40 + 12345  # exercises both words of the Philox key
TAU = 0.7


def load_reference() -> ModuleType:
    """rlgaf_fast/reference.py loaded from this source tree by path: importing the package could
    load an installed extension that registers the same ops as a --build copy."""
    path = ROOT / "rlgaf_fast" / "reference.py"
    if not path.exists():
        from rlgaf_fast import reference

        return reference
    spec = importlib.util.spec_from_file_location("rlgaf_fast_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def has_cuda_ops() -> bool:
    """Whether the operators exist with a CUDA kernel (a CPU-only build declares them too)."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(
            "rlgaf_fast_C::gumbel_softmax_fwd", "CUDA"
        )
    except RuntimeError:  # the operator is not declared yet
        return False


def load_cuda_ops(build: bool) -> str:
    """Registers the CUDA kernels of torch.ops.rlgaf_fast_C.*; returns where they came from."""
    if not build:
        for name in ("rlgaf_fast", "rlgaf_fast._C"):
            try:
                importlib.import_module(name)
            except ImportError as err:
                print(f"note: import {name} failed: {err}")
            if has_cuda_ops():
                return f"installed extension (import {name})"
    from torch.utils.cpp_extension import load

    build_dir = Path("/tmp/rlgaf_fast_cuda_selfcheck")
    build_dir.mkdir(parents=True, exist_ok=True)
    load(
        name="rlgaf_fast_cuda_selfcheck",
        sources=[str(source) for source in SOURCES],
        build_directory=str(build_dir),
        extra_cuda_cflags=["-O3", "-std=c++17"],  # as setup.py builds it
        is_python_module=False,
        verbose=False,
    )
    if not has_cuda_ops():
        raise RuntimeError("compiled the sources but rlgaf_fast_C has no CUDA kernels")
    return "compiled " + ", ".join(str(source.relative_to(ROOT)) for source in SOURCES)


class Checker:
    """Runs checks, prints one line each, counts failures."""

    def __init__(self) -> None:
        self.failures = 0
        self.count = 0

    def report(self, name: str, ok: bool, detail: str) -> None:
        self.count += 1
        self.failures += not ok
        print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}", flush=True)

    def close(
        self,
        name: str,
        got: torch.Tensor,
        want: torch.Tensor,
        rtol: float,
        atol_rel: float,
        scale: float | None = None,
    ):
        """|got - want| <= atol_rel * scale + rtol * |want| elementwise (in float64); scale defaults
        to max|want| (pass the size of the terms where want is a cancellation that may be 0)."""
        if got.shape != want.shape:
            self.report(name, False, f"shape {tuple(got.shape)} != {tuple(want.shape)}")
            return
        if got.numel() == 0:
            self.report(name, True, f"empty {tuple(got.shape)}")
            return
        g, w = got.double(), want.double()
        if scale is None:
            scale = w.abs().max().item()
        bound = atol_rel * max(scale, 1e-30) + rtol * w.abs()
        err = (g - w).abs()
        bad = ~(err <= bound)  # NaN counts as bad
        worst = (err / bound).nan_to_num(float("inf")).max().item()
        self.report(
            name,
            not bad.any().item(),
            f"max_abs_err={err.max().item():.3g} scale={scale:.3g} worst/bound={worst:.3g} "
            f"bad={int(bad.sum())}/{got.numel()}",
        )


def tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol relative to the largest expected value) for outputs stored in dtype."""
    return {
        torch.float64: (1e-5, 1e-8),
        torch.float32: (1e-4, 1e-5),
        torch.float16: (2e-3, 1e-4),
        torch.bfloat16: (1.6e-2, 1e-3),
    }[dtype]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def perturbed(ref: ModuleType, logits: torch.Tensor, tau: float, seed: int) -> torch.Tensor:
    """z = (x + g) / tau in the compute dtype, as the kernels compute it."""
    x = logits.to(compute_dtype(logits.dtype))
    g = ref.gumbel_noise(seed, x.shape[0], x.shape[1], x.device).to(x.dtype)
    return (x + g) / tau


def make_logits(n: int, v: int, dtype: torch.dtype, misaligned: bool = False) -> torch.Tensor:
    """Random logits [n, v] on the GPU; misaligned: contiguous, but data_ptr off by one element."""
    values = torch.randn(n, v, device="cuda") * 2
    if not misaligned:
        return values.to(dtype)
    storage = torch.empty(n * v + 1, device="cuda", dtype=dtype)
    out = storage[1:].view(n, v)
    out.copy_(values)
    return out


def check_argmax(chk: Checker, name: str, got: torch.Tensor, z: torch.Tensor) -> None:
    """got must be an argmax of each row of z; rows whose top two are within rounding pass."""
    if z.shape[0] == 0:
        chk.report(name, got.shape == (0,), f"empty, shape {tuple(got.shape)}")
        return
    want = z.argmax(dim=1)
    ok_range = bool(((got >= 0) & (got < z.shape[1])).all())
    if not ok_range:
        chk.report(name, False, "index out of range")
        return
    z_got = z.gather(1, got[:, None]).squeeze(1).double()
    z_want = z.gather(1, want[:, None]).squeeze(1).double()
    near_tie = (z_want - z_got).abs() <= 1e-5 * (1 + z_want.abs())
    mismatch = (got != want) & ~near_tie
    chk.report(
        name,
        not mismatch.any().item(),
        f"exact={int((got == want).sum())}/{got.numel()} bad={int(mismatch.sum())}",
    )


def check_softmax_ops(
    chk: Checker, ref: ModuleType, n: int, v: int, dtype: torch.dtype, misaligned: bool = False
) -> None:
    ops = torch.ops.rlgaf_fast_C
    tag = f"{str(dtype).replace('torch.', '')} N={n} V={v}{' misaligned' if misaligned else ''}"
    rtol, atol = tolerances(dtype)
    logits = make_logits(n, v, dtype, misaligned)
    cdt = compute_dtype(dtype)
    z = perturbed(ref, logits, TAU, SEED)

    y, index = ops.gumbel_softmax_fwd(logits, TAU, False, SEED)
    want = ref.gumbel_softmax(logits, TAU, False, seed=SEED)
    chk.close(f"fwd soft     {tag}", y, want, rtol, atol)
    check_argmax(chk, f"fwd index    {tag}", index, z)

    y_hard, index_hard = ops.gumbel_softmax_fwd(logits, TAU, True, SEED)
    one_hot = torch.zeros_like(y_hard)
    if n:
        one_hot.scatter_(1, index_hard[:, None], 1.0)
    chk.report(
        f"fwd hard     {tag}",
        torch.equal(y_hard, one_hot) and torch.equal(index_hard, index),
        "exact one-hot of the same index as the soft call",
    )

    grad_y = torch.randn(n, v, device="cuda").to(dtype)
    grad = ops.gumbel_softmax_bwd(grad_y, y, TAU)
    yd, gd = y.double(), grad_y.double()
    want = yd * (gd - (gd * yd).sum(1, keepdim=True)) / TAU
    chk.close(f"bwd          {tag}", grad, want, rtol, atol)

    grad = ops.gumbel_softmax_bwd_from_logits(grad_y, logits, TAU, SEED)
    y_soft = ref.gumbel_softmax(logits.to(cdt), TAU, False, seed=SEED).double()
    want = y_soft * (gd - (gd * y_soft).sum(1, keepdim=True)) / TAU
    chk.close(f"bwd(logits)  {tag}", grad, want, rtol, atol)


def check_embedding_ops(
    chk: Checker,
    ref: ModuleType,
    n: int,
    v: int,
    d: int,
    dtype: torch.dtype,
    weight_dtype: torch.dtype,
) -> None:
    ops = torch.ops.rlgaf_fast_C
    tag = (
        f"{str(dtype).replace('torch.', '')}/{str(weight_dtype).replace('torch.', '')} "
        f"N={n} V={v} D={d}"
    )
    logits = make_logits(n, v, dtype)
    weight = torch.randn(v, d, device="cuda").to(weight_dtype)
    cdt = compute_dtype(dtype)
    z = perturbed(ref, logits, TAU, SEED)
    y_soft = ref.gumbel_softmax(logits.to(cdt), TAU, False, seed=SEED).double()
    rtol, atol = tolerances(weight_dtype)
    atol = max(atol, 1e-4)  # fp32 sums over up to V terms: rounding grows like sqrt(V) * eps

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out, tokens, lse = ops.gumbel_softmax_embedding_fwd(logits, weight, TAU, SEED)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    allowed = sum(t.numel() * t.element_size() for t in (out, tokens, lse)) + 2**20
    chk.report(
        f"emb fwd mem  {tag}",
        extra <= allowed,
        f"extra={extra} bytes, outputs+1MiB={allowed} ([N,V] fp32={4 * n * v})",
    )

    chk.close(f"emb fwd out  {tag}", out, y_soft @ weight.double(), rtol, atol)
    check_argmax(chk, f"emb tokens   {tag}", tokens, z)
    want_lse = torch.logsumexp(z.double(), dim=1)
    lse_ok = lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    if lse_ok and n:
        lse_ok = bool(((lse.double() - want_lse).abs() <= 1e-5 * (1 + want_lse.abs())).all())
    chk.report(
        f"emb lse      {tag}",
        lse_ok,
        f"dtype={lse.dtype} max_abs_err="
        f"{(lse.double() - want_lse).abs().max().item() if n else 0:.3g}",
    )

    grad_out = torch.randn(n, d, device="cuda").to(weight_dtype)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    grad_logits, grad_weight = ops.gumbel_softmax_embedding_bwd(
        grad_out, logits, weight, out, lse, TAU, SEED, True
    )
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    allowed = (
        grad_logits.numel() * grad_logits.element_size()
        + grad_weight.numel() * grad_weight.element_size()
        + 3 * 8 * n * d
        + 2**20
    )
    chk.report(f"emb bwd mem  {tag}", extra <= allowed, f"extra={extra} bytes, allowed={allowed}")

    go, w = grad_out.double(), weight.double()
    row_dot = (go * out.double()).sum(1, keepdim=True)
    want_logits = y_soft * (go @ w.T - row_dot) / TAU
    # dy - row_dot cancels exactly for V = 1: measure errors against the size of the terms
    terms = y_soft * ((go @ w.T).abs() + row_dot.abs()) / TAU
    terms_scale = terms.max().item() if terms.numel() else 0.0
    want_weight = y_soft.T @ go
    l_rtol, l_atol = tolerances(dtype)
    chk.close(
        f"emb bwd dlog {tag}",
        grad_logits,
        want_logits,
        max(l_rtol, rtol),
        max(l_atol, atol),
        scale=terms_scale,
    )
    chk.close(f"emb bwd dW   {tag}", grad_weight, want_weight, rtol, atol)


def check_errors(chk: Checker) -> None:
    ops = torch.ops.rlgaf_fast_C
    cases = {
        "cpu logits": lambda: ops.gumbel_softmax_fwd(torch.randn(2, 3), 1.0, False, 0),
        "tau=0": lambda: ops.gumbel_softmax_fwd(torch.randn(2, 3, device="cuda"), 0.0, False, 0),
        "1-D logits": lambda: ops.gumbel_softmax_fwd(torch.randn(3, device="cuda"), 1.0, False, 0),
        "seed<0": lambda: ops.gumbel_softmax_fwd(torch.randn(2, 3, device="cuda"), 1.0, False, -1),
        "grad shape": lambda: ops.gumbel_softmax_bwd(
            torch.randn(2, 3, device="cuda"), torch.randn(2, 4, device="cuda"), 1.0
        ),
        "weight rows": lambda: ops.gumbel_softmax_embedding_fwd(
            torch.randn(2, 3, device="cuda"), torch.randn(4, 5, device="cuda"), 1.0, 0
        ),
    }
    for name, call in cases.items():
        try:
            call()
        except RuntimeError as err:
            chk.report(f"error        {name}", True, str(err).splitlines()[0][:100])
        else:
            chk.report(f"error        {name}", False, "no error raised")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", action="store_true", help="compile the .cu even if installed")
    args = parser.parse_args()
    faulthandler.enable()
    if not torch.cuda.is_available():
        print("cuda_selfcheck: no CUDA device; nothing to check")
        return 1
    origin = load_cuda_ops(args.build)
    print(f"device={torch.cuda.get_device_name()} torch={torch.__version__} ops from {origin}")
    ref = load_reference()
    torch.manual_seed(0)
    chk = Checker()

    f32, bf16, f16, f64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
    for dtype in (f32, bf16):
        for n, v in ((0, 5), (3, 1), (5, 7), (64, 32000), (16, 151936), (33, 4099)):
            check_softmax_ops(chk, ref, n, v, dtype)
        check_softmax_ops(chk, ref, 9, 32000, dtype, misaligned=True)
    check_softmax_ops(chk, ref, 17, 1000, f16)
    check_softmax_ops(chk, ref, 17, 1001, f64)

    for dtype in (f32, bf16):
        for n, v, d in ((0, 5, 8), (3, 1, 5), (5, 7, 3), (33, 32000, 130), (24, 151936, 72)):
            check_embedding_ops(chk, ref, n, v, d, dtype, dtype)
    check_embedding_ops(chk, ref, 19, 1003, 70, bf16, f32)
    check_embedding_ops(chk, ref, 19, 1003, 70, f16, f16)
    check_embedding_ops(chk, ref, 19, 1003, 70, f64, f64)
    check_errors(chk)

    print(f"cuda_selfcheck: {chk.count - chk.failures}/{chk.count} passed")
    return 1 if chk.failures else 0


if __name__ == "__main__":
    sys.exit(main())
