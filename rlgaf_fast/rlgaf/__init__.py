"""RLGAF: adversarial RL fine-tuning of a causal LM against a discriminator.

``RLGAFConfig`` holds the knobs, ``RLGAFTrainer`` runs the loop (modes sft, ppo, reinforce,
gumbel, rlhf: the table in ``modes``), ``checkpoint`` saves and restores it. The SeqGAN synthetic
benchmark is ``rlgaf_fast.bench.oracle``.
"""

from rlgaf_fast.rlgaf.config import RLGAFConfig
from rlgaf_fast.rlgaf.discriminator import (
    CNNDiscriminator,
    LMDiscriminator,
    build_transformer_discriminator,
)
from rlgaf_fast.rlgaf.trainer import NonFiniteLossError, RLGAFTrainer

__all__ = [
    "RLGAFConfig",
    "RLGAFTrainer",
    "NonFiniteLossError",
    "CNNDiscriminator",
    "LMDiscriminator",
    "build_transformer_discriminator",
]
