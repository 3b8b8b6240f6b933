"""Triton kernels of the fused PPO clipped policy loss and their launchers.

Contract (shared with the cpp backend, csrc/cpu/ppo_loss.cpp): logits [N, V] contiguous,
float16/bfloat16/float32/float64; per-token tensors [N] contiguous, actions int64, the others in
the compute dtype (float32; float64 for float64 logits), in which all arithmetic is done.

ppo_loss_fwd(logits, actions, temperature) -> (logprobs, entropy, lse) of each row's action
under softmax(logits / temperature), and each row's logsumexp(logits / temperature).

ppo_loss_fwd_grad(logits, actions, old_logprobs, advantages, ref_logprobs, token_weight,
ratio_low, ratio_high, dual_clip, kl_coef, kl_estimator, entropy_coef, temperature, grad_logits)
-> (logprobs, entropy), and writes into grad_logits (the logits' shape and dtype; it may be the
logits tensor itself) the gradient of sum_n token_weight[n] * loss_n with
loss_n = pg_n + kl_coef * kl_n - entropy_coef * entropy_n (see rlgaf_fast.reference.ppo_loss;
dual_clip <= 0 means none, kl_estimator 0 none, 1/2/3 for k1/k2/k3; the ratio is
exp(clamp(logp - old_logprobs, -20, 20)), with no gradient where the clamp bites).

ppo_loss_fwd_vjp(logits, actions, grad_logprobs, grad_entropy, temperature, grad_logits)
-> (logprobs, entropy), and writes d(sum_n grad_logprobs[n] * logp_n + grad_entropy[n] * H_n)
/ d logits into grad_logits: the same two loops with the per-token coefficients given instead
of derived from the loss, for losses whose d loss / d logp the kernel does not know (they are
computed in torch from a first ppo_loss_fwd) and for the gradient of log-probabilities and
entropies themselves. A row whose two coefficients are 0 gets a gradient of exactly 0.

ppo_loss_vjp_lse(logits, actions, grad_logprobs, grad_entropy, lse, entropy, temperature,
grad_logits) writes the same gradient as ppo_loss_fwd_vjp in a single loop over each row, from
the lse and entropy a ppo_loss_fwd of these logits returned: with q = x / T - lse = log p,
grad = p * (a + b * q) + [v == action] * c_lp / T, a = -(c_lp + c_H * H) / T, b = -c_H / T.

One program per row. The first loop over vocabulary blocks keeps, per lane, the running max m,
sum of exp(s - m) and sum of exp(s - m) * (s - m) (s = x / T), merged across lanes at the end:
one read of the row gives logsumexp, the entropy and the action's log-prob. The second loop
(only with a gradient) reads the row again, mostly from L2, and writes
grad = p * (A + B * t) + [v == action] * c_lp / T with t = s - m and the per-token constants A,
B from the derivation in csrc/cpu/ppo_loss.cpp. The float parameters travel in a small tensor
of the compute dtype, since kernel scalar arguments are float32.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .launch import on_tensor_device

_NUM_PARAMS = 6  # inv_temp, ratio_low, ratio_high, dual_clip, kl_coef, entropy_coef


@triton.jit
def _row_statistics(x_row, V, inv_temp, BLOCK: tl.constexpr, FP64: tl.constexpr):
    """(m, log_sum, entropy) of one row: logsumexp(x / T) = m + log_sum."""
    ACC = tl.float64 if FP64 else tl.float32
    cols = tl.arange(0, BLOCK)
    lane_max = tl.full([BLOCK], float("-inf"), ACC)
    lane_sum = tl.zeros([BLOCK], ACC)
    lane_sum_t = tl.zeros([BLOCK], ACC)  # sum of exp(s - lane_max) * (s - lane_max)
    for start in range(0, V, BLOCK):
        mask = start + cols < V
        # keep the row in L2 for the gradient loop
        x = tl.load(
            x_row + start + cols, mask=mask, other=float("-inf"), eviction_policy="evict_last"
        )
        s = x.to(ACC) * inv_temp
        new_max = tl.maximum(lane_max, s)
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp(lane_max - shift)
        e = tl.exp(s - shift)
        # sum e' t' relative to the new max: the old terms move by (old_max - new_max)
        # (no -inf ever meets a 0 in a product: the unused side of a where must stay finite)
        moved = tl.where(lane_sum > 0, lane_max - shift, 0.0) * lane_sum
        lane_sum_t = rescale * (lane_sum_t + moved) + e * tl.where(e > 0, s - shift, 0.0)
        lane_sum = rescale * lane_sum + e
        lane_max = new_max
    m = tl.max(lane_max, 0)
    weight = tl.exp(lane_max - m)
    moved = tl.where(lane_sum > 0, lane_max - m, 0.0) * lane_sum
    sum_e = tl.sum(weight * lane_sum, 0)
    sum_et = tl.sum(weight * (lane_sum_t + moved), 0)
    log_sum = tl.log(sum_e)
    return m, log_sum, log_sum - sum_et / sum_e


@triton.jit
def _ppo_loss_kernel(
    logits_ptr,
    grad_ptr,
    actions_ptr,
    old_ptr,
    adv_ptr,
    ref_ptr,
    weight_ptr,
    params_ptr,
    logprobs_ptr,
    entropy_ptr,
    lse_ptr,
    V,
    KL_ESTIMATOR: tl.constexpr,
    DUAL_CLIP: tl.constexpr,
    ENTROPY_GRAD: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    GIVEN_COEFFICIENTS: tl.constexpr,
    BLOCK: tl.constexpr,
    FP64: tl.constexpr,
):
    ACC = tl.float64 if FP64 else tl.float32
    row = tl.program_id(0).to(tl.int64)
    x_row = logits_ptr + row * V
    inv_temp = tl.load(params_ptr)
    m, log_sum, entropy = _row_statistics(x_row, V, inv_temp, BLOCK, FP64)
    action = tl.load(actions_ptr + row)
    # an action outside [0, V) (unchecked under torch.compile) gives NaN, not a stray read
    valid = (action >= 0) & (action < V)
    logp = tl.load(x_row + action, mask=valid, other=float("nan")).to(ACC) * inv_temp - m - log_sum
    tl.store(logprobs_ptr + row, logp)
    tl.store(entropy_ptr + row, entropy)
    tl.store(lse_ptr + row, m + log_sum)
    if GIVEN_COEFFICIENTS:
        # grad_logprobs and grad_entropy travel in the advantages and token_weight slots
        c_lp = tl.load(adv_ptr + row)
        c_h = tl.load(weight_ptr + row)
        inactive = (c_lp == 0) & (c_h == 0)
    elif COMPUTE_GRAD:
        ratio_low = tl.load(params_ptr + 1)
        ratio_high = tl.load(params_ptr + 2)
        entropy_coef = tl.load(params_ptr + 5)
        w = tl.load(weight_ptr + row)
        adv = tl.load(adv_ptr + row)
        # the log-ratio is clamped (as verl and OpenRLHF do) so that exp never overflows; the
        # clamp passes no gradient outside its range, as torch.clamp
        log_ratio = logp - tl.load(old_ptr + row)
        in_range = (log_ratio >= -20.0) & (log_ratio <= 20.0)
        ratio = tl.exp(tl.minimum(tl.maximum(log_ratio, -20.0), 20.0))
        unclipped = -adv * ratio
        clipped = -adv * tl.minimum(tl.maximum(ratio, ratio_low), ratio_high)
        # where the clipped term is strictly larger the ratio is outside the range: no gradient
        d_ratio = tl.where(clipped > unclipped, 0.0, -adv)
        if DUAL_CLIP:
            dual_clip = tl.load(params_ptr + 3)
            pg = tl.maximum(unclipped, clipped)
            d_ratio = tl.where((adv < 0) & (pg > -dual_clip * adv), 0.0, d_ratio)
        d_logp = tl.where(in_range, d_ratio * ratio, 0.0)
        if KL_ESTIMATOR != 0:
            kl_coef = tl.load(params_ptr + 4)
            diff = logp - tl.load(ref_ptr + row)
            if KL_ESTIMATOR == 1:
                d_kl = tl.full([], 1.0, ACC)
            elif KL_ESTIMATOR == 2:
                d_kl = diff
            else:
                d_kl = 1.0 - tl.exp(-diff)
            d_logp += kl_coef * d_kl
        c_lp = tl.where(w == 0, 0.0, w * d_logp)
        c_h = -w * entropy_coef
        inactive = w == 0
    if COMPUTE_GRAD:
        a = (-c_lp - c_h * (entropy - log_sum)) * inv_temp
        b = -c_h * inv_temp
        action_grad = c_lp * inv_temp
        g_row = grad_ptr + row * V
        cols = tl.arange(0, BLOCK)
        for start in range(0, V, BLOCK):
            mask = start + cols < V
            x = tl.load(x_row + start + cols, mask=mask, other=0.0, eviction_policy="evict_first")
            t = x.to(ACC) * inv_temp - m
            p = tl.exp(t - log_sum)
            if ENTROPY_GRAD:
                # t >= -1e4 keeps p * t at 0 rather than NaN for -inf logits
                g = p * (a + b * tl.maximum(t, -1e4))
            else:
                g = p * a
            g = tl.where(start + cols == action, g + action_grad, g)
            # a masked-out row (padding: -inf or NaN logits) has no gradient at all
            g = tl.where(inactive, 0.0, g)
            tl.store(g_row + start + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ppo_loss_vjp_lse_kernel(
    logits_ptr,
    grad_ptr,
    actions_ptr,
    grad_logprobs_ptr,
    grad_entropy_ptr,
    lse_ptr,
    entropy_ptr,
    params_ptr,
    V,
    BLOCK: tl.constexpr,
    FP64: tl.constexpr,
):
    ACC = tl.float64 if FP64 else tl.float32
    row = tl.program_id(0).to(tl.int64)
    x_row = logits_ptr + row * V
    g_row = grad_ptr + row * V
    inv_temp = tl.load(params_ptr)
    c_lp = tl.load(grad_logprobs_ptr + row)
    c_h = tl.load(grad_entropy_ptr + row)
    lse = tl.load(lse_ptr + row)
    a = -(c_lp + c_h * tl.load(entropy_ptr + row)) * inv_temp
    b = -c_h * inv_temp
    action = tl.load(actions_ptr + row)
    # a masked-out row (padding: -inf or NaN logits) has no gradient at all
    inactive = (c_lp == 0) & (c_h == 0)
    cols = tl.arange(0, BLOCK)
    for start in range(0, V, BLOCK):
        mask = start + cols < V
        x = tl.load(x_row + start + cols, mask=mask, other=0.0)
        # q >= -1e4 keeps p * q at 0 rather than NaN for -inf logits
        q = tl.maximum(x.to(ACC) * inv_temp - lse, -1e4)
        g = tl.exp(q) * (a + b * q)
        g = tl.where(start + cols == action, g + c_lp * inv_temp, g)
        g = tl.where(inactive, 0.0, g)
        tl.store(g_row + start + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=64)
def _params(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The kernel's scalar parameters as a device tensor, made once per distinct set: building
    it on every call is a blocking host-to-device copy, which would stall every call (and every
    chunk of the fused linear loss) until the GPU caught up. Read-only."""
    return torch.tensor(values, dtype=dtype, device=device)


def _block(V: int, on_gpu: bool) -> tuple[int, int]:
    if not on_gpu:  # the interpreter: small blocks keep tests fast
        return min(triton.next_power_of_2(V), 256), 4
    # H200, triton 3.6, bf16 V = 128256 with gradient: (2048, 8) took 3.79 ms at N = 16384 and
    # 0.99 ms at N = 4096, against 4.15 and 1.07 for (4096, 8), 3.78 and 1.04 for (1024, 4),
    # and 4.3 to 5.8 ms at N = 16384 for blocks of 8192 and 16384
    return min(triton.next_power_of_2(V), 2048), 8


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _check(logits: torch.Tensor, actions: torch.Tensor) -> None:
    if logits.dim() != 2 or not logits.is_contiguous() or logits.shape[1] < 1:
        raise ValueError("ppo_loss kernel: logits must be contiguous [N, V] with V >= 1")
    if actions.shape != logits.shape[:1] or actions.dtype != torch.int64:
        raise ValueError("ppo_loss kernel: actions must be int64 [N]")


def _launch(
    logits,
    actions,
    old,
    adv,
    ref,
    weight,
    params,
    grad,
    kl_estimator,
    dual_clip,
    entropy_grad,
    config=None,
    given_coefficients=False,
):
    """config: (BLOCK, num_warps) instead of the default, for tuning."""
    n, v = logits.shape
    dtype = _compute_dtype(logits)
    logprobs = torch.empty(n, dtype=dtype, device=logits.device)
    entropy = torch.empty(n, dtype=dtype, device=logits.device)
    lse = torch.empty(n, dtype=dtype, device=logits.device)
    if n == 0:
        return logprobs, entropy, lse
    block, num_warps = config or _block(v, logits.is_cuda)
    compute_grad = grad is not None
    dummy = logprobs  # stands in for pointers that the specialisation never reads
    _ppo_loss_kernel[(n,)](
        logits,
        grad if compute_grad else logits,
        actions,
        old if compute_grad else dummy,
        adv if compute_grad else dummy,
        ref if ref is not None else dummy,
        weight if compute_grad else dummy,
        params,
        logprobs,
        entropy,
        lse,
        v,
        KL_ESTIMATOR=kl_estimator,
        DUAL_CLIP=dual_clip,
        ENTROPY_GRAD=entropy_grad,
        COMPUTE_GRAD=compute_grad,
        GIVEN_COEFFICIENTS=given_coefficients,
        BLOCK=block,
        FP64=dtype == torch.float64,
        num_warps=num_warps,
    )
    return logprobs, entropy, lse


def _check_grad(logits: torch.Tensor, grad_logits: torch.Tensor) -> None:
    if (
        grad_logits.shape != logits.shape
        or grad_logits.dtype != logits.dtype
        or (not grad_logits.is_contiguous())
    ):
        raise ValueError("ppo_loss kernel: grad_logits must be contiguous, shaped as logits")


@on_tensor_device
def ppo_loss_fwd(
    logits: torch.Tensor, actions: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logprobs [N], entropy [N], lse [N]) in the compute dtype for logits [N, V] and actions
    [N]; lse = logsumexp(logits / temperature) per row."""
    _check(logits, actions)
    params = _params(
        (1.0 / temperature,) + (0.0,) * (_NUM_PARAMS - 1), _compute_dtype(logits), logits.device
    )
    return _launch(logits, actions, None, None, None, None, params, None, 0, False, False)


@on_tensor_device
def ppo_loss_fwd_grad(
    logits: torch.Tensor,
    actions: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    token_weight: torch.Tensor,
    ratio_low: float,
    ratio_high: float,
    dual_clip: float,
    kl_coef: float,
    kl_estimator: int,
    entropy_coef: float,
    temperature: float,
    grad_logits: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """As ppo_loss_fwd, and writes d(sum_n token_weight[n] * loss_n) / d logits into
    grad_logits (contiguous, the logits' shape and dtype; may be logits itself)."""
    _check(logits, actions)
    _check_grad(logits, grad_logits)
    if ref_logprobs is None:
        kl_estimator = 0
    params = _params(
        (1.0 / temperature, ratio_low, ratio_high, dual_clip, kl_coef, entropy_coef),
        _compute_dtype(logits),
        logits.device,
    )
    return _launch(
        logits,
        actions,
        old_logprobs,
        advantages,
        ref_logprobs,
        token_weight,
        params,
        grad_logits,
        int(kl_estimator) if kl_coef != 0 else 0,
        dual_clip > 0,
        entropy_coef != 0,
    )[:2]


@on_tensor_device
def ppo_loss_fwd_vjp(
    logits: torch.Tensor,
    actions: torch.Tensor,
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor,
    temperature: float,
    grad_logits: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """As ppo_loss_fwd, and writes d(sum_n grad_logprobs[n] * logp_n + grad_entropy[n] * H_n)
    / d logits into grad_logits (contiguous, the logits' shape and dtype; may be logits itself).
    grad_logprobs, grad_entropy: [N] contiguous in the compute dtype."""
    _check(logits, actions)
    _check_grad(logits, grad_logits)
    params = _params(
        (1.0 / temperature,) + (0.0,) * (_NUM_PARAMS - 1), _compute_dtype(logits), logits.device
    )
    dummy = grad_logprobs
    return _launch(
        logits,
        actions,
        dummy,
        grad_logprobs,
        None,
        grad_entropy,
        params,
        grad_logits,
        0,
        False,
        True,
        given_coefficients=True,
    )[:2]


@on_tensor_device
def ppo_loss_vjp_lse(
    logits: torch.Tensor,
    actions: torch.Tensor,
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    temperature: float,
    grad_logits: torch.Tensor,
) -> None:
    """Writes into grad_logits what ppo_loss_fwd_vjp would, in one loop per row, from the lse and
    entropy ([N], compute dtype) that ppo_loss_fwd returned for these logits."""
    _check(logits, actions)
    _check_grad(logits, grad_logits)
    n, v = logits.shape
    if n == 0:
        return
    dtype = _compute_dtype(logits)
    params = _params((1.0 / temperature,) + (0.0,) * (_NUM_PARAMS - 1), dtype, logits.device)
    block, num_warps = _block(v, logits.is_cuda)
    _ppo_loss_vjp_lse_kernel[(n,)](
        logits,
        grad_logits,
        actions,
        grad_logprobs,
        grad_entropy,
        lse,
        entropy,
        params,
        v,
        BLOCK=block,
        FP64=dtype == torch.float64,
        num_warps=num_warps,
    )
