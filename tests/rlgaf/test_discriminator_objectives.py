"""The discriminator's objectives (config.discriminator_loss): binary cross-entropy, and the
Bradley-Terry pairwise loss over a demonstration and a generation for the same prompt."""

import math

import pytest
import torch

from rlgaf_fast.rlgaf import RLGAFConfig, RLGAFTrainer
from rlgaf_fast.rlgaf.discriminator import build_transformer_discriminator, discriminator_loss
from rlgaf_fast.rlgaf.models import build_causal_lm

from .conftest import EOS, VOCAB, make_trainer


def softplus(x):
    return math.log1p(math.exp(x))


REAL = [2.0, -1.0, 0.5]
FAKE = [0.0, 1.0, 0.5]


def test_bce_matches_a_hand_computation():
    # -log sigmoid(s) for a demonstration, -log(1 - sigmoid(s)) for a generation
    terms = [softplus(-s) for s in REAL] + [softplus(s) for s in FAKE]
    loss = discriminator_loss(torch.tensor(REAL), torch.tensor(FAKE), "bce")
    assert loss.item() == pytest.approx(sum(terms) / 6, rel=1e-6)


def test_bradley_terry_matches_a_hand_computation():
    # -log sigmoid(s_demo - s_gen) per pair: differences 2, -2, 0
    terms = [softplus(-(r - f)) for r, f in zip(REAL, FAKE, strict=True)]
    loss = discriminator_loss(torch.tensor(REAL), torch.tensor(FAKE), "bradley_terry")
    assert loss.item() == pytest.approx(sum(terms) / 3, rel=1e-6)
    assert sum(terms) / 3 == pytest.approx((softplus(-2) + softplus(2) + math.log(2)) / 3)
    # a shift of every score changes nothing: the objective is a ranking
    shifted = discriminator_loss(torch.tensor(REAL) + 5, torch.tensor(FAKE) + 5, "bradley_terry")
    assert shifted.item() == pytest.approx(loss.item(), rel=1e-6)
    with pytest.raises(ValueError, match="row for row"):
        discriminator_loss(torch.tensor(REAL), torch.tensor(FAKE[:2]), "bradley_terry")


def test_the_objective_is_validated():
    with pytest.raises(ValueError, match="discriminator_loss must be one of"):
        RLGAFConfig(discriminator_loss="hinge")


def test_pairs_are_the_demonstrations_of_the_generated_prompts(demos):
    trainer = make_trainer("grpo", demos, discriminator_loss="bradley_terry")
    fake = trainer.rollout(group_size=4)
    real = trainer.demos.for_prompts(fake.prompt_ids, fake.prompt_mask)
    assert torch.equal(real.prompt_ids, fake.prompt_ids)
    assert torch.equal(real.prompt_mask, fake.prompt_mask)
    by_prompt = {}
    for row in demos:
        by_prompt.setdefault(tuple(row["prompt_ids"]), row["response_ids"])
    for ids, mask, response, response_mask in zip(
        real.prompt_ids, real.prompt_mask, real.response_ids, real.response_mask, strict=True
    ):
        prompt = tuple(ids[mask.bool()].tolist())
        assert response[response_mask.bool()].tolist() == by_prompt[prompt][:6]


def test_prompts_without_demonstrations_are_refused(demos):
    prompts = [{"prompt_ids": [31, 30, 29, 28, 27, 26], "response_ids": [1]}]
    generator = build_causal_lm(VOCAB, hidden_size=16, num_layers=1, num_heads=2)
    discriminator = build_transformer_discriminator(
        VOCAB, hidden_size=16, num_layers=1, num_heads=2
    )
    config = RLGAFConfig(
        mode="reinforce", batch_size=4, minibatch_size=4, discriminator_loss="bradley_terry"
    )
    with pytest.raises(ValueError, match="discriminator_loss 'bradley_terry' pairs"):
        RLGAFTrainer(config, generator, discriminator, demos, prompts, eos_token_id=EOS)
    # bce needs no pairs
    RLGAFTrainer(
        RLGAFConfig(mode="reinforce", batch_size=4, minibatch_size=4),
        generator,
        discriminator,
        demos,
        prompts,
        eos_token_id=EOS,
    )


def pairwise_loss(trainer, fake, real):
    with torch.no_grad():
        return discriminator_loss(trainer.score(real), trainer.score(fake), "bradley_terry").item()


def test_bradley_terry_training_lowers_the_pairwise_loss(demos):
    trainer = make_trainer(
        "grpo",
        demos,
        total_steps=12,
        d_steps=2,
        discriminator_loss="bradley_terry",
        reward_type="logit",
    )
    # fixed pairs, scored before and after: the logged loss is one noisy batch's
    fake = trainer.rollout(sub=99, group_size=4)
    real = trainer.demos.for_prompts(fake.prompt_ids, fake.prompt_mask)
    before = pairwise_loss(trainer, fake, real)
    history = trainer.train()
    after = pairwise_loss(trainer, fake, real)
    assert before == pytest.approx(math.log(2), abs=0.05)  # an untrained ranking is a coin flip
    assert after < before - 0.1
    assert sum(h["d_acc_pairs"] for h in history[-4:]) / 4 > 0.5
