"""Triton kernels of the Gumbel-Softmax rows (forward, backward, backward from the logits), the
device helpers they share with the fused embedding (kernels/gumbel_softmax_embedding.py), and
their launchers.

Contract (shared with the cpp backend): inputs are 2-D and contiguous, logits [N, V];
z = (x + g) / tau with g the Gumbel noise of rlgaf_fast.reference (Philox keyed by seed, row,
column), arithmetic in float32 (float64 for float64 logits).

Row kernels give each row to one program (a persistent grid) that loops over vocabulary blocks
twice. The noise (Philox-10 and two logarithms per element, the kernels' arithmetic bottleneck)
is evaluated once per element and direction: the first loop stages exp(z - the block's max) in
the output with an online row max / sum, and the second rescales the staged values in place,
reading only memory.

1 / tau enters as two float32 numbers (hi + lo): a kernel scalar argument is float32, and the
float64 path needs 1 / tau to double precision (hi + lo carries it to about 2^-48).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch
from .launch import on_tensor_device
from .philox import gumbel_noise_row, gumbel_noise_tile

# ----------------------------------------------------------------------------------------------
# Device helpers (z_tile, scale_by_inv_tau, shift_of and online_merge serve the embedding kernels
# too)
# ----------------------------------------------------------------------------------------------


@triton.jit
def scale_by_inv_tau(v, inv_tau_hi, inv_tau_lo, FP64: tl.constexpr):
    """v / tau, with 1 / tau = inv_tau_hi + inv_tau_lo (the low part only matters in float64)."""
    if FP64:
        inv_tau = tl.full([], inv_tau_hi, tl.float64) + tl.full([], inv_tau_lo, tl.float64)
        return v * inv_tau
    else:
        return v * inv_tau_hi


@triton.jit
def _z_of(x, g, mask, inv_tau_hi, inv_tau_lo, FP64: tl.constexpr):
    """z = (x + g) / tau in the compute dtype; -inf where masked."""
    if FP64:
        xg = x.to(tl.float64) + g.to(tl.float64)
    else:
        xg = x.to(tl.float32) + g
    z = scale_by_inv_tau(xg, inv_tau_hi, inv_tau_lo, FP64)
    return tl.where(mask, z, float("-inf"))


@triton.jit
def _z_row(
    x_row,
    row,
    col_start,
    mask,
    seed,
    inv_tau_hi,
    inv_tau_lo,
    BLOCK: tl.constexpr,
    FP64: tl.constexpr,
    PTX_LOG: tl.constexpr,
    EVICT: tl.constexpr,
):
    """z = (x + g) / tau of columns col_start + arange(BLOCK) of one row; -inf where masked."""
    cols = col_start + tl.arange(0, BLOCK)
    x = tl.load(x_row + cols, mask=mask, other=0.0, eviction_policy=EVICT)
    g = gumbel_noise_row(seed, row, col_start, BLOCK, PTX_LOG)
    return _z_of(x, g, mask, inv_tau_hi, inv_tau_lo, FP64)


@triton.jit
def z_tile(
    x_ptr,
    rows,
    col_start,
    mask,
    V,
    seed,
    inv_tau_hi,
    inv_tau_lo,
    BLOCK_V: tl.constexpr,
    FP64: tl.constexpr,
    PTX_LOG: tl.constexpr,
):
    """z of the tile rows [BLOCK_N] (int64) x columns col_start + arange(BLOCK_V) (col_start a
    multiple of 4); -inf where masked."""
    cols = col_start + tl.arange(0, BLOCK_V)
    x = tl.load(x_ptr + rows[:, None] * V + cols[None, :], mask=mask, other=0.0)
    g = gumbel_noise_tile(seed, rows, col_start, BLOCK_V, PTX_LOG)
    return _z_of(x, g, mask, inv_tau_hi, inv_tau_lo, FP64)


# ----------------------------------------------------------------------------------------------
# Kernels. The seed is not specialised on: it changes every call. The row kernels are
# persistent (a grid of a few programs per SM looping over rows); their second pass walks the
# row last block first, so that it starts on the blocks the first pass left in L2.
# ----------------------------------------------------------------------------------------------


@triton.jit
def shift_of(m):
    """The shift of values whose max is m: 0 where m is -inf, so that exp(z - shift) never
    evaluates -inf - (-inf)."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def online_merge(m, s, part_max, part_sum):
    """Fold a part (its max, and its sum of exp(z - shift_of(part_max))) into the running max m
    and sum s = sum(exp(z - shift_of(m))); scalars or vectors alike. Returns the new (m, s) and
    the factors alpha, beta that took the old sums and the part's to the new shift. A part of
    -inf adds 0 however small m is (exp(0 - m) would overflow for m < -88)."""
    m_new = tl.maximum(m, part_max)
    shift = shift_of(m_new)
    alpha = tl.exp(m - shift)
    beta = tl.where(part_max == float("-inf"), 0.0, tl.exp(shift_of(part_max) - shift))
    return m_new, s * alpha + part_sum * beta, alpha, beta


@triton.jit(do_not_specialize=["seed"])
def _gumbel_softmax_fwd_kernel(
    x_ptr,
    y_ptr,
    index_ptr,
    block_max_ptr,
    N,
    V,
    seed,
    inv_tau_hi,
    inv_tau_lo,
    HARD: tl.constexpr,
    BLOCK: tl.constexpr,
    FP64: tl.constexpr,
    PTX_LOG: tl.constexpr,
):
    """One pass of the noise per row. Soft: each block's exp(z - block max) goes to y and its
    max to block_max [N, cdiv(V, BLOCK)]; the second pass rescales y in place by
    exp(block max - row max) / row sum (y <= the staged value, so a 16-bit y underflows no
    earlier than the final one would). Hard: the first pass finds the argmax, the second writes
    the one-hot (NaN where softmax(z) is NaN)."""
    dtype = tl.float64 if FP64 else tl.float32
    num_blocks = tl.cdiv(V, BLOCK)
    for row32 in range(tl.program_id(0), N, tl.num_programs(0)):
        row = tl.cast(row32, tl.int64)
        x_row = x_ptr + row * V
        y_row = y_ptr + row * V
        block_max_row = block_max_ptr + row * num_blocks
        m = tl.full([], float("-inf"), dtype)
        s = tl.full([], 0.0, dtype)
        best = tl.full([], float("-inf"), dtype)
        best_index = tl.full([], 0, tl.int32)
        nan_count = tl.full([], 0, tl.int32)
        for col_start in range(0, V, BLOCK):
            cols = col_start + tl.arange(0, BLOCK)
            mask = cols < V
            z = _z_row(
                x_row,
                row,
                col_start,
                mask,
                seed,
                inv_tau_hi,
                inv_tau_lo,
                BLOCK,
                FP64,
                PTX_LOG,
                "evict_first",
            )
            block_max, block_arg = tl.max(z, 0, return_indices=True)
            if HARD:
                nan_count += tl.sum((z != z).to(tl.int32), 0)
            else:
                e = tl.exp(z - shift_of(block_max))
                m, s, _, _ = online_merge(m, s, block_max, tl.sum(e, 0))
                # kept in L2 for the second pass
                tl.store(
                    y_row + cols,
                    e.to(y_ptr.dtype.element_ty),
                    mask=mask,
                    eviction_policy="evict_last",
                )
                tl.store(block_max_row + col_start // BLOCK, block_max)
            # strict > keeps the first maximum across blocks (argmax within a block breaks ties
            # left)
            better = block_max > best
            best_index = tl.where(better, col_start + block_arg, best_index)
            best = tl.where(better, block_max, best)
        tl.store(index_ptr + row, best_index.to(tl.int64))
        nan_row = (nan_count > 0) | (best == float("inf")) | (best == float("-inf"))
        if HARD:
            inv_s = 1.0
        else:
            inv_s = 1.0 / s
        # the second pass reads values other threads of the program staged: a CTA barrier
        # makes their global stores visible
        tl.debug_barrier()
        for i in range(num_blocks):
            block = num_blocks - 1 - i
            cols = block * BLOCK + tl.arange(0, BLOCK)
            mask = cols < V
            if HARD:
                y = tl.where(nan_row, float("nan"), tl.where(cols == best_index, 1.0, 0.0))
            else:
                # exp(-inf - m) = 0 for a block of -inf; NaN when the whole row is -inf (m too),
                # as torch's softmax
                scale = tl.exp(tl.load(block_max_row + block) - m) * inv_s
                e = tl.load(y_row + cols, mask=mask, other=0.0, eviction_policy="evict_first")
                y = e.to(dtype) * scale
            tl.store(y_row + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gumbel_softmax_bwd_kernel(
    grad_y_ptr,
    y_ptr,
    grad_x_ptr,
    N,
    V,
    inv_tau_hi,
    inv_tau_lo,
    BLOCK: tl.constexpr,
    FP64: tl.constexpr,
):
    dtype = tl.float64 if FP64 else tl.float32
    num_blocks = tl.cdiv(V, BLOCK)
    for row32 in range(tl.program_id(0), N, tl.num_programs(0)):
        offset = tl.cast(row32, tl.int64) * V
        dot = tl.full([], 0.0, dtype)
        for col_start in range(0, V, BLOCK):
            cols = col_start + tl.arange(0, BLOCK)
            mask = cols < V
            gy = tl.load(
                grad_y_ptr + offset + cols, mask=mask, other=0.0, eviction_policy="evict_last"
            )
            y = tl.load(y_ptr + offset + cols, mask=mask, other=0.0, eviction_policy="evict_last")
            dot += tl.sum(gy.to(dtype) * y.to(dtype), 0)
        for i in range(num_blocks):
            cols = (num_blocks - 1 - i) * BLOCK + tl.arange(0, BLOCK)
            mask = cols < V
            gy = tl.load(
                grad_y_ptr + offset + cols, mask=mask, other=0.0, eviction_policy="evict_first"
            )
            y = tl.load(y_ptr + offset + cols, mask=mask, other=0.0, eviction_policy="evict_first")
            gx = y.to(dtype) * (gy.to(dtype) - dot)
            gx = scale_by_inv_tau(gx, inv_tau_hi, inv_tau_lo, FP64)
            tl.store(grad_x_ptr + offset + cols, gx.to(grad_x_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed"])
def _gumbel_softmax_bwd_from_logits_kernel(
    grad_y_ptr,
    x_ptr,
    grad_x_ptr,
    block_max_ptr,
    N,
    V,
    seed,
    inv_tau_hi,
    inv_tau_lo,
    BLOCK: tl.constexpr,
    FP64: tl.constexpr,
    PTX_LOG: tl.constexpr,
):
    """One pass of the noise per row: each block's e = exp(z - block max) is staged in grad_x
    (and its max in block_max) while s = sum(exp(z - m)) and t = sum(gy * exp(z - m)) accumulate
    in the compute dtype, so sum(gy * y) = t / s carries no rounding of the staged e; the second
    pass turns e into y = e * exp(block max - m) / s and grad_x = y * (gy - t / s) / tau."""
    dtype = tl.float64 if FP64 else tl.float32
    num_blocks = tl.cdiv(V, BLOCK)
    for row32 in range(tl.program_id(0), N, tl.num_programs(0)):
        row = tl.cast(row32, tl.int64)
        x_row = x_ptr + row * V
        gy_row = grad_y_ptr + row * V
        gx_row = grad_x_ptr + row * V
        block_max_row = block_max_ptr + row * num_blocks
        m = tl.full([], float("-inf"), dtype)
        s = tl.full([], 0.0, dtype)
        t = tl.full([], 0.0, dtype)
        for col_start in range(0, V, BLOCK):
            cols = col_start + tl.arange(0, BLOCK)
            mask = cols < V
            z = _z_row(
                x_row,
                row,
                col_start,
                mask,
                seed,
                inv_tau_hi,
                inv_tau_lo,
                BLOCK,
                FP64,
                PTX_LOG,
                "evict_first",
            )
            gy = tl.load(gy_row + cols, mask=mask, other=0.0, eviction_policy="evict_last")
            block_max = tl.max(z, 0)
            e = tl.exp(z - shift_of(block_max))
            m, s, alpha, beta = online_merge(m, s, block_max, tl.sum(e, 0))
            t = t * alpha + tl.sum(gy.to(dtype) * e, 0) * beta
            tl.store(
                gx_row + cols,
                e.to(grad_x_ptr.dtype.element_ty),
                mask=mask,
                eviction_policy="evict_last",
            )
            tl.store(block_max_row + col_start // BLOCK, block_max)
        inv_s = 1.0 / s
        dot = t * inv_s
        tl.debug_barrier()  # as in the forward: the staged values of other threads
        for i in range(num_blocks):
            block = num_blocks - 1 - i
            cols = block * BLOCK + tl.arange(0, BLOCK)
            mask = cols < V
            scale = tl.exp(tl.load(block_max_row + block) - m) * inv_s
            e = tl.load(gx_row + cols, mask=mask, other=0.0, eviction_policy="evict_first")
            gy = tl.load(gy_row + cols, mask=mask, other=0.0, eviction_policy="evict_first")
            y = e.to(dtype) * scale
            gx = scale_by_inv_tau(y * (gy.to(dtype) - dot), inv_tau_hi, inv_tau_lo, FP64)
            tl.store(gx_row + cols, gx.to(grad_x_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------

# Per-row kernels on a GPU: (largest BLOCK, num_warps at that BLOCK, programs per SM). "noise"
# kernels (fwd, bwd_from_logits) make the noise, "stream" (bwd) only reads memory. Measured on
# an H200 at [8192, 128256] bf16 (triton 3.6) with the earlier kernels, which made the noise in
# both passes: noise (4096, 8, 2) beat (8192, 16, 1) and (4096, 4, 4); stream (4096, 8, 8) beat
# (4096, 8, 2) and (8192, 16, 1). The staging kernels' second pass re-reads what the first
# wrote, so fewer rows in flight may now pay (L2 holds 50 MB; a bf16 row of 128256 is 250 KB):
# benchmarks/row_config_sweep.py measures the candidates.
GPU_ROW_CONFIG = {"noise": (4096, 8, 2), "stream": (4096, 8, 8)}
# Under the interpreter (CPU tensors): small blocks and 3 programs, so that the tests at small
# sizes still run the loops over blocks and over rows.
_INTERPRETER_BLOCK = 128
_INTERPRETER_PROGRAMS = 3


def row_launch(N: int, V: int, t: torch.Tensor, kind: str) -> tuple[int, int, int]:
    """(grid size, BLOCK, num_warps) of a persistent per-row kernel."""
    if not launch.on_gpu(t):
        block = min(_INTERPRETER_BLOCK, max(16, triton.next_power_of_2(V)))
        return min(N, _INTERPRETER_PROGRAMS), block, 4
    max_block, max_warps, per_sm = GPU_ROW_CONFIG[kind]
    block = min(max_block, max(16, triton.next_power_of_2(V)))
    # 16 elements per thread; smaller blocks get fewer warps and more programs per SM
    num_warps = max(1, min(max_warps, block // 512))
    per_sm = per_sm * max_warps // num_warps
    return min(N, launch.sm_count(t.device.index or 0) * per_sm), block, num_warps


def _block_max_buffer(N: int, V: int, block: int, logits: torch.Tensor) -> torch.Tensor:
    """The noise pass's per-block maxima [N, cdiv(V, block)] in the compute dtype."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return torch.empty((N, triton.cdiv(V, block)), dtype=dtype, device=logits.device)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


@on_tensor_device
def gumbel_softmax_fwd(
    logits: torch.Tensor, tau: float, hard: bool, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gumbel-Softmax sample of each row.

    logits [N, V] float16/bfloat16/float32/float64, contiguous. Returns y [N, V] in the logits
    dtype (softmax(z), or the one-hot of argmax(z) if hard) and index [N] int64 = argmax(z).
    """
    launch.check_matrix("logits", logits)
    launch.check_tau_seed(tau, seed)
    N, V = logits.shape
    y = launch.result_buffer((N, V), logits.dtype, logits.device)
    index = torch.empty(N, dtype=torch.int64, device=logits.device)
    if N > 0 and V > 0:
        grid, block, num_warps = row_launch(N, V, logits, "noise")
        inv_hi, inv_lo = launch.inv_tau_parts(tau)
        _gumbel_softmax_fwd_kernel[(grid,)](
            logits,
            y,
            index,
            _block_max_buffer(N, V, block, logits),
            N,
            V,
            seed,
            inv_hi,
            inv_lo,
            HARD=bool(hard),
            BLOCK=block,
            FP64=logits.dtype == torch.float64,
            PTX_LOG=launch.ptx_log(logits),
            num_warps=num_warps,
        )
    return y.to(logits.dtype), index


@on_tensor_device
def gumbel_softmax_bwd(grad_y: torch.Tensor, y: torch.Tensor, tau: float) -> torch.Tensor:
    """grad_logits = y * (grad_y - sum_v(grad_y * y)) / tau per row.

    grad_y, y [N, V] contiguous (y: the soft probabilities). Returns grad_logits [N, V] in y's
    dtype.
    """
    launch.check_matrix("grad_y", grad_y)
    launch.check_matrix("y", y)
    launch.check_same_device(grad_y=grad_y, y=y)
    launch.check_tau_seed(tau)
    if grad_y.shape != y.shape:
        raise ValueError(f"grad_y must have y's shape {tuple(y.shape)}, got {tuple(grad_y.shape)}")
    N, V = y.shape
    grad_x = launch.result_buffer((N, V), y.dtype, y.device)
    if N > 0 and V > 0:
        grid, block, num_warps = row_launch(N, V, y, "stream")
        inv_hi, inv_lo = launch.inv_tau_parts(tau)
        _gumbel_softmax_bwd_kernel[(grid,)](
            grad_y,
            y,
            grad_x,
            N,
            V,
            inv_hi,
            inv_lo,
            BLOCK=block,
            FP64=y.dtype == torch.float64,
            num_warps=num_warps,
        )
    return grad_x.to(y.dtype)


@on_tensor_device
def gumbel_softmax_bwd_from_logits(
    grad_y: torch.Tensor, logits: torch.Tensor, tau: float, seed: int
) -> torch.Tensor:
    """Backward of the soft sample, recomputing y = softmax(z) from logits and seed.

    grad_y, logits [N, V] contiguous. Returns grad_logits [N, V] in the logits dtype.
    """
    launch.check_matrix("grad_y", grad_y)
    launch.check_matrix("logits", logits)
    launch.check_same_device(grad_y=grad_y, logits=logits)
    launch.check_tau_seed(tau, seed)
    if grad_y.shape != logits.shape:
        raise ValueError(
            f"grad_y must have logits' shape {tuple(logits.shape)}, got {tuple(grad_y.shape)}"
        )
    N, V = logits.shape
    grad_x = launch.result_buffer((N, V), logits.dtype, logits.device)
    if N > 0 and V > 0:
        grid, block, num_warps = row_launch(N, V, logits, "noise")
        inv_hi, inv_lo = launch.inv_tau_parts(tau)
        _gumbel_softmax_bwd_from_logits_kernel[(grid,)](
            grad_y,
            logits,
            grad_x,
            _block_max_buffer(N, V, block, logits),
            N,
            V,
            seed,
            inv_hi,
            inv_lo,
            BLOCK=block,
            FP64=logits.dtype == torch.float64,
            PTX_LOG=launch.ptx_log(logits),
            num_warps=num_warps,
        )
    return grad_x.to(logits.dtype)
