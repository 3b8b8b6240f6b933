"""The training modes, one row each: what a mode needs and how it updates the generator.

The trainer, the ``rlgaf-fast`` command and the oracle benchmark read this table rather than
comparing mode names, so that a mode's requirements are stated once. It imports nothing at run
time beyond the standard library, so the config and the command line can read it cheaply.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rlgaf_fast.rlgaf.data import Batch
    from rlgaf_fast.rlgaf.trainer import RLGAFTrainer

# update(trainer, g) -> (logs, rollouts): the g-th generator update of an iteration, and the
# rollouts it trained on (the discriminator's first fakes), or None for a mode without any.
GeneratorUpdate = Callable[["RLGAFTrainer", int], "tuple[dict, Batch | None]"]


def _sft_update(trainer: RLGAFTrainer, g: int) -> tuple[dict, Batch | None]:
    return trainer.sft_step(sub=g), None


def _ppo_update(trainer: RLGAFTrainer, g: int) -> tuple[dict, Batch | None]:
    batch = trainer.rollout(sub=g)
    return trainer.ppo_step(batch, sub=g), batch


def _reinforce_update(trainer: RLGAFTrainer, g: int) -> tuple[dict, Batch | None]:
    batch = trainer.rollout(sub=g)
    return trainer.reinforce_step(batch, sub=g), batch


def _gumbel_update(trainer: RLGAFTrainer, g: int) -> tuple[dict, Batch | None]:
    # Generation and the training pass draw the same Gumbel noise from the same seeds.
    seeds = trainer.gumbel_seeds(g)
    batch = trainer.rollout(sub=g, gumbel_seeds=seeds)
    return trainer.gumbel_step(batch, seeds, sub=g), batch


def _grpo_update(trainer: RLGAFTrainer, g: int) -> tuple[dict, Batch | None]:
    # Imported here: this table stays free of torch for the config and the command line.
    from rlgaf_fast.rlgaf.grpo import grpo_update

    return grpo_update(trainer, g)


@dataclass(frozen=True)
class Mode:
    """What one mode needs.

    discriminator: trains against a discriminator (its reward, and a discriminator update per
    iteration). reward_fn: scored by a fixed reward function instead. value_head: the policy
    carries PPO's critic. reference: a frozen reference model for the KL penalty, when
    ``kl_coef`` > 0. demonstrations: needs demonstrations (for MLE, or as the discriminator's
    real examples). rollouts: learns from the generator's own samples, so it fine-tunes a warm
    start rather than training from scratch. update: one generator update (see
    ``GeneratorUpdate``). grouped: answers each prompt ``group_size`` times and compares the
    completions within their group (the GRPO family).
    """

    name: str
    discriminator: bool
    reward_fn: bool
    value_head: bool
    reference: bool
    demonstrations: bool
    rollouts: bool
    update: GeneratorUpdate
    grouped: bool = False


MODE_TABLE: dict[str, Mode] = {
    m.name: m
    for m in (
        # MLE on the demonstrations: the baseline, and the warm start of the others.
        Mode(
            "sft",
            discriminator=False,
            reward_fn=False,
            value_head=False,
            reference=False,
            demonstrations=True,
            rollouts=False,
            update=_sft_update,
        ),
        # Discriminator reward, value head and GAE, clipped PPO.
        Mode(
            "ppo",
            discriminator=True,
            reward_fn=False,
            value_head=True,
            reference=True,
            demonstrations=True,
            rollouts=True,
            update=_ppo_update,
        ),
        # Discriminator reward, a baseline instead of a critic.
        Mode(
            "reinforce",
            discriminator=True,
            reward_fn=False,
            value_head=False,
            reference=True,
            demonstrations=True,
            rollouts=True,
            update=_reinforce_update,
        ),
        # The discriminator's gradient flows into the generator through relaxed samples.
        Mode(
            "gumbel",
            discriminator=True,
            reward_fn=False,
            value_head=False,
            reference=True,
            demonstrations=True,
            rollouts=True,
            update=_gumbel_update,
        ),
        # PPO against a fixed reward function or reward model.
        Mode(
            "rlhf",
            discriminator=False,
            reward_fn=True,
            value_head=True,
            reference=True,
            demonstrations=False,
            rollouts=True,
            update=_ppo_update,
        ),
        # Discriminator reward, group-relative advantages over several completions per
        # prompt instead of a critic (GRPO and its variants: config.loss_type).
        Mode(
            "grpo",
            discriminator=True,
            reward_fn=False,
            value_head=False,
            reference=True,
            demonstrations=True,
            rollouts=True,
            update=_grpo_update,
            grouped=True,
        ),
        # GRPO against a fixed reward function or reward model, as rlhf is PPO against one.
        Mode(
            "rlhf-grpo",
            discriminator=False,
            reward_fn=True,
            value_head=False,
            reference=True,
            demonstrations=False,
            rollouts=True,
            update=_grpo_update,
            grouped=True,
        ),
    )
}
MODE_NAMES: tuple[str, ...] = tuple(MODE_TABLE)


def mode_spec(name: str) -> Mode:
    """The table's row for mode ``name``; ValueError naming the modes for an unknown one."""
    try:
        return MODE_TABLE[name]
    except KeyError:
        raise ValueError(f"mode must be one of {MODE_NAMES}, got {name!r}") from None
