"""The Gumbel noise of every backend against rlgaf_fast.reference.gumbel_noise, value by value.

The kernels make the noise inside their loops and never return it, so it is read back without
rounding it away:

- Triton: the device helpers of kernels/philox.py that every Triton kernel calls
  (gumbel_noise_row, gumbel_noise_tile) run in a small kernel here that stores what they return.
- Every backend, through its own kernels: with logits x = -g_ref (the reference's noise) and
  tau = 2^-20, a kernel's scores are z = (x + g) / tau = (g - g_ref) * 2^20, where x + g has a
  relative error of at most 2^-24 (none where g and g_ref are within a factor 2) and the division
  by a power of two is exact. Its softmax y = exp(z - lse(z)) then gives back
  g - g_ref = tau * (log y + lse(z)): y's rounding (a few 1e-7 relative, from the kernel's exp
  and division) becomes about 1e-7 * 2^-20 = 1e-13 in g, far below the 1e-6 checked. The fused
  embedding returns lse(z), so with the identity as embedding table its output gives the noise
  itself; the Gumbel-Softmax rows give it up to one constant per row (no output can show it: a
  softmax is unchanged by a shift of its row), taken out here as the row's median.

The noise is compared relative to max(|g|, 1): near g = 0, -log(u) is near 1 and its float32
rounding alone moves g by about 1e-7.
"""

import importlib.util
import os

import pytest
import torch

import rlgaf_fast
from rlgaf_fast import reference
from rlgaf_fast._backend import kernel_module
from tests.conftest import fused_backends

BACKENDS = fused_backends()
TAU = 2.0**-20
REL = 1e-6
SEED = 2**40 + 12345  # a key using both 32-bit words
HAS_TRITON = importlib.util.find_spec("triton") is not None


def _interpreted(backend: str) -> bool:
    return backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"


def _device(backend: str) -> str:
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def _relative_error(g: torch.Tensor, g_ref: torch.Tensor) -> float:
    """max |g - g_ref| / max(|g_ref|, 1); NaN and inf count as infinitely wrong."""
    err = (g.double().cpu() - g_ref.double()).abs() / g_ref.double().abs().clamp(min=1)
    return float(torch.where(err.isfinite(), err, torch.inf).max())


def _cancelling_logits(rows: int, cols: int, dtype: torch.dtype, backend: str) -> torch.Tensor:
    """-g_ref: logits whose sum with a backend's noise is that noise's error."""
    return (-reference.gumbel_noise(SEED, rows, cols)).to(_device(backend), dtype)


# --- every backend, through its kernels -------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", *BACKENDS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_noise_of_the_gumbel_softmax_rows_equals_reference(backend, dtype):
    # Widths not a multiple of 4 or of a block; compiled kernels get rows long enough to span
    # several of the C++ kernels' 2048-column noise chunks. A quarter of the samples have
    # u >= 0.75, where the Triton noise takes its polynomial branch.
    rows, cols = (5, 301) if _interpreted(backend) else (3, 4501)
    g_ref = reference.gumbel_noise(SEED, rows, cols).double()
    y = rlgaf_fast.gumbel_softmax(
        _cancelling_logits(rows, cols, dtype, backend), TAU, seed=SEED, backend=backend
    )
    error = TAU * y.double().cpu().log()  # g - g_ref less a constant per row
    error = error - error.median(dim=-1, keepdim=True).values
    assert _relative_error(g_ref + error, g_ref) <= REL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_noise_of_the_fused_embedding_equals_reference(backend, dtype):
    # the C++ kernels take the vocabulary in blocks of 512 columns, the Triton interpreter 128
    rows, cols = (5, 157) if _interpreted(backend) else (5, 1101)
    g_ref = reference.gumbel_noise(SEED, rows, cols).double()
    logits = _cancelling_logits(rows, cols, dtype, backend)
    identity = torch.eye(cols, dtype=dtype, device=logits.device)
    y, _, lse = kernel_module("gumbel_softmax_embedding", backend).gumbel_softmax_embedding_fwd(
        logits, identity, TAU, SEED
    )
    error = TAU * (y.double().cpu().log() + lse.double().cpu()[:, None])  # g - g_ref
    assert _relative_error(g_ref + error, g_ref) <= REL


# --- the Triton noise helpers, directly -------------------------------------------------------

if HAS_TRITON:
    import triton
    import triton.language as tl

    from rlgaf_fast.kernels.launch import ptx_log
    from rlgaf_fast.kernels.philox import gumbel_noise_row, gumbel_noise_tile

    @triton.jit
    def _noise_rows_kernel(out_ptr, V, seed, first_row, BLOCK: tl.constexpr, PTX_LOG: tl.constexpr):
        r = tl.program_id(0)
        row = first_row + r.to(tl.int64)
        for col_start in range(0, V, BLOCK):
            cols = col_start + tl.arange(0, BLOCK)
            g = gumbel_noise_row(seed, row, col_start, BLOCK, PTX_LOG)
            tl.store(out_ptr + r * V + cols, g, mask=cols < V)

    @triton.jit
    def _noise_tiles_kernel(
        out_ptr,
        N,
        V,
        seed,
        first_row,
        ROWS: tl.constexpr,
        BLOCK: tl.constexpr,
        PTX_LOG: tl.constexpr,
    ):
        r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        for col_start in range(0, V, BLOCK):
            cols = col_start + tl.arange(0, BLOCK)
            g = gumbel_noise_tile(seed, first_row + r.to(tl.int64), col_start, BLOCK, PTX_LOG)
            mask = (r[:, None] < N) & (cols[None, :] < V)
            tl.store(out_ptr + r[:, None] * V + cols[None, :], g, mask=mask)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("helper", ["row", "tile"])
def test_triton_noise_helpers_equal_reference(helper):
    # rows on both sides of 2^32 (the counter's second and third words)
    rows, cols, first_row = 6, 1001, 2**32 - 3
    device = _device("triton")
    out = torch.full((rows, cols), float("nan"), device=device)
    use_ptx = ptx_log(out)
    if helper == "row":
        _noise_rows_kernel[(rows,)](out, cols, SEED, first_row, BLOCK=256, PTX_LOG=use_ptx)
    else:
        _noise_tiles_kernel[(triton.cdiv(rows, 4),)](
            out, rows, cols, SEED, first_row, ROWS=4, BLOCK=128, PTX_LOG=use_ptx
        )
    g_ref = reference.gumbel_noise(SEED, rows, cols, first_row=first_row)
    assert _relative_error(out, g_ref) <= REL
