"""Triton kernels of the fused Gumbel-Softmax -> embedding lookup and their launchers.

Contract (shared with the cpp backend): inputs are 2-D and contiguous, logits [N, V],
weight [V, D]; z = (x + g) / tau with g the Gumbel noise of rlgaf_fast.reference, arithmetic in
float32 (float64 for float64 logits). The row statistics and z come from the row kernels'
device helpers (kernels/gumbel_softmax.py).

The embedding never holds all [N, V] probabilities p = exp(z - lse): it writes them a
vocabulary chunk at a time to a workspace of O(N * D) elements (_chunk_width), and the noise of
each element is evaluated once per direction. Forward, per chunk: a program per block of rows
writes p relative to the rows' max over the chunk and folds the chunk into the running row max,
sum and argmax; a Triton product kernel forms p @ weight[chunk], split over the chunk's columns
when N x D has few output tiles, and adds it to out rescaled to the running max (out = out *
alpha + product * beta, in float32, float64 where an input is); out is divided by the row sums
at the end. Backward, per chunk: grad_logits per [BLOCK_N, BLOCK_V] tile with a K-loop over D,
the tile's p written to the workspace, and grad_weight[chunk] = p^T @ grad_out by torch (cuBLAS
on a GPU, so torch's matmul settings apply to it as to eager's: TF32 under
set_float32_matmul_precision("high")). Evaluating the noise inside the products instead costs
one pass of the noise per D tile (18 passes at D = 2048), 8 times slower than eager on an H200.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch
from .gumbel_softmax import online_merge, scale_by_inv_tau, shift_of, z_tile
from .launch import on_tensor_device

# ----------------------------------------------------------------------------------------------
# Kernels. The seed is not specialised on: it changes every call.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _store_p(p_hi_ptr, p_lo_ptr, offsets, p, mask, w_dtype, SPLIT_P: tl.constexpr):
    """p rounded to the weight's dtype (the product's operand) and, with SPLIT_P, the
    remainder p - p_hi rounded the same way."""
    p_hi = p.to(w_dtype)
    tl.store(p_hi_ptr + offsets, p_hi.to(p_hi_ptr.dtype.element_ty), mask=mask)
    if SPLIT_P:
        p_lo = (p - p_hi.to(p.dtype)).to(w_dtype)
        tl.store(p_lo_ptr + offsets, p_lo.to(p_lo_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed"])
def _embedding_chunk_probs_kernel(
    x_ptr,
    w_ptr,
    p_hi_ptr,
    p_lo_ptr,
    tile_max_ptr,
    row_max_ptr,
    row_sum_ptr,
    index_ptr,
    alpha_ptr,
    beta_ptr,
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
    """p = exp(z - m) of BLOCK_N rows over the chunk's columns [col_start, col_start + width),
    m each row's max there, into the [N, width] workspace (row stride p_stride), with one
    evaluation of the noise: the first loop stages exp(z - the tile's max) (tile maxima in
    tile_max [N, cdiv(width, BLOCK_V)]), the second rescales the staged tiles by
    exp(tile max - m), reading only memory.

    The program owns its rows' chunk, so it also folds the chunk into the running statistics of
    the columns so far: row_max (the max of z), row_sum (sum(exp(z - row_max))) and index (the
    first argmax), and leaves alpha = exp(old max - new max) and beta = exp(m - new max) for
    out = out * alpha + (p @ weight[chunk]) * beta. Shifts are 0 where a max is -inf, so that
    exp never evaluates -inf - (-inf) and a chunk of -inf adds 0."""
    dtype = tl.float64 if FP64 else tl.float32
    w_dtype = w_ptr.dtype.element_ty
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    tiles = tl.cdiv(width, BLOCK_V)
    m = tl.full([BLOCK_N], float("-inf"), dtype)
    s = tl.zeros([BLOCK_N], dtype)
    best_index = tl.zeros([BLOCK_N], tl.int64)
    for local_start in range(0, width, BLOCK_V):
        local = local_start + tl.arange(0, BLOCK_V)
        mask = row_mask[:, None] & (local < width)[None, :]
        z = z_tile(
            x_ptr,
            rows,
            col_start + local_start,
            mask,
            V,
            seed,
            inv_tau_hi,
            inv_tau_lo,
            BLOCK_V,
            FP64,
            PTX_LOG,
        )
        tile_max, tile_arg = tl.max(z, 1, return_indices=True)
        e = tl.exp(z - shift_of(tile_max)[:, None])
        # strict > keeps the first maximum across tiles (tl.max breaks ties left)
        best_index = tl.where(tile_max > m, col_start + local_start + tile_arg, best_index)
        m, s, _, _ = online_merge(m, s, tile_max, tl.sum(e, 1))
        offsets = rows[:, None] * p_stride + local[None, :]
        _store_p(p_hi_ptr, p_lo_ptr, offsets, e, mask, w_dtype, SPLIT_P)
        tl.store(tile_max_ptr + rows * tiles + local_start // BLOCK_V, tile_max, mask=row_mask)
    chunk_shift = shift_of(m)
    # the second loop reads values (and tile maxima) other threads of the program staged: a CTA
    # barrier makes their global stores visible
    tl.debug_barrier()
    for local_start in range(0, width, BLOCK_V):
        local = local_start + tl.arange(0, BLOCK_V)
        mask = row_mask[:, None] & (local < width)[None, :]
        offsets = rows[:, None] * p_stride + local[None, :]
        tile_max = tl.load(
            tile_max_ptr + rows * tiles + local_start // BLOCK_V, mask=row_mask, other=0.0
        )
        e = tl.load(p_hi_ptr + offsets, mask=mask, other=0.0).to(dtype)
        if SPLIT_P:
            e += tl.load(p_lo_ptr + offsets, mask=mask, other=0.0).to(dtype)
        p = e * tl.exp(tile_max - chunk_shift)[:, None]
        _store_p(p_hi_ptr, p_lo_ptr, offsets, p, mask, w_dtype, SPLIT_P)
    old_max = tl.load(row_max_ptr + rows, mask=row_mask, other=0.0)
    old_sum = tl.load(row_sum_ptr + rows, mask=row_mask, other=0.0)
    new_max, new_sum, alpha, beta = online_merge(old_max, old_sum, m, s)
    old_index = tl.load(index_ptr + rows, mask=row_mask, other=0)
    # a row's value is held by several threads: every load of the old statistics completes
    # before any thread stores the new ones
    tl.debug_barrier()
    tl.store(index_ptr + rows, tl.where(m > old_max, best_index, old_index), mask=row_mask)
    tl.store(row_max_ptr + rows, new_max, mask=row_mask)
    tl.store(row_sum_ptr + rows, new_sum, mask=row_mask)
    tl.store(alpha_ptr + rows, alpha, mask=row_mask)
    tl.store(beta_ptr + rows, beta, mask=row_mask)


@triton.jit
def _embedding_product_kernel(
    p_hi_ptr,
    p_lo_ptr,
    w_ptr,
    partial_ptr,
    out_ptr,
    alpha_ptr,
    beta_ptr,
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
    UPDATE_OUT: tl.constexpr,
):
    """partial[s, rows, d tile] = p_hi[rows, ks] @ w[ks, d tile] (+ p_lo @ w), ks the columns
    [s * k_per_split, (s + 1) * k_per_split) of one vocabulary chunk of K columns. The split
    over K (axis 2) keeps the GPU busy when N x D has few tiles (a batch of single tokens).
    UPDATE_OUT (one split): out = out * alpha + (p @ w) * beta in place instead."""
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
    mask = row_mask[:, None] & d_mask[None, :]
    if UPDATE_OUT:
        alpha = tl.load(alpha_ptr + rows, mask=row_mask, other=0.0).to(acc_dtype)
        beta = tl.load(beta_ptr + rows, mask=row_mask, other=0.0).to(acc_dtype)
        offsets = rows[:, None] * D + dcols[None, :]
        out = tl.load(out_ptr + offsets, mask=mask, other=0.0)
        acc = out * alpha[:, None] + acc * beta[:, None]
        tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        partial = partial_ptr + tl.program_id(2).to(tl.int64) * N * D
        tl.store(
            partial + rows[:, None] * D + dcols[None, :],
            acc.to(partial_ptr.dtype.element_ty),
            mask=mask,
        )


@triton.jit(do_not_specialize=["seed"])
def _embedding_bwd_logits_kernel(
    grad_out_ptr,
    x_ptr,
    w_ptr,
    go_dot_out_ptr,
    lse_ptr,
    grad_x_ptr,
    p_ptr,
    N,
    V,
    D,
    col_offset,
    width,
    p_stride,
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
    STORE_P: tl.constexpr,
):
    """grad_logits tile = y * (grad_out @ weight^T - grad_out . out) / tau, y = exp(z - lse), of
    the columns [col_offset, col_offset + width); grad_out . out per row comes computed
    (go_dot_out, the accumulation dtype). STORE_P also writes y, rounded to the weight's dtype,
    to the [N, width] workspace p (row stride p_stride) for grad_weight: the noise of an element
    is evaluated once in the backward."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    local = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_start = col_offset + tl.program_id(1) * BLOCK_V
    cols = col_offset + local
    row_mask = rows < N
    v_mask = local < width
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
    z = z_tile(
        x_ptr, rows, col_start, mask, V, seed, inv_tau_hi, inv_tau_lo, BLOCK_V, FP64, PTX_LOG
    )
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    go_dot_out = tl.load(go_dot_out_ptr + rows, mask=row_mask, other=0.0)
    y = tl.exp(z - lse[:, None])
    dtype = tl.float64 if FP64 else tl.float32
    gx = y * (dy.to(dtype) - go_dot_out.to(dtype)[:, None])
    gx = scale_by_inv_tau(gx, inv_tau_hi, inv_tau_lo, FP64)
    tl.store(
        grad_x_ptr + rows[:, None] * V + cols[None, :],
        gx.to(grad_x_ptr.dtype.element_ty),
        mask=mask,
    )
    if STORE_P:  # rounded to the weight's dtype, torch.mm's operand
        offsets = rows[:, None] * p_stride + local[None, :]
        _store_p(p_ptr, p_ptr, offsets, y, mask, w_ptr.dtype.element_ty, False)


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------


def _tile_config(weight_dtype: torch.dtype, D: int, gpu: bool) -> dict[str, tuple[int, ...]]:
    """Tiles of the embedding kernels (every dot dimension >= 16):
    probs (BLOCK_N, BLOCK_V): the chunk probabilities kernel's rows per program and its tiles'
    width (elementwise: <= 16 noise elements a thread); product (BLOCK_N, BLOCK_K, BLOCK_D):
    [BLOCK_N, BLOCK_K] probabilities @ [BLOCK_K, BLOCK_D] weight, a K-loop over one vocabulary
    chunk; logits (BLOCK_N, BLOCK_V, BLOCK_D): grad_logits tiles, a K-loop over D in steps of
    BLOCK_D; and num_warps. Wider weight elements get smaller tiles (shared memory)."""
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
            "probs": (16, 256),
            "product": (64, 32, d_tile),
            "logits": (64, 64, 64),
            "num_warps": (8,),
        }
    if weight_dtype.itemsize == 4:  # float32: three-pass TF32 dots need more registers
        return {
            "probs": (16, 256),
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
        splits = max(1, min(2 * launch.sm_count(device.index or 0) // tiles, steps // 8, most))
    else:
        splits = min(2, steps)
    return triton.cdiv(steps, splits) * block_k


def _dot_precision(dtype: torch.dtype) -> str | None:
    # float32 weights: three TF32 products give about float32 accuracy at tensor-core speed;
    # 16-bit operands take the default (the option only concerns float32)
    if dtype == torch.float32:
        return "tf32x3"
    return "ieee" if dtype == torch.float64 else None


def _check_vocabulary(logits: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.shape[0] != logits.shape[1]:
        raise ValueError(
            f"weight must have {logits.shape[1]} rows (logits' vocabulary), got {weight.shape[0]}"
        )


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


@on_tensor_device
def gumbel_softmax_embedding_fwd(
    logits: torch.Tensor, weight: torch.Tensor, tau: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """softmax(z) @ weight without holding all [N, V] probabilities at once.

    logits [N, V], weight [V, D], contiguous. Returns out [N, D] in float32 (float64 where the
    logits or the weight are), the accumulation dtype, tokens [N] int64 = argmax(z) and
    lse [N] = logsumexp(z) (float32, float64 for float64 logits).
    """
    launch.check_matrix("logits", logits)
    launch.check_matrix("weight", weight)
    launch.check_same_device(logits=logits, weight=weight)
    launch.check_tau_seed(tau, seed)
    _check_vocabulary(logits, weight)
    N, V = logits.shape
    D = weight.shape[1]
    fp64 = logits.dtype == torch.float64
    # out in float32 (float64 where an input is): the op returns it in the weight's dtype, and
    # the backward reads this one, so that grad_out . out carries no 16-bit rounding
    out_dtype = torch.float64 if torch.float64 in (logits.dtype, weight.dtype) else torch.float32
    device = logits.device
    compute_dtype = torch.float64 if fp64 else torch.float32
    out = torch.empty((N, D), dtype=out_dtype, device=device).zero_()
    tokens = torch.empty(N, dtype=torch.int64, device=device).zero_()
    row_max = torch.empty(N, dtype=compute_dtype, device=device).fill_(float("-inf"))
    row_sum = torch.empty(N, dtype=compute_dtype, device=device).zero_()
    if N == 0 or V == 0:
        return out, tokens, row_sum.log()
    inv_hi, inv_lo = launch.inv_tau_parts(tau)
    gpu = launch.on_gpu(logits)
    cfg = _tile_config(weight.dtype, D, gpu)
    block_rows, block_v = cfg["probs"]
    block_n, block_k, block_d = cfg["product"]
    split = weight.dtype in (torch.float16, torch.bfloat16)
    # The probabilities are written once, a vocabulary chunk at a time, to a bounded
    # workspace, and a matrix-product kernel reads them: regenerating them inside the
    # product instead costs one pass of the noise per D tile.
    chunk = _chunk_width(N, V, D, gpu)
    p_hi = launch.result_buffer((N, chunk), weight.dtype, device)
    p_lo = launch.result_buffer((N, chunk), weight.dtype, device) if split else p_hi
    tile_max = torch.empty((N, triton.cdiv(chunk, block_v)), dtype=compute_dtype, device=device)
    alpha = torch.empty(N, dtype=compute_dtype, device=device)
    beta = torch.empty(N, dtype=compute_dtype, device=device)
    tiles = triton.cdiv(N, block_n) * triton.cdiv(D, block_d)
    k_per_split = _k_per_split(N, D, tiles, chunk, block_k, gpu, device)
    splits = triton.cdiv(chunk, k_per_split)
    grid = launch.check_grid((triton.cdiv(N, block_n), triton.cdiv(D, block_d)), "embedding fwd")
    # the sums over the vocabulary stay in out's dtype (float32 or float64), never 16-bit
    partial = torch.empty((splits, N, D), dtype=out.dtype, device=device) if splits > 1 else out
    for col_start in range(0, V, chunk):
        width = min(chunk, V - col_start)
        used_splits = triton.cdiv(width, k_per_split)
        _embedding_chunk_probs_kernel[(triton.cdiv(N, block_rows),)](
            logits,
            weight,
            p_hi,
            p_lo,
            tile_max,
            row_max,
            row_sum,
            tokens,
            alpha,
            beta,
            N,
            V,
            col_start,
            width,
            chunk,
            seed,
            inv_hi,
            inv_lo,
            BLOCK_N=block_rows,
            BLOCK_V=block_v,
            FP64=fp64,
            PTX_LOG=launch.ptx_log(logits),
            SPLIT_P=split,
            num_warps=cfg["num_warps"][0],
        )
        if D == 0:
            continue
        _embedding_product_kernel[(*grid, used_splits)](
            p_hi,
            p_lo,
            weight[col_start : col_start + width],
            partial,
            out,
            alpha,
            beta,
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
            UPDATE_OUT=used_splits == 1,
            num_warps=cfg["num_warps"][0],
        )
        if used_splits > 1:
            out.mul_(alpha.to(out.dtype)[:, None])
            out.add_(partial[:used_splits].sum(0).mul_(beta.to(out.dtype)[:, None]))
    out.div_(row_sum.to(out.dtype)[:, None])
    lse = torch.where(row_max == float("-inf"), 0.0, row_max) + row_sum.log()
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
        launch.check_matrix(name, t)
    launch.check_same_device(grad_out=grad_out, logits=logits, weight=weight, out=out, lse=lse)
    launch.check_tau_seed(tau, seed)
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
    grad_x = launch.result_buffer((N, V), logits.dtype, logits.device)
    if not weight_grad:
        grad_w = weight.new_empty((0,))
    elif N == 0 or V == 0:
        grad_w = torch.zeros_like(weight)
    else:
        grad_w = torch.empty_like(weight)
    if N == 0 or V == 0:
        return grad_x.to(logits.dtype), grad_w
    gpu = launch.on_gpu(logits)
    cfg = _tile_config(weight.dtype, D, gpu)
    inv_hi, inv_lo = launch.inv_tau_parts(tau)
    acc_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    go_dot_out = (grad_out.to(acc_dtype) * out.to(acc_dtype)).sum(1)
    block_n, block_v, block_d = cfg["logits"]
    # With grad_weight, the kernel runs a vocabulary chunk at a time and writes y for the chunk
    # to the workspace, where torch (cuBLAS on a GPU) forms grad_weight[chunk] = y^T @ grad_out
    # in the weight's dtype, as eager's; without, one launch covers the vocabulary.
    store_p = weight_grad and D > 0
    chunk = _chunk_width(N, V, D, gpu) if store_p else V
    p = launch.result_buffer((N, chunk), weight.dtype, logits.device) if store_p else grad_x
    go = grad_out.to(weight.dtype) if store_p else None
    for col_start in range(0, V, chunk):
        width = min(chunk, V - col_start)
        # row blocks vary fastest, so programs running together share the weight rows they read
        grid = launch.check_grid(
            (triton.cdiv(N, block_n), triton.cdiv(width, block_v)), "embedding bwd"
        )
        _embedding_bwd_logits_kernel[grid](
            grad_out,
            logits,
            weight,
            go_dot_out,
            lse,
            grad_x,
            p,
            N,
            V,
            D,
            col_start,
            width,
            p.shape[1],
            seed,
            inv_hi,
            inv_lo,
            BLOCK_N=block_n,
            BLOCK_V=block_v,
            BLOCK_D=block_d,
            FP64=fp64,
            ACC_FP64=acc_dtype == torch.float64,
            DOT_PRECISION=_dot_precision(weight.dtype),
            PTX_LOG=launch.ptx_log(logits),
            STORE_P=store_p,
            num_warps=cfg["num_warps"][0],
        )
        if store_p:
            torch.mm(
                p[:, :width].to(weight.dtype).t(), go, out=grad_w[col_start : col_start + width]
            )
    return grad_x.to(logits.dtype), grad_w
