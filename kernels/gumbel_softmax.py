"""Triton kernels of the Gumbel-Softmax family and their launchers.

Contract (shared with the cpp and cuda backends): inputs are 2-D and contiguous, logits [N, V],
weight [V, D]; z = (x + g) / tau with g the Gumbel noise of rlgaf_fast.reference (Philox keyed
by seed, row, column), arithmetic in float32 (float64 for float64 logits).

Row kernels (fwd, bwd, bwd_from_logits, the embedding statistics) give each row to one program
(a persistent grid) that loops over vocabulary blocks with an online max / sum, then loops again
to write, regenerating the noise (the forward is bound by the noise arithmetic: Philox-10 and
two logarithms per element, twice).

The embedding never holds all [N, V] probabilities p = exp(z - lse): it regenerates them from
the seed a vocabulary chunk at a time into a workspace of O(N * D) elements (_chunk_width).
Forward: the row statistics (one pass of the noise), then per chunk the probabilities (a second
pass, in all) and a Triton product kernel for p @ weight[chunk], split over the chunk's columns
when N x D has few output tiles, whose partial sums (float32, float64 where an input is) add to
out. Backward: grad_logits per [BLOCK_N, BLOCK_V] tile with a K-loop over D (a third pass), then
per chunk the probabilities again (a fourth) and grad_weight[chunk] = p^T @ grad_out by torch
(cuBLAS on a GPU, so torch's matmul settings apply to it as to eager's: TF32 under
set_float32_matmul_precision("high")). An earlier design regenerated the noise inside the
products, once per D tile (18 passes at D = 2048), and was 8 times slower than eager on an H200.

1 / tau enters as two float32 numbers (hi + lo): a kernel scalar argument is float32, and the
float64 path needs 1 / tau to double precision (hi + lo carries it to about 2^-48).
"""

from __future__ import annotations

import functools
import struct

import torch
import triton
import triton.language as tl

from .launch import on_tensor_device
from .philox import gumbel_noise_row, gumbel_noise_tile

# ----------------------------------------------------------------------------------------------
# Shared device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _scale_by_inv_tau(v, inv_tau_hi, inv_tau_lo, FP64: tl.constexpr):
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
    z = _scale_by_inv_tau(xg, inv_tau_hi, inv_tau_lo, FP64)
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
def _z_tile(
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


@triton.jit
def _row_stats(
    x_row,
    row,
    V,
    seed,
    inv_tau_hi,
    inv_tau_lo,
    NEED_SUM: tl.constexpr,
    BLOCK: tl.constexpr,
    FP64: tl.constexpr,
    PTX_LOG: tl.constexpr,
):
    """Online max m, sum s = sum(exp(z - m)) (only if NEED_SUM), first argmax of z of a row and,
    without NEED_SUM (the hard sample), whether softmax(z) is NaN as torch computes it: the row
    holds a NaN or its largest score is infinite (inf - inf, or a row of -inf).

    m is returned as the shift used in s: 0 instead of -inf when the whole row is -inf, so that
    exp(z - m) never evaluates -inf - (-inf).
    """
    dtype = tl.float64 if FP64 else tl.float32
    m = tl.full([], float("-inf"), dtype)
    s = tl.full([], 0.0, dtype)
    best = tl.full([], float("-inf"), dtype)
    best_index = tl.full([], 0, tl.int32)
    nan_count = tl.full([], 0, tl.int32)
    for col_start in range(0, V, BLOCK):
        mask = col_start + tl.arange(0, BLOCK) < V
        # keep the row in L2 for the second pass
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
            "evict_last",
        )
        block_max, block_arg = tl.max(z, 0, return_indices=True)
        if NEED_SUM:
            m_new = tl.maximum(m, block_max)
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - shift) + tl.sum(tl.exp(z - shift), 0)
            m = m_new
        else:
            nan_count += tl.sum((z != z).to(tl.int32), 0)
        # strict > keeps the first maximum across blocks (argmax within a block breaks ties left)
        better = block_max > best
        best_index = tl.where(better, col_start + block_arg, best_index)
        best = tl.where(better, block_max, best)
    shift = tl.where(m == float("-inf"), 0.0, m)
    nan_row = (nan_count > 0) | (best == float("inf")) | (best == float("-inf"))
    return shift, s, best_index, nan_row


# ----------------------------------------------------------------------------------------------
# Kernels. The seed is not specialised on: it changes every call. The row kernels are
# persistent (a grid of a few programs per SM looping over rows); their second pass walks the
# row last block first, so that it starts on the blocks the first pass left in L2.
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["seed"])
def _gumbel_softmax_fwd_kernel(
    x_ptr,
    y_ptr,
    index_ptr,
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
    num_blocks = tl.cdiv(V, BLOCK)
    for row32 in range(tl.program_id(0), N, tl.num_programs(0)):
        row = tl.cast(row32, tl.int64)
        x_row = x_ptr + row * V
        y_row = y_ptr + row * V
        shift, s, best_index, nan_row = _row_stats(
            x_row, row, V, seed, inv_tau_hi, inv_tau_lo, not HARD, BLOCK, FP64, PTX_LOG
        )
        tl.store(index_ptr + row, best_index.to(tl.int64))
        if HARD:
            inv_s = 1.0
        else:
            inv_s = 1.0 / s
        for i in range(num_blocks):
            col_start = (num_blocks - 1 - i) * BLOCK
            cols = col_start + tl.arange(0, BLOCK)
            mask = cols < V
            if HARD:
                y = tl.where(nan_row, float("nan"), tl.where(cols == best_index, 1.0, 0.0))
            else:
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
                y = tl.exp(z - shift) * inv_s
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
            gx = _scale_by_inv_tau(gx, inv_tau_hi, inv_tau_lo, FP64)
            tl.store(grad_x_ptr + offset + cols, gx.to(grad_x_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed"])
def _gumbel_softmax_bwd_from_logits_kernel(
    grad_y_ptr,
    x_ptr,
    grad_x_ptr,
    N,
    V,
    seed,
    inv_tau_hi,
    inv_tau_lo,
    BLOCK: tl.constexpr,
    FP64: tl.constexpr,
    PTX_LOG: tl.constexpr,
):
    dtype = tl.float64 if FP64 else tl.float32
    num_blocks = tl.cdiv(V, BLOCK)
    for row32 in range(tl.program_id(0), N, tl.num_programs(0)):
        row = tl.cast(row32, tl.int64)
        x_row = x_ptr + row * V
        gy_row = grad_y_ptr + row * V
        # one pass for max m, s = sum(exp(z - m)) and t = sum(gy * exp(z - m)), both rescaled
        # when m grows; then sum(gy * y) = t / s
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
                "evict_last",
            )
            gy = tl.load(gy_row + cols, mask=mask, other=0.0, eviction_policy="evict_last")
            m_new = tl.maximum(m, tl.max(z, 0))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - shift)
            p = tl.exp(z - shift)
            s = s * alpha + tl.sum(p, 0)
            t = t * alpha + tl.sum(gy.to(dtype) * p, 0)
            m = m_new
        shift = tl.where(m == float("-inf"), 0.0, m)
        inv_s = 1.0 / s
        dot = t * inv_s
        for i in range(num_blocks):
            col_start = (num_blocks - 1 - i) * BLOCK
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
            gy = tl.load(gy_row + cols, mask=mask, other=0.0, eviction_policy="evict_first")
            y = tl.exp(z - shift) * inv_s
            gx = _scale_by_inv_tau(y * (gy.to(dtype) - dot), inv_tau_hi, inv_tau_lo, FP64)
            tl.store(grad_x_ptr + row * V + cols, gx.to(grad_x_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed"])
def _row_lse_kernel(
    x_ptr,
    lse_ptr,
    index_ptr,
    N,
    V,
    seed,
    inv_tau_hi,
    inv_tau_lo,
    BLOCK: tl.constexpr,
    FP64: tl.constexpr,
    PTX_LOG: tl.constexpr,
):
    """lse = logsumexp(z) and argmax(z) of each row (first pass of the embedding forward)."""
    for row32 in range(tl.program_id(0), N, tl.num_programs(0)):
        row = tl.cast(row32, tl.int64)
        shift, s, best_index, _ = _row_stats(
            x_ptr + row * V, row, V, seed, inv_tau_hi, inv_tau_lo, True, BLOCK, FP64, PTX_LOG
        )
        tl.store(lse_ptr + row, shift + tl.log(s))
        tl.store(index_ptr + row, best_index.to(tl.int64))


@triton.jit(do_not_specialize=["seed"])
def _embedding_probs_kernel(
    x_ptr,
    w_ptr,
    lse_ptr,
    p_hi_ptr,
    p_lo_ptr,
    N,
    V,
    col_start,
    width,
    p_stride,
    seed,
    inv_tau_hi,
    inv_tau_lo,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    FP64: tl.constexpr,
    PTX_LOG: tl.constexpr,
    SPLIT_P: tl.constexpr,
):
    """p = exp(z - lse) of columns [col_start, col_start + width) into the [N, width] workspace
    (row stride p_stride), rounded to the weight's dtype. SPLIT_P (16-bit weight) also writes
    the remainder p - p_hi, rounded the same way."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    local = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < N
    mask = row_mask[:, None] & (local < width)[None, :]
    z = _z_tile(
        x_ptr,
        rows,
        col_start + tl.program_id(1) * BLOCK_V,
        mask,
        V,
        seed,
        inv_tau_hi,
        inv_tau_lo,
        BLOCK_V,
        FP64,
        PTX_LOG,
    )
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    p = tl.exp(z - lse[:, None])
    w_dtype = w_ptr.dtype.element_ty  # the rounding of the dot operands (the weight is not read)
    p_hi = p.to(w_dtype)
    offsets = rows[:, None] * p_stride + local[None, :]
    tl.store(p_hi_ptr + offsets, p_hi.to(p_hi_ptr.dtype.element_ty), mask=mask)
    if SPLIT_P:
        p_lo = (p - p_hi.to(p.dtype)).to(w_dtype)
        tl.store(p_lo_ptr + offsets, p_lo.to(p_lo_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _embedding_product_kernel(
    p_hi_ptr,
    p_lo_ptr,
    w_ptr,
    partial_ptr,
    N,
    K,
    D,
    p_stride,
    k_per_split,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC_FP64: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SPLIT_P: tl.constexpr,
):
    """partial[s, rows, d tile] = p_hi[rows, ks] @ w[ks, d tile] (+ p_lo @ w), ks the columns
    [s * k_per_split, (s + 1) * k_per_split) of one vocabulary chunk of K columns. The split
    over K (axis 2) keeps the GPU busy when N x D has few tiles (a batch of single tokens)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    dcols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    k_begin = tl.program_id(2) * k_per_split
    k_end = tl.minimum(K, k_begin + k_per_split)
    row_mask = rows < N
    d_mask = dcols < D
    # out_dtype explicit: triton 3.6 defaults it to float32 even for a float64 accumulator
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    acc = tl.zeros([BLOCK_N, BLOCK_D], acc_dtype)
    for k_start in range(k_begin, k_end, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)
        k_mask = ks < k_end
        w = tl.load(
            w_ptr + ks.to(tl.int64)[:, None] * D + dcols[None, :],
            mask=k_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        p_offsets = rows[:, None] * p_stride + ks[None, :]
        p_mask = row_mask[:, None] & k_mask[None, :]
        p_hi = tl.load(p_hi_ptr + p_offsets, mask=p_mask, other=0.0).to(w.dtype)
        acc = tl.dot(p_hi, w, acc, input_precision=DOT_PRECISION, out_dtype=acc_dtype)
        if SPLIT_P:
            # a 16-bit p would put its rounding into every entry of out, and the backward's
            # grad_out . out cancels against grad_out @ weight^T: the remainder's product makes
            # out float32-accurate with tensor-core dots
            p_lo = tl.load(p_lo_ptr + p_offsets, mask=p_mask, other=0.0).to(w.dtype)
            acc = tl.dot(p_lo, w, acc, input_precision=DOT_PRECISION, out_dtype=acc_dtype)
    partial = partial_ptr + tl.program_id(2).to(tl.int64) * N * D
    tl.store(
        partial + rows[:, None] * D + dcols[None, :],
        acc.to(partial_ptr.dtype.element_ty),
        mask=row_mask[:, None] & d_mask[None, :],
    )


@triton.jit(do_not_specialize=["seed"])
def _embedding_bwd_logits_kernel(
    grad_out_ptr,
    x_ptr,
    w_ptr,
    go_dot_out_ptr,
    lse_ptr,
    grad_x_ptr,
    N,
    V,
    D,
    seed,
    inv_tau_hi,
    inv_tau_lo,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    FP64: tl.constexpr,
    ACC_FP64: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PTX_LOG: tl.constexpr,
):
    """grad_logits tile = y * (grad_out @ weight^T - grad_out . out) / tau, y = exp(z - lse);
    grad_out . out per row comes computed (go_dot_out, the accumulation dtype)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_start = tl.program_id(1) * BLOCK_V
    cols = col_start + tl.arange(0, BLOCK_V)
    row_mask = rows < N
    v_mask = cols < V
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    dy = tl.zeros([BLOCK_N, BLOCK_V], acc_dtype)
    for d_start in range(0, D, BLOCK_D):
        dcols = d_start + tl.arange(0, BLOCK_D)
        d_mask = dcols < D
        nd_mask = row_mask[:, None] & d_mask[None, :]
        go = tl.load(grad_out_ptr + rows[:, None] * D + dcols[None, :], mask=nd_mask, other=0.0)
        w = tl.load(
            w_ptr + cols.to(tl.int64)[:, None] * D + dcols[None, :],
            mask=v_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        # go is exact in the weight's dtype: the public function returns out in that dtype
        dy = tl.dot(
            go.to(w.dtype), tl.trans(w), dy, input_precision=DOT_PRECISION, out_dtype=acc_dtype
        )
    mask = row_mask[:, None] & v_mask[None, :]
    z = _z_tile(
        x_ptr, rows, col_start, mask, V, seed, inv_tau_hi, inv_tau_lo, BLOCK_V, FP64, PTX_LOG
    )
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    go_dot_out = tl.load(go_dot_out_ptr + rows, mask=row_mask, other=0.0)
    y = tl.exp(z - lse[:, None])
    dtype = tl.float64 if FP64 else tl.float32
    gx = y * (dy.to(dtype) - go_dot_out.to(dtype)[:, None])
    gx = _scale_by_inv_tau(gx, inv_tau_hi, inv_tau_lo, FP64)
    tl.store(
        grad_x_ptr + rows[:, None] * V + cols[None, :],
        gx.to(grad_x_ptr.dtype.element_ty),
        mask=mask,
    )


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------

# Per-row kernels on a GPU: (largest BLOCK, num_warps at that BLOCK, programs per SM). "noise"
# kernels (fwd, bwd_from_logits, the embedding statistics) are bound by the arithmetic of the
# noise, "stream" (bwd) by memory. Measured on an H200 at [8192, 128256] bf16 (triton 3.6):
# noise (4096, 8, 2) beat (8192, 16, 1) and (4096, 4, 4); stream (4096, 8, 8) beat (4096, 8, 2)
# and (8192, 16, 1): keeping few rows in flight for L2 reuse did not pay.
GPU_ROW_CONFIG = {"noise": (4096, 8, 2), "stream": (4096, 8, 8)}
# Under the interpreter (CPU tensors): small blocks and 3 programs, so that the tests at small
# sizes still run the loops over blocks and over rows.
_INTERPRETER_BLOCK = 128
_INTERPRETER_PROGRAMS = 3


def _on_gpu(t: torch.Tensor) -> bool:
    """True for a real GPU launch; CPU tensors mean the interpreter (TRITON_INTERPRET=1)."""
    return t.device.type != "cpu"


def _ptx_log(t: torch.Tensor) -> bool:
    """The hardware log2 approximation is PTX: NVIDIA GPUs only."""
    return t.device.type == "cuda" and torch.version.hip is None


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _row_launch(N: int, V: int, t: torch.Tensor, kind: str) -> tuple[int, int, int]:
    """(grid size, BLOCK, num_warps) of a persistent per-row kernel."""
    if not _on_gpu(t):
        block = min(_INTERPRETER_BLOCK, max(16, triton.next_power_of_2(V)))
        return min(N, _INTERPRETER_PROGRAMS), block, 4
    max_block, max_warps, per_sm = GPU_ROW_CONFIG[kind]
    block = min(max_block, max(16, triton.next_power_of_2(V)))
    # 16 elements per thread; smaller blocks get fewer warps and more programs per SM
    num_warps = max(1, min(max_warps, block // 512))
    per_sm = per_sm * max_warps // num_warps
    return min(N, _sm_count(t.device.index or 0) * per_sm), block, num_warps


def _tile_config(weight_dtype: torch.dtype, D: int, gpu: bool) -> dict[str, tuple[int, ...]]:
    """Tiles of the embedding kernels (every dot dimension >= 16):
    probs (BLOCK_N, BLOCK_V): the probabilities kernel's tiles (elementwise: <= 16 noise elements
    a thread); product (BLOCK_N, BLOCK_K, BLOCK_D): [BLOCK_N, BLOCK_K] probabilities @
    [BLOCK_K, BLOCK_D] weight, a K-loop over one vocabulary chunk; logits (BLOCK_N, BLOCK_V,
    BLOCK_D): grad_logits tiles, a K-loop over D in steps of BLOCK_D; and num_warps. Wider weight
    elements get smaller tiles (shared memory)."""
    if not gpu:
        return {
            "probs": (16, 32),
            "product": (16, 32, 16),
            "logits": (16, 32, 16),
            "num_warps": (4,),
        }
    d_tile = min(
        {2: 256, 4: 128}.get(weight_dtype.itemsize, 64), max(16, triton.next_power_of_2(D))
    )
    if weight_dtype.itemsize <= 2:
        return {
            "probs": (32, 128),
            "product": (64, 32, d_tile),
            "logits": (64, 64, 64),
            "num_warps": (8,),
        }
    if weight_dtype.itemsize == 4:  # float32: three-pass TF32 dots need more registers
        return {
            "probs": (32, 128),
            "product": (64, 32, d_tile),
            "logits": (32, 64, 32),
            "num_warps": (8,),
        }
    return {
        "probs": (16, 128),
        "product": (32, 32, d_tile),
        "logits": (32, 64, 32),
        "num_warps": (4,),
    }


# Under the interpreter the vocabulary chunks are small, so that the tests' vocabularies span
# several chunks and end in a partial one.
_INTERPRETER_CHUNK = 64


# The fused embedding's memory beyond its float32 [N, D] output stays O(N * D), within the memory
# goal on a GPU (N * D * 16 bytes + 1 MiB, for D >= 256): the probabilities workspace takes at
# most max(N * D, 256 * N, _MIN_WORKSPACE) elements and the split product's partial sums at most
# max(2 * N * D, _MIN_WORKSPACE), 4 bytes each (a 16-bit p is stored as two halves).
_MIN_WORKSPACE = 2**16


def _chunk_width(N: int, V: int, D: int, gpu: bool) -> int:
    """Vocabulary columns per chunk of the probabilities workspace [N, chunk]: at most
    max(N * D, 256 * N, _MIN_WORKSPACE) elements. A multiple of 256 on a GPU (of every
    BLOCK_V and BLOCK_K, and of 4, the noise's column alignment)."""
    if not gpu:
        return _INTERPRETER_CHUNK
    chunk = max(D, _MIN_WORKSPACE // max(N, 1)) // 256 * 256
    return min(max(chunk, 256), triton.cdiv(V, 256) * 256)


def _k_per_split(
    N: int, D: int, tiles: int, chunk: int, block_k: int, gpu: bool, device: torch.device
) -> int:
    """Columns of a vocabulary chunk per program of the product kernel (a multiple of block_k).
    A GPU launch with fewer [BLOCK_N, BLOCK_D] output tiles than two per SM splits the chunk
    over more programs, each at least 8 BLOCK_K steps long, with partial sums of at most
    max(2 * N * D, _MIN_WORKSPACE) elements; the interpreter splits in two, so that the
    tests run the split."""
    steps = triton.cdiv(chunk, block_k)
    if gpu:
        most = max(2 * N * D, _MIN_WORKSPACE) // max(N * D, 1)
        splits = max(1, min(2 * _sm_count(device.index or 0) // tiles, steps // 8, most))
    else:
        splits = min(2, steps)
    return triton.cdiv(steps, splits) * block_k


def _write_probs(
    logits: torch.Tensor,
    weight: torch.Tensor,
    lse: torch.Tensor,
    p_hi: torch.Tensor,
    p_lo: torch.Tensor,
    col_start: int,
    width: int,
    seed: int,
    inv_tau: tuple[float, float],
    cfg: dict[str, tuple[int, ...]],
    split: bool,
) -> None:
    """Fill p_hi[:, :width] (and p_lo, if split) with exp(z - lse) of the columns
    [col_start, col_start + width), regenerating the noise; inv_tau from _inv_tau_parts and
    cfg from _tile_config, worked out once by the caller for all its chunks."""
    N, V = logits.shape
    block_n, block_v = cfg["probs"]
    grid = _check_grid((triton.cdiv(N, block_n), triton.cdiv(width, block_v)), "embedding probs")
    _embedding_probs_kernel[grid](
        logits,
        weight,
        lse,
        p_hi,
        p_lo,
        N,
        V,
        col_start,
        width,
        p_hi.shape[1],
        seed,
        *inv_tau,
        BLOCK_N=block_n,
        BLOCK_V=block_v,
        FP64=logits.dtype == torch.float64,
        PTX_LOG=_ptx_log(logits),
        SPLIT_P=split,
        num_warps=cfg["num_warps"][0],
    )


def _result_buffer(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Output buffer of a kernel. The interpreter rounds float32 to bfloat16 toward zero where a
    GPU rounds to nearest even, so there bfloat16 results are written in float32 and rounded by
    torch (the caller converts with .to(dtype), a no-op on a GPU)."""
    if device.type == "cpu" and dtype == torch.bfloat16:
        dtype = torch.float32
    return torch.empty(shape, dtype=dtype, device=device)


def _dot_precision(dtype: torch.dtype) -> str | None:
    # float32 weights: three TF32 products give about float32 accuracy at tensor-core speed;
    # 16-bit operands take the default (the option only concerns float32)
    if dtype == torch.float32:
        return "tf32x3"
    return "ieee" if dtype == torch.float64 else None


def _inv_tau_parts(tau: float) -> tuple[float, float]:
    """1 / tau split into float32 hi + lo (the kernels take float32 scalars)."""
    inv = 1.0 / tau
    try:
        hi = struct.unpack("f", struct.pack("f", inv))[0]
    except OverflowError:
        return float("inf"), 0.0
    lo = struct.unpack("f", struct.pack("f", inv - hi))[0]
    return hi, lo


def _check_grid(grid: tuple[int, int], kernel: str) -> tuple[int, int]:
    """A launch grid within CUDA's limits (2^31 - 1 programs on axis 0, 65535 on axis 1), or a
    clear error instead of the launch's "invalid argument"."""
    if grid[0] > 2**31 - 1 or grid[1] > 65535:
        raise ValueError(
            f"{kernel}: the problem is too large for one launch (grid {grid}, "
            "limits 2^31 - 1 and 65535)"
        )
    return grid


def _check_matrix(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"tensors must be on one device, got {devices}")


def _check_tau_seed(tau: float, seed: int | None = None) -> None:
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if seed is not None and not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2^63), got {seed}")


def _check_vocabulary(logits: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.shape[0] != logits.shape[1]:
        raise ValueError(
            f"weight must have {logits.shape[1]} rows (logits' vocabulary), got {weight.shape[0]}"
        )


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
    _check_matrix("logits", logits)
    _check_tau_seed(tau, seed)
    N, V = logits.shape
    y = _result_buffer((N, V), logits.dtype, logits.device)
    index = torch.empty(N, dtype=torch.int64, device=logits.device)
    if N > 0 and V > 0:
        grid, block, num_warps = _row_launch(N, V, logits, "noise")
        inv_hi, inv_lo = _inv_tau_parts(tau)
        _gumbel_softmax_fwd_kernel[(grid,)](
            logits,
            y,
            index,
            N,
            V,
            seed,
            inv_hi,
            inv_lo,
            HARD=bool(hard),
            BLOCK=block,
            FP64=logits.dtype == torch.float64,
            PTX_LOG=_ptx_log(logits),
            num_warps=num_warps,
        )
    return y.to(logits.dtype), index


@on_tensor_device
def gumbel_softmax_bwd(grad_y: torch.Tensor, y: torch.Tensor, tau: float) -> torch.Tensor:
    """grad_logits = y * (grad_y - sum_v(grad_y * y)) / tau per row.

    grad_y, y [N, V] contiguous (y: the soft probabilities). Returns grad_logits [N, V] in y's
    dtype.
    """
    _check_matrix("grad_y", grad_y)
    _check_matrix("y", y)
    _check_same_device(grad_y=grad_y, y=y)
    _check_tau_seed(tau)
    if grad_y.shape != y.shape:
        raise ValueError(f"grad_y must have y's shape {tuple(y.shape)}, got {tuple(grad_y.shape)}")
    N, V = y.shape
    grad_x = _result_buffer((N, V), y.dtype, y.device)
    if N > 0 and V > 0:
        grid, block, num_warps = _row_launch(N, V, y, "stream")
        inv_hi, inv_lo = _inv_tau_parts(tau)
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
    _check_matrix("grad_y", grad_y)
    _check_matrix("logits", logits)
    _check_same_device(grad_y=grad_y, logits=logits)
    _check_tau_seed(tau, seed)
    if grad_y.shape != logits.shape:
        raise ValueError(
            f"grad_y must have logits' shape {tuple(logits.shape)}, got {tuple(grad_y.shape)}"
        )
    N, V = logits.shape
    grad_x = _result_buffer((N, V), logits.dtype, logits.device)
    if N > 0 and V > 0:
        grid, block, num_warps = _row_launch(N, V, logits, "noise")
        inv_hi, inv_lo = _inv_tau_parts(tau)
        _gumbel_softmax_bwd_from_logits_kernel[(grid,)](
            grad_y,
            logits,
            grad_x,
            N,
            V,
            seed,
            inv_hi,
            inv_lo,
            BLOCK=block,
            FP64=logits.dtype == torch.float64,
            PTX_LOG=_ptx_log(logits),
            num_warps=num_warps,
        )
    return grad_x.to(logits.dtype)


@on_tensor_device
def gumbel_softmax_embedding_fwd(
    logits: torch.Tensor, weight: torch.Tensor, tau: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """softmax(z) @ weight without holding all [N, V] probabilities at once.

    logits [N, V], weight [V, D], contiguous. Returns out [N, D] in float32 (float64 where the
    logits or the weight are), the accumulation dtype, tokens [N] int64 = argmax(z) and
    lse [N] = logsumexp(z) (float32, float64 for float64 logits).
    """
    _check_matrix("logits", logits)
    _check_matrix("weight", weight)
    _check_same_device(logits=logits, weight=weight)
    _check_tau_seed(tau, seed)
    _check_vocabulary(logits, weight)
    N, V = logits.shape
    D = weight.shape[1]
    fp64 = logits.dtype == torch.float64
    # out in float32 (float64 where an input is): the op returns it in the weight's dtype, and
    # the backward reads this one, so that grad_out . out carries no 16-bit rounding
    out_dtype = torch.float64 if torch.float64 in (logits.dtype, weight.dtype) else torch.float32
    out = torch.empty((N, D), dtype=out_dtype, device=logits.device)
    tokens = torch.empty(N, dtype=torch.int64, device=logits.device)
    lse = torch.empty(N, dtype=torch.float64 if fp64 else torch.float32, device=logits.device)
    if N == 0 or V == 0:
        return out.zero_(), tokens, lse
    inv_hi, inv_lo = _inv_tau_parts(tau)
    ptx_log = _ptx_log(logits)
    grid, block, num_warps = _row_launch(N, V, logits, "noise")
    _row_lse_kernel[(grid,)](
        logits,
        lse,
        tokens,
        N,
        V,
        seed,
        inv_hi,
        inv_lo,
        BLOCK=block,
        FP64=fp64,
        PTX_LOG=ptx_log,
        num_warps=num_warps,
    )
    if D > 0:
        # The probabilities are written once, a vocabulary chunk at a time, to a bounded
        # workspace, and a matrix-product kernel reads them: regenerating them inside the
        # product instead costs one pass of the noise per D tile.
        gpu = _on_gpu(logits)
        cfg = _tile_config(weight.dtype, D, gpu)
        block_n, block_k, block_d = cfg["product"]
        split = weight.dtype in (torch.float16, torch.bfloat16)
        chunk = _chunk_width(N, V, D, gpu)
        p_hi = _result_buffer((N, chunk), weight.dtype, logits.device)
        p_lo = _result_buffer((N, chunk), weight.dtype, logits.device) if split else p_hi
        tiles = triton.cdiv(N, block_n) * triton.cdiv(D, block_d)
        k_per_split = _k_per_split(N, D, tiles, chunk, block_k, gpu, logits.device)
        splits = triton.cdiv(chunk, k_per_split)
        grid = _check_grid((triton.cdiv(N, block_n), triton.cdiv(D, block_d)), "embedding fwd")
        # the sums over the vocabulary stay in out's dtype (float32 or float64), never 16-bit
        partial = torch.empty((splits, N, D), dtype=out.dtype, device=out.device)
        for col_start in range(0, V, chunk):
            width = min(chunk, V - col_start)
            used_splits = triton.cdiv(width, k_per_split)
            _write_probs(
                logits,
                weight,
                lse,
                p_hi,
                p_lo,
                col_start,
                width,
                seed,
                (inv_hi, inv_lo),
                cfg,
                split,
            )
            _embedding_product_kernel[(*grid, used_splits)](
                p_hi,
                p_lo,
                weight[col_start : col_start + width],
                partial,
                N,
                width,
                D,
                chunk,
                k_per_split,
                BLOCK_N=block_n,
                BLOCK_K=block_k,
                BLOCK_D=block_d,
                ACC_FP64=weight.dtype == torch.float64,
                DOT_PRECISION=_dot_precision(weight.dtype),
                SPLIT_P=split,
                num_warps=cfg["num_warps"][0],
            )
            used = partial[:used_splits]
            if col_start == 0:
                torch.sum(used, 0, out=out)
            elif used_splits == 1:  # the usual case at large N: no [N, D] sum to allocate
                out += used[0]
            else:
                out += used.sum(0)
    return out, tokens, lse


@on_tensor_device
def gumbel_softmax_embedding_bwd(
    grad_out: torch.Tensor,
    logits: torch.Tensor,
    weight: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    tau: float,
    seed: int,
    weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of gumbel_softmax_embedding_fwd, regenerating y = exp(z - lse) from the seed.

    grad_out, out [N, D]; logits [N, V]; weight [V, D]; lse [N] from the forward. Returns
    grad_logits [N, V] (logits dtype) = y * (grad_out @ weight^T - grad_out . out) / tau and
    grad_weight [V, D] (weight dtype) = y^T @ grad_out, a torch.mm of y and grad_out in the
    weight's dtype (torch's matmul settings apply, as to eager's); with weight_grad False an
    empty tensor instead, not computed.
    """
    for name, t in (("grad_out", grad_out), ("logits", logits), ("weight", weight), ("out", out)):
        _check_matrix(name, t)
    _check_same_device(grad_out=grad_out, logits=logits, weight=weight, out=out, lse=lse)
    _check_tau_seed(tau, seed)
    _check_vocabulary(logits, weight)
    N, V = logits.shape
    D = weight.shape[1]
    for name, t in (("grad_out", grad_out), ("out", out)):
        if tuple(t.shape) != (N, D):
            raise ValueError(f"{name} must have shape {(N, D)}, got {tuple(t.shape)}")
    fp64 = logits.dtype == torch.float64
    lse_dtype = torch.float64 if fp64 else torch.float32
    if tuple(lse.shape) != (N,) or not lse.is_contiguous() or lse.dtype != lse_dtype:
        raise ValueError(
            f"lse must be contiguous {lse_dtype} of shape {(N,)}, got {lse.dtype} "
            f"{tuple(lse.shape)}"
        )
    grad_x = _result_buffer((N, V), logits.dtype, logits.device)
    if not weight_grad:
        grad_w = weight.new_empty((0,))
    elif N == 0 or V == 0:
        grad_w = torch.zeros_like(weight)
    else:
        grad_w = torch.empty_like(weight)
    if N == 0 or V == 0:
        return grad_x.to(logits.dtype), grad_w
    gpu = _on_gpu(logits)
    cfg = _tile_config(weight.dtype, D, gpu)
    inv_hi, inv_lo = _inv_tau_parts(tau)
    acc_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    go_dot_out = (grad_out.to(acc_dtype) * out.to(acc_dtype)).sum(1)
    block_n, block_v, block_d = cfg["logits"]
    # row blocks vary fastest, so programs running together share the weight rows they read
    grid = _check_grid((triton.cdiv(N, block_n), triton.cdiv(V, block_v)), "embedding bwd")
    _embedding_bwd_logits_kernel[grid](
        grad_out,
        logits,
        weight,
        go_dot_out,
        lse,
        grad_x,
        N,
        V,
        D,
        seed,
        inv_hi,
        inv_lo,
        BLOCK_N=block_n,
        BLOCK_V=block_v,
        BLOCK_D=block_d,
        FP64=fp64,
        ACC_FP64=acc_dtype == torch.float64,
        DOT_PRECISION=_dot_precision(weight.dtype),
        PTX_LOG=_ptx_log(logits),
        num_warps=cfg["num_warps"][0],
    )
    # grad_weight = y^T @ grad_out a vocabulary chunk at a time: y written once to the
    # workspace, the product by torch (cuBLAS on a GPU) in the weight's dtype, as eager's.
    if weight_grad and D > 0:
        chunk = _chunk_width(N, V, D, gpu)
        p = _result_buffer((N, chunk), weight.dtype, logits.device)
        go = grad_out.to(weight.dtype)
        for col_start in range(0, V, chunk):
            width = min(chunk, V - col_start)
            _write_probs(
                logits, weight, lse, p, p, col_start, width, seed, (inv_hi, inv_lo), cfg, False
            )
            torch.mm(
                p[:, :width].to(weight.dtype).t(), go, out=grad_w[col_start : col_start + width]
            )
    return grad_x.to(logits.dtype), grad_w
