"""The grpo mode (grpo.py): group-relative advantages, each loss_type as ppo_loss options, the
fused and reference op sets training alike, and exact resumption."""

import math

import pytest
import torch

from rlgaf_fast import reference
from rlgaf_fast.rlgaf import RLGAFConfig
from rlgaf_fast.rlgaf.grpo import GROUP_STD_EPS, group_advantages

from .conftest import make_trainer
from .test_trainer import PARITY_ATOL, PARITY_RTOL

LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "gspo", "cispo")


def params(module):
    return [p.detach().clone() for p in module.parameters()]


def test_group_advantages_match_a_hand_computation():
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])
    # group 1: mean 3, deviations -2 -1 0 3, unbiased std sqrt(14 / 3); group 2: all equal
    std = math.sqrt(14 / 3)
    scaled = [d / (std + GROUP_STD_EPS) for d in (-2, -1, 0, 3)] + [0.0] * 4
    torch.testing.assert_close(group_advantages(rewards, 4), torch.tensor(scaled))
    unscaled = torch.tensor([-2.0, -1.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(group_advantages(rewards, 4, scale=False), unscaled)
    # groups of 2: (1, 2) (3, 6) (5, 5) (5, 5)
    torch.testing.assert_close(
        group_advantages(rewards, 2, scale=False),
        torch.tensor([-0.5, 0.5, -1.5, 1.5, 0.0, 0.0, 0.0, 0.0]),
    )
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(rewards, 3)


def test_a_grpo_batch_answers_each_prompt_group_size_times(demos):
    trainer = make_trainer("grpo", demos, group_size=4)
    batch = trainer.rollout(group_size=4)
    assert batch.prompt_ids.shape[0] == 8
    for group in batch.prompt_ids.view(2, 4, -1):
        assert (group == group[0]).all()
    # the two prompts differ, and so do (almost surely) the completions within a group
    assert not torch.equal(batch.prompt_ids[0], batch.prompt_ids[4])
    assert len({tuple(r) for r in batch.response_ids[:4].tolist()}) > 1


def test_grpo_config_is_validated():
    with pytest.raises(ValueError, match=r"group_size \(3\) must divide batch_size \(16\)"):
        RLGAFConfig(mode="grpo", group_size=3)
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        RLGAFConfig(mode="grpo", group_size=1)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        RLGAFConfig(mode="grpo", loss_type="ppo")
    with pytest.raises(ValueError, match="clip_eps_high must be > 0"):
        RLGAFConfig(mode="grpo", clip_eps_high=0.0)
    RLGAFConfig(mode="ppo", group_size=3)  # only grpo reads group_size


# Written out here rather than imported from grpo.py, so that the mapping is checked.
MAPPED_OPTIONS = {
    "grpo": {"loss_agg": "seq-mean-token-mean"},
    "dapo": {"loss_agg": "token-mean", "clip_eps_high": 0.28},
    "dr_grpo": {"loss_agg": "seq-mean-token-sum-norm", "loss_agg_norm": 6.0},
    "gspo": {"loss_agg": "seq-mean-token-mean", "importance_sampling_level": "sequence"},
    "cispo": {"loss_agg": "token-mean", "policy_loss": "cispo", "clip_eps_high": 0.28},
}


@pytest.mark.parametrize("kl_in_reward", [False, True])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_each_loss_type_is_the_reference_loss_with_its_options(loss_type, kl_in_reward, demos):
    trainer = make_trainer(
        "grpo",
        demos,
        total_steps=1,
        loss_type=loss_type,
        kl_in_reward=kl_in_reward,
        use_fused_kernels=True,
        kl_coef=0.05,
        clip_eps=0.1,
    )
    calls = []
    fused_loss = trainer.ops.ppo_loss

    def recording(logits, *tensors, **options):
        out = fused_loss(logits, *tensors, **options)
        calls.append((logits.detach().clone(), tensors, options, out.loss.item()))
        return out

    trainer.ops.ppo_loss = recording
    (logs,) = trainer.train()
    assert len(calls) == 4  # 2 epochs of 2 minibatches
    for logits, tensors, options, loss in calls:
        if kl_in_reward:
            kl = {}
            assert options.get("ref_logprobs") is None
        else:
            kl = {"ref_logprobs": options["ref_logprobs"], "kl_coef": 0.05, "kl_estimator": "k3"}
        expected = reference.ppo_loss(
            logits,
            *tensors,
            clip_eps=0.1,
            entropy_coef=0.0,
            temperature=1.0,
            **kl,
            **MAPPED_OPTIONS[loss_type],
        )
        assert loss == pytest.approx(expected.loss.item(), rel=1e-5, abs=1e-6)
    assert logs["g_loss"] == pytest.approx(sum(c[3] for c in calls) / 4, rel=1e-6)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_fused_kernels_give_the_same_grpo_training(loss_type, demos):
    runs, weights = {}, {}
    for fused in (False, True):
        trainer = make_trainer(
            "grpo", demos, total_steps=20, loss_type=loss_type, use_fused_kernels=fused
        )
        runs[fused] = trainer.train()
        weights[fused] = params(trainer.unwrapped_policy)
    for step, (ref, fused) in enumerate(zip(runs[False], runs[True], strict=True)):
        for key in ("g_loss", "d_loss", "reward", "kl"):
            assert fused[key] == pytest.approx(ref[key], rel=PARITY_RTOL, abs=PARITY_ATOL), (
                step,
                key,
            )
    for ref, fused in zip(weights[False], weights[True], strict=True):
        torch.testing.assert_close(fused, ref, rtol=PARITY_RTOL, atol=PARITY_ATOL)


def test_grpo_resume_continues_exactly(demos, tmp_path):
    options = dict(total_steps=4, lr_schedule="linear", loss_type="dapo")
    full = make_trainer(
        "grpo", demos, save_every=2, output_dir=str(tmp_path), tensorboard=False, **options
    )
    full_history = full.train()
    full.close()

    resumed = make_trainer("grpo", demos, **options)
    torch.manual_seed(123)  # a random state unlike the checkpoint's
    for p in resumed.unwrapped_policy.parameters():
        torch.nn.init.normal_(p.data)
    resumed.load_checkpoint(tmp_path / "checkpoint-2")
    assert resumed.step_count == 2
    resumed_history = resumed.train()
    assert resumed_history == [
        {k: v for k, v in h.items() if k != "tokens_per_s"} | {"tokens_per_s": r["tokens_per_s"]}
        for h, r in zip(full_history[2:], resumed_history, strict=True)
    ]
    for a, b in zip(params(full.unwrapped_policy), params(resumed.unwrapped_policy), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(
        params(full.unwrapped_discriminator), params(resumed.unwrapped_discriminator), strict=True
    ):
        assert torch.equal(a, b)
