"""Shared fixtures of the RLGAF tests: tiny config-built models and generated demonstrations."""

import pytest
import torch

from rlgaf_fast.rlgaf import RLGAFConfig, RLGAFTrainer, build_transformer_discriminator
from rlgaf_fast.rlgaf.data import synthetic_examples
from rlgaf_fast.rlgaf.models import build_causal_lm
from rlgaf_fast.rlgaf.modes import mode_spec

VOCAB, EOS, PAD = 32, 1, 0


@pytest.fixture(autouse=True)
def one_thread():
    # Two OpenMP threads on a shared 2-core machine are several times slower than one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def demos():
    return synthetic_examples(64, VOCAB, seed=0, eos_token_id=EOS, pad_token_id=PAD)


def make_trainer(mode, demos, *, reward_fn=None, discriminator=None, seed=0, **config):
    """A trainer on a 1-layer 32-wide Llama generator and discriminator, fixed initial weights."""
    torch.manual_seed(seed)
    generator = build_causal_lm(
        VOCAB, hidden_size=32, num_layers=1, num_heads=2, eos_token_id=EOS, pad_token_id=PAD
    )
    if discriminator is None:
        discriminator = build_transformer_discriminator(
            VOCAB, hidden_size=32, num_layers=1, num_heads=2, pad_token_id=PAD
        )
    values = dict(
        mode=mode,
        total_steps=3,
        batch_size=8,
        minibatch_size=4,
        max_new_tokens=6,
        generator_lr=1e-3,
        discriminator_lr=1e-3,
        progress_bar=False,
        seed=seed,
    )
    values.update(config)
    if mode_spec(mode).reward_fn and reward_fn is None:

        def reward_fn(batch):  # a fixed reward: how often token 5 appears
            return (batch.response_ids == 5).float().sum(-1)

    return RLGAFTrainer(
        RLGAFConfig(**values),
        generator,
        discriminator,
        demos,
        reward_fn=reward_fn,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
