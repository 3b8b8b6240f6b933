"""The ``grpo`` mode's generator update: group-relative advantages, no critic.

Each prompt of a batch is answered ``group_size`` times (consecutive rows, see
:meth:`RLGAFTrainer.rollout`); a completion's advantage is its reward against its group's, so
the group stands in for PPO's value head. The discriminator's score is the reward, as in the
ppo mode. The policy loss is the op set's ``ppo_loss`` with the options of ``loss_type``
(:func:`loss_options`): this module chooses options and writes no loss formula of its own.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from rlgaf_fast.rlgaf.config import RLGAFConfig
from rlgaf_fast.rlgaf.data import Batch
from rlgaf_fast.rlgaf.kernel_ops import masked_mean
from rlgaf_fast.rlgaf.rollout import response_slice, sequence_inputs

if TYPE_CHECKING:
    from rlgaf_fast.rlgaf.trainer import RLGAFTrainer

# Added to the group's std before dividing: a group whose completions all scored the same has
# std 0, and its advantages (all 0) must stay 0 rather than become 0 / 0.
GROUP_STD_EPS = 1e-4


def group_advantages(rewards: Tensor, group_size: int, scale: bool = True) -> Tensor:
    """Group-relative advantages ``[B]`` of sequence rewards ``[B]`` (float), whose groups are
    ``group_size`` consecutive rows: reward minus its group's mean, divided by the group's
    unbiased std plus :data:`GROUP_STD_EPS` when ``scale``. Same dtype as ``rewards``."""
    if rewards.dim() != 1 or rewards.shape[0] % group_size:
        raise ValueError(
            f"rewards must be [B] with B a multiple of group_size ({group_size}), got "
            f"{list(rewards.shape)}"
        )
    groups = rewards.view(-1, group_size)
    advantages = groups - groups.mean(-1, keepdim=True)
    if scale:
        advantages = advantages / (groups.std(-1, keepdim=True) + GROUP_STD_EPS)
    return advantages.reshape(-1)


def loss_options(config: RLGAFConfig) -> dict:
    """The keyword arguments of ``ppo_loss`` that make ``config.loss_type``'s loss: grpo
    (mean over each sequence's tokens, then over sequences), dapo (mean over all tokens, upper
    clip ``clip_eps_high``), dr_grpo (each sequence's token sum over ``max_new_tokens``, a
    constant, so long and short completions are not weighted differently), gspo (one
    sequence-level ratio per completion) or cispo (clipped, stop-gradient importance weights)."""
    return {
        "grpo": {"loss_agg": "seq-mean-token-mean"},
        "dapo": {"loss_agg": "token-mean", "clip_eps_high": config.clip_eps_high},
        "dr_grpo": {
            "loss_agg": "seq-mean-token-sum-norm",
            "loss_agg_norm": float(config.max_new_tokens),
        },
        "gspo": {"loss_agg": "seq-mean-token-mean", "importance_sampling_level": "sequence"},
        "cispo": {
            "loss_agg": "token-mean",
            "policy_loss": "cispo",
            "clip_eps_high": config.clip_eps_high,
        },
    }[config.loss_type]


def grpo_update(trainer: RLGAFTrainer, g: int) -> tuple[dict, Batch]:
    """The ``g``-th generator update of an iteration: grouped rollouts, then :func:`grpo_step`."""
    batch = trainer.rollout(sub=g, group_size=trainer.config.group_size)
    return grpo_step(trainer, batch, sub=g), batch


def grpo_step(trainer: RLGAFTrainer, batch: Batch, sub: int = 0) -> dict:
    """``ppo_epochs`` passes of minibatch updates on one grouped batch of rollouts, the
    advantages fixed before the first. KL to the reference: in the reward (k1 summed per
    sequence, as ppo) with ``kl_in_reward``, else in the loss (k3 per token, ``kl_coef``)."""
    c, ops = trainer.config, trainer.ops
    prompt_len = batch.prompt_ids.shape[1]
    inputs = sequence_inputs(batch)
    actions, mask = batch.response_ids, batch.response_mask
    with_kl = trainer.reference is not None and c.kl_coef > 0
    with torch.no_grad():
        logits, _ = trainer.policy(*inputs)
        old_logprobs = ops.token_logprobs(
            response_slice(logits, prompt_len), actions, temperature=c.sample_temperature
        )
        score = trainer.score(batch)
        ref_logprobs, kl = None, 0.0
        if c.kl_in_reward or not with_kl:
            rewards, kl = trainer._token_rewards(batch, old_logprobs, score)
            seq_reward = rewards.sum(-1)
        else:
            ref_logprobs = trainer._response_logprobs(trainer.reference, batch)
            kl = ((old_logprobs - ref_logprobs) * mask).sum(-1).mean().item()
            seq_reward = score
        advantages = group_advantages(seq_reward, c.group_size, c.scale_rewards)
        advantages = advantages[:, None].expand_as(old_logprobs).contiguous()

    kl_options = {}
    if ref_logprobs is not None:
        kl_options = {"kl_coef": c.kl_coef, "kl_estimator": "k3"}
    options = loss_options(c)
    stats: dict[str, list[float]] = defaultdict(list)
    updates = c.ppo_epochs * (c.batch_size // c.minibatch_size)
    for mb in trainer.minibatches(sub):
        mb_logits, _ = trainer.policy(*(x[mb] for x in inputs))
        out = ops.ppo_loss(
            response_slice(mb_logits, prompt_len),
            actions[mb],
            old_logprobs[mb],
            advantages[mb],
            mask[mb],
            clip_eps=c.clip_eps,
            ref_logprobs=None if ref_logprobs is None else ref_logprobs[mb],
            entropy_coef=c.entropy_coef,
            temperature=c.sample_temperature,
            **kl_options,
            **options,
        )
        loss, mle = trainer._with_mle(
            out.loss, c.minibatch_size, sub=sub * updates + len(stats["g_loss"])
        )
        trainer._check_finite(loss, "GRPO loss")
        trainer._optimizer_step(loss, trainer.policy, trainer.g_opt)
        stats["g_loss"].append(out.loss.item())
        stats["entropy"].append(masked_mean(out.entropy, mask[mb]).item())
        stats["clipfrac"].append(out.clipfrac.item())
        stats["approx_kl"].append(out.approx_kl.item())
        if mle is not None:
            stats["mle_loss"].append(mle)
    result = {k: sum(v) / len(v) for k, v in stats.items()}
    std = score.view(-1, c.group_size).std(-1).mean().item()
    result.update(reward=score.mean().item(), reward_group_std=std, kl=kl, tokens=int(mask.sum()))
    return result
