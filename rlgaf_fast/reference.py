"""Pure-PyTorch references: the readable ground truth that every backend is tested against.

Everything here is written for clarity, not speed. The Gumbel noise follows the randomness
contract (docs/design.md): Philox4x32-10 keyed by seed, counter (column // 4, row_lo, row_hi, 0),
output word column % 4, mapped to the open interval (0, 1) as (2 * (word >> 9) + 1) * 2**-24.
The fused backends (C++, Triton) implement exactly this generator, so a seed gives the
same samples on every backend and device.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUNDS = 10
_MASK32 = 0xFFFFFFFF


def _mul_hi_lo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """High and low 32-bit words of the 64-bit product a * b (a a constant, b < 2**32), in int64
    arithmetic that never overflows: b is split into 16-bit halves."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    t = a * b_lo  # < 2**48
    u = a * b_hi  # < 2**48
    hi = (u + (t >> 16)) >> 16
    lo = (((u & 0xFFFF) << 16) + t) & _MASK32
    return hi & _MASK32, lo


def philox4x32(
    c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, seed: int, rounds: int = PHILOX_ROUNDS
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32 (Salmon et al., 2011), as Triton's ``tl.philox``; int64 tensors holding uint32."""
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32
    for _ in range(rounds):
        hi_a, lo_a = _mul_hi_lo(PHILOX_ROUND_A, c0)
        hi_b, lo_b = _mul_hi_lo(PHILOX_ROUND_B, c2)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & _MASK32
        k1 = (k1 + PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def uniform_noise(
    seed: int, rows: int, cols: int, device: torch.device | str = "cpu", first_row: int = 0
) -> Tensor:
    """Uniform samples in (0, 1), float32 ``[rows, cols]``, keyed by (seed, row, column), for the
    rows ``first_row .. first_row + rows - 1`` of a problem."""
    row = torch.arange(first_row, first_row + rows, device=device, dtype=torch.int64)
    row = row[:, None].expand(rows, cols)
    col = torch.arange(cols, device=device, dtype=torch.int64)[None, :].expand(rows, cols)
    zero = torch.zeros_like(row)
    words = philox4x32(col >> 2, row & _MASK32, row >> 32, zero, seed)
    word = torch.stack(words, dim=-1).gather(-1, (col & 3).unsqueeze(-1)).squeeze(-1)
    return ((word >> 9) * 2 + 1).to(torch.float32) * 2.0**-24


def gumbel_noise(
    seed: int, rows: int, cols: int, device: torch.device | str = "cpu", first_row: int = 0
) -> Tensor:
    """Standard Gumbel samples ``-log(-log(u))``, float32 ``[rows, cols]`` (see uniform_noise)."""
    u = uniform_noise(seed, rows, cols, device, first_row)
    return -torch.log(-torch.log(u))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def gumbel_softmax(
    logits: Tensor, tau: float = 1.0, hard: bool = False, dim: int = -1, *, seed: int = 0
) -> Tensor:
    """Gumbel-Softmax sample of ``logits`` along ``dim`` with the contract's noise.

    ``softmax((logits + g) / tau)`` computed in float32 (float64 for float64 input) and returned
    in the input dtype; with ``hard`` the one-hot of the argmax, straight-through gradient.
    Rows are the positions of the other dimensions in row-major order. As in
    ``torch.nn.functional.gumbel_softmax``, a 0-d input is one category (its sample is 1) and an
    empty ``dim`` gives an empty sample (also with ``hard``, where torch raises).
    """
    if logits.dim() == 0:
        return gumbel_softmax(logits.reshape(1), tau, hard, 0, seed=seed).reshape(())
    x = logits.movedim(dim, -1)
    shape = x.shape
    x2 = x.reshape(math.prod(shape[:-1]), shape[-1]).to(_compute_dtype(logits.dtype))
    g = gumbel_noise(seed, x2.shape[0], x2.shape[1], logits.device).to(x2.dtype)
    y = torch.softmax((x2 + g) / tau, dim=-1)
    if hard and shape[-1] > 0:
        index = y.argmax(dim=-1, keepdim=True)
        y_hard = torch.zeros_like(y).scatter_(-1, index, 1.0)
        y = y_hard - y.detach() + y
    return y.to(logits.dtype).reshape(shape).movedim(-1, dim)


def soft_embedding(probs: Tensor, weight: Tensor, *, top_k: int | None = None) -> Tensor:
    """``probs @ weight`` for ``probs [..., V]`` and ``weight [V, D]``.

    With ``top_k`` only the k largest probabilities of each row are kept and renormalised to sum
    to one, so a row reads k embedding rows instead of V.
    """
    if top_k is None:
        return probs.to(weight.dtype) @ weight
    values, index = probs.topk(top_k, dim=-1)
    values = values / values.sum(dim=-1, keepdim=True)
    rows = weight[index]  # [..., k, D]
    return (values.to(weight.dtype).unsqueeze(-2) @ rows).squeeze(-2)


def gumbel_softmax_embedding(
    logits: Tensor, weight: Tensor, tau: float = 1.0, hard: bool = False, *, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """``(soft_embedding(gumbel_softmax(logits, tau, hard, seed=seed), weight), tokens)``.

    logits ``[..., V]``, weight ``[V, D]``; returns embeddings ``[..., D]`` in the weight's dtype
    and the sampled token of each row, int64 ``[...]``.
    """
    y = gumbel_softmax(logits.to(_compute_dtype(logits.dtype)), tau, hard, seed=seed)
    out = y.to(weight.dtype) @ weight
    return out, y.argmax(dim=-1)


# --- PPO: clipped policy loss, clipped value loss, GAE ----------------------------------------


class PPOLossOutput(NamedTuple):
    """What :func:`ppo_loss` returns. Only ``loss`` carries a gradient; the rest are detached.

    loss: scalar. logprobs, entropy: per token, the shape of ``actions``. clipfrac, approx_kl,
    ratio_mean: scalars, masked means over tokens. kl: the masked mean of the KL estimator to the
    reference policy, ``None`` without ``ref_logprobs``.
    """

    loss: Tensor
    logprobs: Tensor
    entropy: Tensor
    clipfrac: Tensor
    approx_kl: Tensor
    ratio_mean: Tensor
    kl: Tensor | None = None


LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3", "k3+")
POLICY_LOSSES = ("ppo", "cispo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
ROLLOUT_CORRECTIONS = ("truncate", "mask")
# The log-ratio is clamped to +-LOG_RATIO_CLAMP before exponentiation, as verl and OpenRLHF do.
LOG_RATIO_CLAMP = 20.0


def _masked(x: Tensor, mask: Tensor) -> Tensor:
    """``x * mask`` where a masked-out token adds exactly 0, even where ``x`` is NaN or inf (a
    padding row's values are never read)."""
    return torch.where(mask != 0, x * mask, torch.zeros((), dtype=x.dtype, device=x.device))


def _sequences(mask: Tensor) -> tuple[int, int]:
    """[sequences, T] for a token shape [..., T] (also where it holds no token)."""
    return math.prod(mask.shape[:-1]), mask.shape[-1]


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return _masked(x, mask).sum() / mask.sum().clamp(min=1)


def logprobs_and_entropy(z: Tensor, actions: Tensor) -> tuple[Tensor, Tensor]:
    """The log-probability of ``actions`` under ``softmax(z)`` and that softmax's entropy, per row
    of ``z [..., V]``. A -inf logit is a token of probability 0: it adds 0 to the entropy and
    nothing non-finite to the gradient; a row with no finite logit gives NaN (docs/design.md,
    "Special values")."""
    all_logprobs = torch.log_softmax(z, dim=-1)
    logprobs = all_logprobs.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
    finite = torch.where(all_logprobs == float("-inf"), 0.0, all_logprobs)
    return logprobs, -(all_logprobs.exp() * finite).sum(-1)


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled action's log-probs
    (Schulman's k1, k2, k3): with d = logprobs - ref_logprobs, k1 = d, k2 = d^2 / 2,
    k3 = exp(-d) + d - 1; "k3+" has k3's value and k2's gradient (unbiased value, the low
    variance gradient of k2)."""
    d = logprobs - ref_logprobs
    if estimator == "k3+":
        k2 = 0.5 * d * d
        return kl_estimate(logprobs, ref_logprobs, "k3").detach() + (k2 - k2.detach())
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return torch.exp(-d) + d - 1
    raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def aggregate_loss(
    token_loss: Tensor,
    mask: Tensor,
    loss_agg: str = "token-mean",
    *,
    loss_agg_norm: float | None = None,
    num_items_in_batch: float | None = None,
) -> Tensor:
    """Reduce ``token_loss [B, T]`` (or ``[N]``: one sequence) to a scalar over the tokens where
    ``mask`` is 1.

    "token-mean": the mean over all unmasked tokens (with ``num_items_in_batch`` n: their sum
    divided by n, DAPO's normalisation by the global token count). "seq-mean-token-mean": each
    sequence's mean over its tokens, then the mean over sequences. "seq-mean-token-sum": each
    sequence's sum, then the mean over sequences. "seq-mean-token-sum-norm": the sum over all
    unmasked tokens divided by B * loss_agg_norm (default T), a constant (Dr. GRPO). A sequence
    with no unmasked token does not count in the means over sequences; with no unmasked token
    at all the loss is 0.
    """
    if loss_agg == "token-mean":
        if num_items_in_batch is not None:
            return _masked(token_loss, mask).sum() / num_items_in_batch
        return _masked_mean(token_loss, mask)
    seq_sum = _masked(token_loss, mask).reshape(_sequences(mask)).sum(-1)
    seq_count = mask.reshape(_sequences(mask)).sum(-1)
    if loss_agg == "seq-mean-token-sum-norm":
        norm = mask.shape[-1] if loss_agg_norm is None else loss_agg_norm
        return seq_sum.sum() / (seq_sum.shape[0] * norm)
    if loss_agg == "seq-mean-token-mean":
        per_seq = seq_sum / seq_count.clamp(min=1)
    elif loss_agg == "seq-mean-token-sum":
        per_seq = seq_sum
    else:
        raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {loss_agg!r}")
    has_tokens = (seq_count > 0).to(per_seq.dtype)
    return (per_seq * has_tokens).sum() / has_tokens.sum().clamp(min=1)


def rollout_weight(
    old_logprobs: Tensor, rollout_logprobs: Tensor, correction: str, cap: float = 2.0
) -> Tensor:
    """The per-token factor (no gradient) that corrects for the rollout engine's policy
    differing from the trainer's old policy, from rho = exp(old_logprobs - rollout_logprobs):
    "truncate" min(rho, cap) (truncated importance sampling), "mask" 1 where rho <= cap and 0
    elsewhere."""
    rho = torch.exp(old_logprobs - rollout_logprobs).detach()
    if correction == "truncate":
        return torch.clamp(rho, max=cap)
    if correction == "mask":
        return (rho <= cap).to(rho.dtype)
    raise ValueError(f"rollout_correction must be one of {ROLLOUT_CORRECTIONS}, got {correction!r}")


def token_logprobs(logits: Tensor, actions: Tensor, *, temperature: float = 1.0) -> Tensor:
    """``log_softmax(logits / temperature)`` at ``actions``: float32 ``[...]`` from logits
    ``[..., V]`` and integer actions ``[...]``, differentiable with respect to the logits.

    Computed as :func:`ppo_loss` computes its log-probabilities (in float32, float64 for float64
    logits), then returned in float32, so that log-probabilities taken here and inside the loss
    agree bit for bit.
    """
    dtype = _compute_dtype(logits.dtype)
    all_logprobs = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)
    return all_logprobs.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1).float()


IGNORE_INDEX = -100


def fused_linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(log_probs, entropy) per token of ``labels [...]`` under ``logits / temperature`` with
    ``logits = softcap * tanh(y * logit_scale / softcap)`` (no softcap: ``y * logit_scale``),
    ``y = hidden @ weight.T + bias`` in hidden's dtype (as an LM head computes it), the rest in
    float32 (float64 for float64). A label of IGNORE_INDEX (-100) gives 0 and 0, no gradient.
    """
    dtype = _compute_dtype(hidden.dtype)
    z = torch.nn.functional.linear(hidden, weight, bias).to(dtype) * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    ignored = labels == IGNORE_INDEX
    log_probs, entropy = logprobs_and_entropy(z / temperature, torch.where(ignored, 0, labels))
    zero = torch.zeros((), dtype=dtype, device=z.device)
    return torch.where(ignored, zero, log_probs), torch.where(ignored, zero, entropy)


def ppo_loss(
    logits: Tensor,
    actions: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor | None = None,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    temperature: float = 1.0,
    loss_agg: str = "token-mean",
    loss_agg_norm: float | None = None,
    num_items_in_batch: float | None = None,
    policy_loss: str = "ppo",
    importance_sampling_level: str = "token",
    rollout_logprobs: Tensor | None = None,
    rollout_correction: str | None = None,
    rollout_cap: float = 2.0,
) -> PPOLossOutput:
    """PPO clipped policy loss from ``logits [..., V]`` and per-token tensors ``[...]``.

    Arithmetic in float32 (float64 for float64 logits). Per token:
    logp = log_softmax(logits / temperature)[action], entropy of that softmax,
    ratio = exp(clamp(logp - old_logprobs, -20, 20)), or with importance_sampling_level
    "sequence" (GSPO) the sequence's exp(clamp(mean over its unmasked tokens of
    (logp - old_logprobs), -20, 20)) for every token of the sequence,
    pg = max(-A * ratio, -A * clip(ratio, 1 - clip_eps, 1 + (clip_eps_high or clip_eps))),
    with dual_clip c: pg = min(pg, -c * A) where A < 0; with policy_loss "cispo"
    pg = -stopgrad(min(ratio, 1 + clip_eps_high)) * A * logp,
    loss_t = pg + kl_coef * kl_estimate(logp, ref_logprobs) - entropy_coef * entropy,
    times :func:`rollout_weight` with rollout_logprobs, reduced by :func:`aggregate_loss`.
    Metrics (token means over the mask): clipfrac (the clipped term was the larger; for cispo
    the ratio was above 1 + clip_eps_high), approx_kl = mean(old_logprobs - logp), ratio_mean,
    kl.
    """
    dtype = _compute_dtype(logits.dtype)
    z = logits.to(dtype) / temperature
    mask = (
        torch.ones(z.shape[:-1], dtype=dtype, device=z.device) if mask is None else mask.to(dtype)
    )
    # The loss never reads a masked-out token's logits, so a padding row (all -inf, NaN) gives
    # neither a NaN loss nor a NaN gradient; the reported per-token values are those of the
    # logits as given.
    live = mask != 0
    masked_out = not bool(live.all())
    z_read = torch.where(live[..., None], z, z.new_zeros(())) if masked_out else z
    logprobs, entropy = logprobs_and_entropy(z_read, actions)
    with torch.no_grad():
        token_logprobs, token_entropy = logprobs.detach().clone(), entropy.detach().clone()
        if masked_out:
            out = logprobs_and_entropy(z[~live], actions[~live])
            token_logprobs[~live], token_entropy[~live] = out
    advantages = advantages.to(dtype)
    log_ratio = logprobs - old_logprobs.to(dtype)
    if importance_sampling_level == "sequence":
        seqs = mask.reshape(_sequences(mask))
        seq_sum = _masked(log_ratio.reshape(seqs.shape), seqs).sum(-1, keepdim=True)
        seq_mean = seq_sum / seqs.sum(-1, keepdim=True).clamp(min=1)
        log_ratio = seq_mean.expand(seqs.shape).reshape(mask.shape)
    ratio = torch.exp(torch.clamp(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    if policy_loss == "cispo":
        token_loss = -torch.clamp(ratio, max=1 + eps_high).detach() * advantages * logprobs
        clipped_tokens = ratio > 1 + eps_high
    else:
        unclipped = -advantages * ratio
        clipped = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + eps_high)
        token_loss = torch.maximum(unclipped, clipped)
        clipped_tokens = clipped > unclipped
        if dual_clip is not None:
            token_loss = torch.where(
                advantages < 0, torch.minimum(token_loss, -dual_clip * advantages), token_loss
            )
    kl = None
    if ref_logprobs is not None:
        kl = kl_estimate(logprobs, ref_logprobs.to(dtype), kl_estimator)
        token_loss = token_loss + kl_coef * kl
    token_loss = token_loss - entropy_coef * entropy
    if rollout_logprobs is not None:
        token_loss = token_loss * rollout_weight(
            old_logprobs.to(dtype), rollout_logprobs.to(dtype), rollout_correction, rollout_cap
        )
    loss = aggregate_loss(
        token_loss,
        mask,
        loss_agg,
        loss_agg_norm=loss_agg_norm,
        num_items_in_batch=num_items_in_batch,
    )
    with torch.no_grad():
        return PPOLossOutput(
            loss=loss,
            logprobs=token_logprobs,
            entropy=token_entropy,
            clipfrac=_masked_mean(clipped_tokens.to(dtype), mask),
            approx_kl=_masked_mean(old_logprobs.to(dtype) - token_logprobs, mask),
            ratio_mean=_masked_mean(ratio, mask),
            kl=None if kl is None else _masked_mean(kl, mask),
        )


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor | None = None,
    *,
    clip: float | None = 0.2,
) -> Tensor:
    """Clipped value loss, as TRL: 0.5 * token-mean of max((v - R)^2, (v_clipped - R)^2) with
    v_clipped = old_values + clamp(values - old_values, -clip, clip); unclipped for clip None."""
    mask = torch.ones_like(values) if mask is None else mask.to(values.dtype)
    loss = (values - returns) ** 2
    if clip is not None:
        clipped = old_values + torch.clamp(values - old_values, -clip, clip)
        loss = torch.maximum(loss, (clipped - returns) ** 2)
    return 0.5 * _masked_mean(loss, mask)


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over ``[B, T]`` (or ``[T]``) rewards and values.

    delta_t = r_t + gamma * V_next - V_t, A_t = delta_t + gamma * lam * A_next, scanning from
    the end; masked tokens (mask 0) are skipped: they pass V_next and A_next through unchanged,
    so padding and tokens inside a sequence that the policy did not produce both work. After
    the last unmasked token V_next = A_next = 0. Returns ``(advantages, returns)`` with
    returns = advantages + values, both 0 where the mask is 0. No gradient flows through.
    """
    rewards, values, mask = rewards.detach(), values.detach(), mask.to(values.dtype)
    next_value = torch.zeros_like(values[..., 0])
    next_advantage = torch.zeros_like(values[..., 0])
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[-1])):
        m = mask[..., t]
        delta = rewards[..., t] + gamma * next_value - values[..., t]
        advantage = delta + gamma * lam * next_advantage
        advantages[..., t] = advantage * m
        next_value = torch.where(m > 0, values[..., t], next_value)
        next_advantage = torch.where(m > 0, advantage, next_advantage)
    return advantages, (advantages + values) * mask
