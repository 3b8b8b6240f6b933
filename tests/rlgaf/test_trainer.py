import json
import math
from types import SimpleNamespace

import pytest
import torch

import rlgaf_fast
from rlgaf_fast.rlgaf import NonFiniteLossError, RLGAFConfig, RLGAFTrainer
from rlgaf_fast.rlgaf.discriminator import build_transformer_discriminator
from rlgaf_fast.rlgaf.modes import MODE_NAMES

from .conftest import PAD, VOCAB, make_trainer

EXPECTED_KEYS = {
    "sft": {"g_loss"},
    "ppo": {
        "g_loss",
        "value_loss",
        "reward",
        "kl",
        "entropy",
        "clipfrac",
        "d_loss",
        "d_acc_real",
        "d_acc_fake",
    },
    "reinforce": {"g_loss", "reward", "kl", "entropy", "d_loss", "d_acc_real", "d_acc_fake"},
    "gumbel": {
        "g_loss",
        "reward",
        "kl",
        "tau",
        "token_mismatch",
        "d_loss",
        "d_acc_real",
        "d_acc_fake",
    },
    "rlhf": {"g_loss", "value_loss", "reward", "kl", "entropy", "clipfrac"},
    "grpo": {
        "g_loss",
        "reward",
        "reward_group_std",
        "kl",
        "entropy",
        "clipfrac",
        "d_loss",
        "d_acc_real",
        "d_acc_fake",
    },
    "rlhf-grpo": {"g_loss", "reward", "reward_group_std", "kl", "entropy", "clipfrac"},
}


def params(module):
    return [p.detach().clone() for p in module.parameters()]


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_every_mode_trains_and_logs(mode, demos, tmp_path):
    trainer = make_trainer(mode, demos, output_dir=str(tmp_path), tensorboard=False)
    before = params(trainer.unwrapped_policy.model)
    d_before = None if trainer.discriminator is None else params(trainer.unwrapped_discriminator)
    history = trainer.train()
    trainer.close()
    assert len(history) == 3
    for logs in history:
        assert EXPECTED_KEYS[mode] | {"step", "tokens_per_s", "lr"} <= set(logs)
        assert all(math.isfinite(v) for v in logs.values() if isinstance(v, float))
    after = params(trainer.unwrapped_policy.model)
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    if d_before is not None:
        d_after = params(trainer.unwrapped_discriminator)
        assert any(not torch.equal(a, b) for a, b in zip(d_before, d_after, strict=True))
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]


def test_gumbel_training_pass_regenerates_the_generated_tokens(demos):
    # The relaxed sample's argmax (same seeds, teacher-forced) is the token generation drew.
    trainer = make_trainer("gumbel", demos, tau_start=0.5, tau_end=0.1, tau_schedule="exponential")
    history = trainer.train()
    assert [h["token_mismatch"] for h in history] == [0.0, 0.0, 0.0]
    assert history[0]["tau"] == pytest.approx(0.5)
    assert trainer.tau() == pytest.approx(0.1)


def test_sft_learns_the_demonstrations(demos):
    trainer = make_trainer(
        "sft", demos, total_steps=40, batch_size=16, minibatch_size=16, generator_lr=3e-3
    )
    history = trainer.train()
    first = sum(h["g_loss"] for h in history[:5]) / 5
    last = sum(h["g_loss"] for h in history[-5:]) / 5
    assert last < first - 1.0, (first, last)


@pytest.mark.parametrize("mode", ["rlhf", "rlhf-grpo"])
def test_reward_fn_modes_increase_a_fixed_reward(mode, demos):
    trainer = make_trainer(
        mode,
        demos,
        total_steps=25,
        batch_size=16,
        minibatch_size=8,
        generator_lr=3e-3,
        kl_coef=0.0,
    )
    history = trainer.train()
    first = sum(h["reward"] for h in history[:5]) / 5
    last = sum(h["reward"] for h in history[-5:]) / 5
    assert last > first + 0.5, (first, last)


class NaNDiscriminator(torch.nn.Module):
    """A discriminator whose logits are NaN: the generator's loss becomes NaN."""

    def __init__(self):
        super().__init__()
        self.inner = build_transformer_discriminator(
            VOCAB, hidden_size=32, num_layers=1, num_heads=2, pad_token_id=PAD
        )

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, inputs_embeds=None, attention_mask=None):
        logits = self.inner(inputs_embeds=inputs_embeds, attention_mask=attention_mask).logits
        return SimpleNamespace(logits=logits * float("nan"))


@pytest.mark.parametrize("mode", ["gumbel", "reinforce"])
def test_non_finite_loss_stops_and_names_the_step(mode, demos):
    trainer = make_trainer(mode, demos, discriminator=NaNDiscriminator(), baseline_decay=0.9)
    # A baseline from earlier steps: blending the refused step's NaN reward into it would poison
    # every later advantage (reinforce keeps one; gumbel mode never reads it).
    trainer.reward_baseline = 0.5
    before = params(trainer.unwrapped_policy)
    with pytest.raises(NonFiniteLossError, match="at step 1 "):  # numbered as the log numbers
        trainer.step()
    after = params(trainer.unwrapped_policy)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert all(torch.isfinite(p).all() for p in after)
    if mode == "reinforce":  # the only mode that reads and moves it
        assert trainer.reward_baseline == 0.5


def test_generator_ema_is_the_moving_average_of_the_generator(demos, tmp_path):
    decay = 0.6
    trainer = make_trainer("ppo", demos, generator_ema=decay)
    expected = None
    for _ in range(3):
        trainer.step()
        live = params(trainer.unwrapped_policy.model)
        # torch's AveragedModel starts from the weights after the first step.
        expected = (
            live
            if expected is None
            else [decay * e + (1 - decay) * p for e, p in zip(expected, live, strict=True)]
        )
    averaged = params(trainer.evaluation_model)
    for e, a in zip(expected, averaged, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(a, p) for a, p in zip(averaged, live, strict=True))
    assert trainer.evaluation_model is not trainer.unwrapped_policy.model
    plain = make_trainer("ppo", demos)  # without the average, evaluations see the live model
    assert plain.ema is None and plain.evaluation_model is plain.unwrapped_policy.model

    # A checkpoint carries the average; resuming restores it.
    trainer.save_checkpoint(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "generator_ema.safetensors").exists()
    resumed = make_trainer("ppo", demos, generator_ema=decay)
    resumed.load_checkpoint(tmp_path / "ckpt")
    for a, b in zip(params(resumed.evaluation_model), averaged, strict=True):
        assert torch.equal(a, b)
    assert resumed.ema.n_averaged.item() == trainer.ema.n_averaged.item() == 3
    with pytest.raises(ValueError, match="generator_ema must be in"):
        RLGAFConfig(generator_ema=1.0)


def test_adam_beta1_reaches_both_optimisers(demos):
    trainer = make_trainer("gumbel", demos, adam_beta1=0.0)
    trainer.step()
    for opt in (trainer.g_opt, trainer.d_opt):
        assert all(group["betas"] == (0.0, 0.999) for group in opt.param_groups)
        # Without momentum Adam's first moment is the last gradient itself.
        param = next(p for group in opt.param_groups for p in group["params"] if p.grad is not None)
        torch.testing.assert_close(opt.state[param]["exp_avg"], param.grad)
    assert make_trainer("gumbel", demos).g_opt.param_groups[0]["betas"] == (0.9, 0.999)


def test_fsdp1_is_refused_with_a_clear_message(demos):
    # accelerate only builds an FSDP accelerator on a GPU machine; its distributed_type and
    # plugin are what the trainer reads. FSDP2 runs in test_distributed.py.
    from accelerate.utils import DistributedType

    fsdp1 = SimpleNamespace(
        distributed_type=DistributedType.FSDP,
        state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=1)),
    )
    generator = make_trainer("sft", demos).unwrapped_policy.model
    with pytest.raises(NotImplementedError, match="supports FSDP2 only.*version 1"):
        RLGAFTrainer(
            RLGAFConfig(mode="sft", batch_size=4, minibatch_size=4),
            generator,
            demonstrations=demos,
            accelerator=fsdp1,
        )


@pytest.mark.parametrize("mode", ["sft", "ppo"])
def test_g_steps_draw_fresh_batches_and_the_schedule_counts_iterations(mode, demos):
    trainer = make_trainer(
        mode,
        demos,
        total_steps=4,
        g_steps=2,
        lr_schedule="linear",
        generator_ema=0.5,
        mle_coef=0.1 if mode == "ppo" else 0.0,
    )
    drawn = []
    draw = trainer.demos.batch
    trainer.demos.batch = lambda size, seed: drawn.append(seed) or draw(size, seed)
    lrs = [trainer.step()["lr"] for _ in range(4)]
    # The linear schedule reaches its end after total_steps iterations, not generator steps.
    assert lrs == pytest.approx([1e-3 * f for f in (0.75, 0.5, 0.25, 0.0)])
    assert len(drawn) == len(set(drawn))  # no demonstration batch is drawn twice
    assert trainer.ema.n_averaged.item() == 4 * 2  # one average update per generator step


def test_generator_dropout_is_off_unless_asked_for(demos):
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2():
        torch.manual_seed(0)
        return GPT2LMHeadModel(
            GPT2Config(
                vocab_size=VOCAB,
                n_embd=16,
                n_layer=1,
                n_head=2,
                n_positions=32,
                pad_token_id=PAD,
                eos_token_id=1,
            )
        )

    def dropouts(model):
        return [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]

    config = dict(mode="reinforce", batch_size=4, minibatch_size=4, max_new_tokens=4)
    trainer = RLGAFTrainer(
        RLGAFConfig(**config),
        gpt2(),
        build_transformer_discriminator(VOCAB, hidden_size=16, num_layers=1, num_heads=2),
        demos,
    )
    model = trainer.unwrapped_policy.model
    assert dropouts(model) and set(dropouts(model)) == {0.0}
    # Without dropout the same weights give the same log-probabilities twice, so PPO's ratio
    # starts at 1.
    batch = trainer.rollout()
    model.train()
    torch.testing.assert_close(
        trainer._response_logprobs(model, batch),
        trainer._response_logprobs(model, batch),
        rtol=0,
        atol=0,
    )
    kept = RLGAFTrainer(
        RLGAFConfig(**config, disable_dropout=False),
        gpt2(),
        build_transformer_discriminator(VOCAB, hidden_size=16, num_layers=1, num_heads=2),
        demos,
    )
    assert set(dropouts(kept.unwrapped_policy.model)) == {0.1}


@pytest.mark.parametrize("mode", ["ppo", "reinforce", "gumbel"])
def test_mle_coef_adds_the_demonstrations_likelihood(mode, demos):
    def train(mle_coef):
        trainer = make_trainer(mode, demos, total_steps=8, generator_lr=3e-3, mle_coef=mle_coef)
        history = trainer.train()
        with torch.no_grad():
            nll, tokens = trainer.demonstration_nll(64)  # the same batch for both runs
        assert tokens > 0
        return history, nll.item()

    plain_history, plain = train(0.0)
    history, with_mle = train(5.0)
    assert "mle_loss" not in plain_history[-1]
    assert all(math.isfinite(h["mle_loss"]) for h in history)
    assert with_mle < plain - 0.1, (with_mle, plain)


def test_mode_requirements_are_clear(demos):
    with pytest.raises(ValueError, match="discriminator"):
        RLGAFTrainer(
            RLGAFConfig(mode="ppo", batch_size=4, minibatch_size=4),
            make_trainer("sft", demos).unwrapped_policy.model,
            None,
            demos,
        )
    with pytest.raises(ValueError, match="reward_fn"):
        RLGAFTrainer(
            RLGAFConfig(mode="rlhf", batch_size=4, minibatch_size=4),
            make_trainer("sft", demos).unwrapped_policy.model,
            None,
            demos,
        )
    with pytest.raises(ValueError, match="mle_coef"):
        RLGAFTrainer(
            RLGAFConfig(mode="rlhf", batch_size=4, minibatch_size=4, mle_coef=1.0),
            make_trainer("sft", demos).unwrapped_policy.model,
            None,
            None,
            demos,
            reward_fn=lambda batch: batch.response_ids.float().sum(-1),
        )


OPS_OF_MODE = {
    "ppo": ("ppo_loss", "value_loss", "gae"),
    "gumbel": ("gumbel_softmax", "gumbel_softmax_embedding"),
}


# Tolerance of the fused-versus-reference comparison: the ops agree to ~1e-6 per call; over 20
# steps of training that drift stays below 1e-3 relative in every logged loss.
PARITY_RTOL, PARITY_ATOL = 1e-3, 1e-4


@pytest.mark.parametrize("mode", ["ppo", "gumbel"])
def test_fused_kernels_give_the_same_training(mode, demos):
    missing = [name for name in OPS_OF_MODE[mode] if not hasattr(rlgaf_fast, name)]
    if missing:
        pytest.skip(f"rlgaf_fast does not export {missing} yet")
    runs = {}
    for fused in (False, True):
        trainer = make_trainer(
            mode,
            demos,
            total_steps=20,
            use_fused_kernels=fused,
            tau_start=0.7,
            tau_end=0.3,
            tau_schedule="linear",
        )
        runs[fused] = trainer.train()
    keys = ("g_loss", "d_loss", "reward", "kl")
    for step, (ref, fused) in enumerate(zip(runs[False], runs[True], strict=True)):
        for key in keys:
            assert fused[key] == pytest.approx(ref[key], rel=PARITY_RTOL, abs=PARITY_ATOL), (
                step,
                key,
            )


def test_prompts_longer_than_the_positions_are_refused_or_truncated(demos):
    long = [{"prompt_ids": list(range(2, 30)) * 10, "response_ids": [3, 1]}]  # 280 tokens
    with pytest.raises(
        ValueError,
        match=r"demonstrations \(280 tokens\) plus max_new_tokens \(6\) "
        r"exceeds the generator's 256 positions",
    ):
        make_trainer("sft", long, batch_size=1, minibatch_size=1)
    trainer = make_trainer("sft", long, batch_size=1, minibatch_size=1, max_prompt_length=250)
    assert trainer.demos.longest_prompt == 250
    assert math.isfinite(trainer.step()["g_loss"])
