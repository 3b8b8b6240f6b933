"""The training objective: which way each update moves, and the exact numbers the trainer feeds
its losses (rewards, KL penalty, returns, advantages, loss weights) at non-default settings.

The kernels are compared with the reference elsewhere; here the question is whether the trainer
asks them for the right thing: a discriminator trained the wrong way round, a reward of the
wrong sign or a discount applied twice all train without error, and only numbers checked by
hand (or directions checked on a fixed seed) tell.
"""

import math
from types import SimpleNamespace

import pytest
import torch

from rlgaf_fast import reference
from rlgaf_fast.rlgaf.data import Batch
from rlgaf_fast.rlgaf.discriminator import reward_from_logit, token_sequences
from rlgaf_fast.rlgaf.grpo import GROUP_STD_EPS, grpo_step
from rlgaf_fast.rlgaf.kernel_ops import masked_whiten
from rlgaf_fast.rlgaf.rollout import response_slice, sequence_inputs

from .conftest import PAD, VOCAB, make_trainer


class TokenParityDiscriminator(torch.nn.Module):
    """A fixed discriminator: logit = 0.5 * (number of even tokens - number of odd tokens) over
    the real tokens (pad scores 0). Every token carries signal, so a few updates' effect shows
    on a batch of 64, and it reads embeddings linearly, so the Gumbel mode's soft tokens get a
    gradient through it and its logit of a relaxed sample can be written out by hand."""

    def __init__(self):
        super().__init__()
        ids = torch.arange(VOCAB)
        weight = torch.zeros(VOCAB, 2)
        weight[:, 0] = torch.where(ids % 2 == 0, 1.0, -1.0)
        weight[PAD, 0] = 0.0
        self.embedding = torch.nn.Embedding.from_pretrained(weight, freeze=True)

    def get_input_embeddings(self):
        return self.embedding

    def forward(self, inputs_embeds=None, attention_mask=None):
        score = (inputs_embeds[..., 0] * attention_mask).sum(-1, keepdim=True)
        return SimpleNamespace(logits=0.5 * score)


def drift_from_reference(trainer, scale=0.05):
    """Move the generator away from the frozen reference (a copy of it at the start), so that
    the KL penalty is not 0 at the first update."""
    noise = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in trainer.unwrapped_policy.model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=noise))


def response_logprobs(model_logits, batch, temperature):
    """log softmax(logits / temperature) at the response tokens ``[B, T]``, written out."""
    logits = response_slice(model_logits, batch.prompt_ids.shape[1]).float() / temperature
    logp = torch.log_softmax(logits, -1)
    return logp.gather(-1, batch.response_ids[..., None]).squeeze(-1)


def lm_logits(model, batch):
    """A plain LM's logits ``[B, P + T, V]`` on prompt + response (no grad)."""
    input_ids, attention_mask, positions = sequence_inputs(batch)
    with torch.no_grad():
        return model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            use_cache=False,
        ).logits


def kl_token_rewards(batch, logprobs, ref_logprobs, score, kl_coef):
    """reward_t = -kl_coef * (logp_t - ref_t) on every response token, plus the sequence score
    on the last one, written as a loop over rows."""
    mask = batch.response_mask.float()
    rewards = -kl_coef * (logprobs - ref_logprobs) * mask
    for b in range(len(score)):
        last = int(batch.response_mask[b].sum()) - 1
        rewards[b, last] += score[b]
    return rewards


def gae_by_hand(rewards, values, mask, gamma, lam):
    """GAE as a plain Python loop over float64 numbers, for masks that are 1 then 0 (responses
    end at their EOS): ``(advantages, returns)`` as nested lists."""
    advantages, returns = [], []
    for r, v, m in zip(rewards.tolist(), values.tolist(), mask.tolist(), strict=True):
        n = int(sum(m))
        adv = [0.0] * len(r)
        next_value = next_adv = 0.0
        for t in reversed(range(n)):
            delta = r[t] + gamma * next_value - v[t]
            next_adv = delta + gamma * lam * next_adv
            next_value = v[t]
            adv[t] = next_adv
        advantages.append(adv)
        returns.append([a + v[t] if t < n else 0.0 for t, a in enumerate(adv)])
    return advantages, returns


class Recorder:
    """Wraps ``trainer.ops.<name>`` to keep the arguments and result of every call."""

    def __init__(self, trainer, *names):
        self.calls = {name: [] for name in names}
        for name in names:
            setattr(trainer.ops, name, self._wrap(name, getattr(trainer.ops, name)))

    def _wrap(self, name, op):
        def recording(*args, **kwargs):
            out = op(*args, **kwargs)
            self.calls[name].append((args, kwargs, out))
            return out

        return recording


def record_minibatches(trainer, monkeypatch):
    """The rows of each update of the next PPO-style step, in order."""
    rows = []
    schedule = trainer.minibatches

    def recording(sub=0):
        for mb in schedule(sub):
            rows.append(mb)
            yield mb

    monkeypatch.setattr(trainer, "minibatches", recording)
    return rows


# ---------------------------------------------------------------------------- directions


def logit_margin(trainer, real, fake):
    """The discriminator's mean logit on ``real`` minus its mean logit on ``fake``."""
    with torch.no_grad():
        return (
            trainer.discriminator(*token_sequences(real)).mean()
            - trainer.discriminator(*token_sequences(fake)).mean()
        ).item()


@pytest.mark.parametrize("objective", ["bce", "bradley_terry"])
def test_a_discriminator_step_widens_its_margin_of_demonstrations_over_generations(
    objective, demos
):
    trainer = make_trainer("reinforce", demos, discriminator_lr=1e-2, discriminator_loss=objective)
    fake = trainer.rollout()
    real = trainer.demos.for_prompts(fake.prompt_ids, fake.prompt_mask)
    before = logit_margin(trainer, real, fake)
    trainer.discriminator_step(fake, real=real)
    after = logit_margin(trainer, real, fake)
    # On seeds 0-9 one step widens the margin by 0.35 to 1.0 at this learning rate; a
    # discriminator trained with the labels swapped narrows it by as much.
    assert after > before + 0.2, (before, after)


def mean_logit(trainer):
    """The discriminator's mean logit over 256 fresh samples; the same seeds on every call
    (common random numbers), so that two calls differ only by what the generator learned. The
    logit, not the reward the trainer derives from it, so that a reward of the wrong sign
    cannot move both the update and the measure of it."""
    with torch.no_grad():
        batches = [trainer.rollout(sub=100 + k) for k in range(4)]
        return torch.cat([trainer.discriminator(*token_sequences(b)) for b in batches]).mean()


@pytest.mark.parametrize("mode", ["ppo", "reinforce", "gumbel", "grpo"])
def test_generator_updates_raise_a_fixed_discriminators_score(mode, demos):
    trainer = make_trainer(
        mode,
        demos,
        discriminator=TokenParityDiscriminator(),
        batch_size=64,
        minibatch_size=32,
        generator_lr=1e-2,
    )
    before = mean_logit(trainer).item()
    # Three generator steps with the discriminator held fixed (no discriminator step between
    # them). One step is too noisy to judge: Adam's first update moves every weight by the
    # learning rate in the sign of its gradient, however little signal that gradient holds,
    # and on seeds 0-9 one step at batch 64 lowered the mean logit in 1 of 10 PPO runs and 2 of
    # 10 REINFORCE runs. After three steps it rose on all ten seeds in every mode, by 0.35 at
    # the least (REINFORCE; PPO, GRPO and Gumbel by 0.68 or more).
    for g in range(3):
        trainer.spec.update(trainer, g)
    assert torch.equal(
        trainer.unwrapped_discriminator.embedding.weight,
        TokenParityDiscriminator().embedding.weight,
    )
    after = mean_logit(trainer).item()
    assert after > before + 0.2, (before, after)


# ---------------------------------------------------------------------------- rewards


def test_each_reward_type_at_known_logits():
    third = math.log(3)  # sigmoid(ln 3) = 3/4
    logit = torch.tensor([-100.0, -third, 0.0, third, 100.0])
    expected = {
        # log D, finite where D underflows
        "log_d": [-100.0, math.log(1 / 4), math.log(1 / 2), math.log(3 / 4), 0.0],
        # -log(1 - D), finite where 1 - D underflows
        "neg_log_1m_d": [0.0, math.log(4 / 3), math.log(2), math.log(4), 100.0],
        "logit": [-100.0, -third, 0.0, third, 100.0],
    }
    for reward_type, values in expected.items():
        reward = reward_from_logit(logit, reward_type)
        torch.testing.assert_close(reward, torch.tensor(values), atol=1e-6, rtol=1e-6)
        # every reward rises with the logit: a generator that fools the discriminator more
        # earns more
        assert (reward.diff() > 0).all()
    with pytest.raises(ValueError, match="reward_type must be"):
        reward_from_logit(logit, "d")


def test_the_trainer_scores_with_its_reward_type(demos):
    trainer = make_trainer("ppo", demos, reward_type="neg_log_1m_d")
    batch = trainer.rollout()
    with torch.no_grad():
        logit = trainer.discriminator(*token_sequences(batch))
    expected = -torch.log(1 - torch.sigmoid(logit.double()))
    torch.testing.assert_close(trainer.score(batch).double(), expected, rtol=1e-5, atol=1e-6)


# A hand-made batch: three responses of 3, 4 and 1 tokens (right padding after the EOS).
HAND_BATCH = Batch(
    prompt_ids=torch.tensor([[0, 7], [4, 9], [0, 6]]),
    prompt_mask=torch.tensor([[0, 1], [1, 1], [0, 1]]),
    response_ids=torch.tensor([[3, 5, 1, 0], [2, 4, 6, 1], [1, 0, 0, 0]]),
    response_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]),
)
HAND_LOGPROBS = torch.tensor(
    [[-1.0, -2.0, -0.5, -9.0], [-0.25, -1.0, -3.0, -0.5], [-2.0, -4.0, -4.0, -4.0]]
)
HAND_REF_LOGPROBS = torch.tensor(
    [[-1.5, -1.0, -0.5, -1.0], [-0.75, -1.0, -2.0, -1.5], [-1.0, -1.0, -1.0, -1.0]]
)
HAND_SCORE = torch.tensor([2.0, -1.0, 0.5])


def test_token_rewards_put_the_score_on_the_last_token_beside_the_kl_penalty(demos, monkeypatch):
    trainer = make_trainer("ppo", demos, kl_coef=0.1)
    asked = []

    def ref_logprobs(model, batch):
        asked.append(model)
        return HAND_REF_LOGPROBS

    monkeypatch.setattr(trainer, "_response_logprobs", ref_logprobs)
    rewards, kl = trainer._token_rewards(HAND_BATCH, HAND_LOGPROBS, HAND_SCORE)
    assert asked == [trainer.reference]
    # logp - ref per row: (0.5, -1, 0 | pad), (0.5, 0, -1, 1), (-1 | pad, pad, pad);
    # reward = -0.1 * (logp - ref), plus the score (2, -1, 0.5) on the last real token.
    expected = torch.tensor(
        [
            [-0.05, 0.1, 0.0 + 2.0, 0.0],
            [-0.05, 0.0, 0.1, -0.1 - 1.0],
            [0.1 + 0.5, 0.0, 0.0, 0.0],
        ]
    )
    torch.testing.assert_close(rewards, expected)
    # mean over sequences of the summed log-ratio: (-0.5 + 0.5 - 1) / 3
    assert kl == pytest.approx(-1 / 3)


def test_token_rewards_without_a_kl_penalty_are_the_score_alone(demos):
    trainer = make_trainer("ppo", demos, kl_coef=0.0)
    assert trainer.reference is None
    rewards, kl = trainer._token_rewards(HAND_BATCH, HAND_LOGPROBS, HAND_SCORE)
    expected = torch.zeros(3, 4)
    expected[0, 2], expected[1, 3], expected[2, 0] = 2.0, -1.0, 0.5
    torch.testing.assert_close(rewards, expected)
    assert kl == 0.0


# ---------------------------------------------------------------------------- advantages


def test_masked_whiten_centres_and_scales_only_the_masked_entries():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, -50.0, 7.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # entries 1, 2, 3: mean 2, variance (1 + 0 + 1) / 3 = 2/3, so -1 and 1 become -+sqrt(3/2)
    s = math.sqrt(3 / 2)
    expected = torch.tensor([[-s, 0.0, 0.0], [s, 0.0, 0.0]])
    out = masked_whiten(x, mask)
    torch.testing.assert_close(out, expected)
    kept = out[mask.bool()]
    assert kept.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert kept.var(unbiased=False).item() == pytest.approx(1.0, abs=1e-6)


def test_reference_gae_at_gamma_09_lam_08_matches_a_hand_computation():
    rewards = torch.tensor([[1.0, 5.0, 2.0], [0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 9.0, 1.0], [0.2, 0.4, 0.6]])
    mask = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    advantages, returns = reference.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # Row 1 skips its masked middle token: A_2 = 2 - 1 = 1; delta_0 = 1 + 0.9 * 1.0 - 0.5
    # = 1.4, A_0 = 1.4 + 0.72 * 1 = 2.12.
    # Row 2: A_2 = 1 - 0.6 = 0.4; delta_1 = 0.9 * 0.6 - 0.4 = 0.14, A_1 = 0.14 + 0.72 * 0.4
    # = 0.428; delta_0 = 0.9 * 0.4 - 0.2 = 0.16, A_0 = 0.16 + 0.72 * 0.428 = 0.46816.
    torch.testing.assert_close(advantages, torch.tensor([[2.12, 0.0, 1.0], [0.46816, 0.428, 0.4]]))
    torch.testing.assert_close(returns, torch.tensor([[2.62, 0.0, 2.0], [0.66816, 0.828, 1.0]]))


@pytest.mark.parametrize("whiten", [False, True])
def test_ppo_step_returns_and_advantages_at_gamma_09_lam_08(whiten, demos, monkeypatch):
    kl_coef, gamma, lam, temperature = 0.1, 0.9, 0.8, 0.7
    trainer = make_trainer(
        "ppo",
        demos,
        kl_coef=kl_coef,
        gamma=gamma,
        lam=lam,
        sample_temperature=temperature,
        whiten_advantages=whiten,
    )
    drift_from_reference(trainer)
    batch = trainer.rollout()
    mask = batch.response_mask
    assert (mask.sum(-1) < mask.shape[1]).any(), "the batch should hold a padded response"

    # Everything the rewards come from, computed before the update moves the policy.
    with torch.no_grad():
        logits, values = trainer.policy(*sequence_inputs(batch))
    logprobs = response_logprobs(logits, batch, temperature)
    ref_logprobs = response_logprobs(lm_logits(trainer.reference, batch), batch, temperature)
    values = response_slice(values, batch.prompt_ids.shape[1])
    score = trainer.score(batch)
    rewards = kl_token_rewards(batch, logprobs, ref_logprobs, score, kl_coef)
    advantages, returns = gae_by_hand(rewards.double(), values.double(), mask, gamma, lam)
    advantages = torch.tensor(advantages, dtype=torch.float32)
    returns = torch.tensor(returns, dtype=torch.float32)
    if whiten:
        advantages = masked_whiten(advantages, mask)

    recorder = Recorder(trainer, "ppo_loss", "value_loss")
    rows = record_minibatches(trainer, monkeypatch)
    logs = trainer.ppo_step(batch)
    assert len(rows) == 4  # 2 epochs of 2 minibatches
    for mb, (args, _, _), (v_args, _, _) in zip(
        rows, recorder.calls["ppo_loss"], recorder.calls["value_loss"], strict=True
    ):
        torch.testing.assert_close(args[2], logprobs[mb], rtol=1e-5, atol=1e-5)  # old logp
        torch.testing.assert_close(args[3], advantages[mb], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(v_args[2], returns[mb], rtol=1e-4, atol=1e-5)
    mean_kl = ((logprobs - ref_logprobs) * mask).sum(-1).mean().item()
    assert abs(mean_kl) > 1e-3  # the policy has drifted, so the penalty is there to check
    assert logs["kl"] == pytest.approx(mean_kl, rel=1e-4, abs=1e-6)
    assert logs["reward"] == pytest.approx(score.mean().item())


# ---------------------------------------------------------------------------- losses


def test_ppo_loss_is_the_clipped_policy_loss_plus_weighted_value_and_mle_terms(demos, monkeypatch):
    c = dict(
        clip_eps=0.1, value_clip=0.05, vf_coef=0.3, entropy_coef=0.01, mle_coef=0.5, kl_coef=0.1
    )
    trainer = make_trainer("ppo", demos, generator_lr=1e-2, **c)
    batch = trainer.rollout()
    recorder = Recorder(trainer, "ppo_loss", "value_loss")
    losses, mles = [], []
    step, nll = trainer._optimizer_step, trainer.demonstration_nll

    def recording_step(loss, module, optimizer):
        losses.append(loss.item())
        step(loss, module, optimizer)

    def recording_nll(*args, **kwargs):
        out = nll(*args, **kwargs)
        mles.append(out[0].item())
        return out

    monkeypatch.setattr(trainer, "_optimizer_step", recording_step)
    monkeypatch.setattr(trainer, "demonstration_nll", recording_nll)
    trainer.ppo_step(batch)
    clipped = 0
    for loss, mle, (args, _, _), (v_args, _, v_out) in zip(
        losses, mles, recorder.calls["ppo_loss"], recorder.calls["value_loss"], strict=True
    ):
        logits, actions, old, adv, mask = args
        policy = reference.ppo_loss(
            logits.detach().double(),
            actions,
            old.double(),
            adv.double(),
            mask,
            clip_eps=c["clip_eps"],
            entropy_coef=c["entropy_coef"],
        )
        # value loss: 0.5 * masked mean of max((v - R)^2, (old + clamp(v - old, +-0.05) - R)^2)
        v, v_old, ret, v_mask = (t.detach().double() for t in v_args)
        v_clip = v_old + (v - v_old).clamp(-c["value_clip"], c["value_clip"])
        value = 0.5 * (torch.maximum((v - ret) ** 2, (v_clip - ret) ** 2) * v_mask).sum()
        value = value / v_mask.sum()
        assert v_out.item() == pytest.approx(value.item(), rel=1e-5)
        expected = policy.loss.item() + c["vf_coef"] * value.item() + c["mle_coef"] * mle
        assert loss == pytest.approx(expected, rel=1e-5, abs=1e-6)
        clipped += policy.clipfrac.item() > 0
    assert len(losses) == 4
    assert clipped > 0, "no ratio left the clip range: clip_eps went unchecked"


def test_reinforce_advantage_is_the_sequence_reward_minus_the_blended_baseline(demos):
    kl_coef, decay, temperature = 0.1, 0.5, 0.7
    trainer = make_trainer(
        "reinforce", demos, kl_coef=kl_coef, baseline_decay=decay, sample_temperature=temperature
    )
    drift_from_reference(trainer)
    trainer.reward_baseline = 0.3  # as if earlier steps had left it there
    batch = trainer.rollout()
    logprobs = response_logprobs(
        lm_logits(trainer.unwrapped_policy.model, batch), batch, temperature
    )
    ref_logprobs = response_logprobs(lm_logits(trainer.reference, batch), batch, temperature)
    score = trainer.score(batch)
    seq_reward = kl_token_rewards(batch, logprobs, ref_logprobs, score, kl_coef).sum(-1)
    baseline = decay * 0.3 + (1 - decay) * seq_reward.mean().item()
    expected = (seq_reward - baseline)[:, None] * batch.response_mask

    recorder = Recorder(trainer, "ppo_loss")
    trainer.reinforce_step(batch)
    ((args, _, _),) = recorder.calls["ppo_loss"]
    torch.testing.assert_close(args[3], expected, rtol=1e-4, atol=1e-5)
    assert trainer.reward_baseline == pytest.approx(baseline, rel=1e-5)


@pytest.mark.parametrize("scale_rewards", [True, False])
def test_grpo_advantages_are_centred_per_group_with_the_kl_in_the_reward(
    scale_rewards, demos, monkeypatch
):
    kl_coef = 0.1
    trainer = make_trainer(
        "grpo",
        demos,
        group_size=2,
        scale_rewards=scale_rewards,
        kl_in_reward=True,
        kl_coef=kl_coef,
        loss_type="dapo",
        clip_eps=0.1,
        clip_eps_high=0.35,
    )
    drift_from_reference(trainer)
    batch = trainer.rollout(group_size=2)
    logprobs = response_logprobs(lm_logits(trainer.unwrapped_policy.model, batch), batch, 1.0)
    ref_logprobs = response_logprobs(lm_logits(trainer.reference, batch), batch, 1.0)
    score = trainer.score(batch)
    seq_reward = kl_token_rewards(batch, logprobs, ref_logprobs, score, kl_coef).sum(-1)
    # groups of two rows: r - mean is +-(r_0 - r_1) / 2, the unbiased std |r_0 - r_1| / sqrt(2)
    expected = []
    for r0, r1 in seq_reward.view(-1, 2).tolist():
        half = (r0 - r1) / 2
        scale = abs(r0 - r1) / math.sqrt(2) + GROUP_STD_EPS if scale_rewards else 1.0
        expected += [half / scale, -half / scale]
    # one advantage per sequence, on each of its tokens (the loss masks the padding)
    expected = torch.tensor(expected)[:, None].expand_as(logprobs)

    recorder = Recorder(trainer, "ppo_loss")
    rows = record_minibatches(trainer, monkeypatch)
    grpo_step(trainer, batch)
    assert len(rows) == 4
    for mb, (args, options, _) in zip(rows, recorder.calls["ppo_loss"], strict=True):
        torch.testing.assert_close(args[3], expected[mb], rtol=1e-4, atol=1e-5)
        # dapo's loss, written out rather than read from grpo.loss_options
        assert options == {
            "clip_eps": 0.1,
            "clip_eps_high": 0.35,
            "loss_agg": "token-mean",
            "ref_logprobs": None,
            "entropy_coef": 0.0,
            "temperature": 1.0,
        }


def test_gumbel_loss_is_the_negated_reward_plus_the_exact_kl(demos):
    kl_coef, tau, temperature = 0.2, 0.5, 0.7
    trainer = make_trainer(
        "gumbel",
        demos,
        discriminator=TokenParityDiscriminator(),
        kl_coef=kl_coef,
        tau_start=tau,
        tau_end=tau,
        sample_temperature=temperature,
    )
    drift_from_reference(trainer)
    seeds = trainer.gumbel_seeds(0)
    batch = trainer.rollout(gumbel_seeds=seeds)
    mask = batch.response_mask
    prompt_len = batch.prompt_ids.shape[1]
    logits = response_slice(lm_logits(trainer.unwrapped_policy.model, batch), prompt_len)
    logits = logits.double() / temperature
    ref_logits = response_slice(lm_logits(trainer.reference, batch), prompt_len)
    logp = torch.log_softmax(logits, -1)
    ref_logp = torch.log_softmax(ref_logits.double() / temperature, -1)
    kl = ((logp.exp() * (logp - ref_logp)).sum(-1) * mask).sum(-1).mean().item()
    assert kl > 1e-3  # the policy has drifted, so the penalty is there to check

    # The reward of the relaxed samples, by hand: token t of row b is
    # softmax((logits / temperature + g) / tau) with g row b of the Gumbel noise of seed t, and
    # the parity discriminator's logit is linear in it.
    parity = TokenParityDiscriminator().embedding.weight[:, 0].double()
    logit = (parity[batch.prompt_ids] * batch.prompt_mask).sum(-1)
    for t, seed in enumerate(seeds):
        g = reference.gumbel_noise(seed, *logits[:, t].shape).double()
        soft = torch.softmax((logits[:, t] + g) / tau, -1)
        logit = logit + (soft @ parity) * mask[:, t]
    reward = torch.nn.functional.logsigmoid(0.5 * logit).mean().item()

    logs = trainer.gumbel_step(batch, seeds)
    assert logs["reward"] == pytest.approx(reward, rel=1e-5)
    assert logs["kl"] == pytest.approx(kl, rel=1e-4)
    assert logs["g_loss"] == pytest.approx(-reward + kl_coef * kl, rel=1e-5)
