"""Run by test_distributed.py under `accelerate launch` with two CPU processes: trains a few PPO
and Gumbel steps and writes, per rank, a fingerprint of the parameters and of its rollouts."""

import json
import sys

import torch

from rlgaf_fast.rlgaf import RLGAFConfig, RLGAFTrainer, build_transformer_discriminator
from rlgaf_fast.rlgaf.data import synthetic_examples
from rlgaf_fast.rlgaf.models import build_causal_lm


def fingerprint(module: torch.nn.Module) -> list[float]:
    return [p.detach().double().sum().item() for p in module.parameters()]


def main(out_dir: str, modes: str) -> None:
    torch.set_num_threads(1)
    for mode in modes.split(","):
        run(out_dir, mode)


def run(out_dir: str, mode: str) -> None:
    torch.manual_seed(0)  # the same initial weights everywhere (DDP also broadcasts rank 0's)
    generator = build_causal_lm(32, hidden_size=32, num_layers=1, eos_token_id=1)
    discriminator = build_transformer_discriminator(32, hidden_size=32, num_layers=1)
    initial = fingerprint(generator)
    config = RLGAFConfig(mode=mode, total_steps=3, batch_size=8, minibatch_size=4,
                         max_new_tokens=8, generator_lr=1e-3, discriminator_lr=1e-3,
                         progress_bar=False)
    trainer = RLGAFTrainer(config, generator, discriminator, synthetic_examples(64, 32),
                           eos_token_id=1, pad_token_id=0)
    history = trainer.train()
    rollout = trainer.rollout()
    result = {"rank": trainer.rank, "world": trainer.accelerator.num_processes,
              "distributed_type": str(trainer.accelerator.distributed_type),
              "initial": initial, "generator": fingerprint(trainer.unwrapped_policy),
              "discriminator": fingerprint(trainer.unwrapped_discriminator),
              "rollout": rollout.response_ids.tolist(), "history": history,
              # DTensor under FSDP2: each rank holds a shard of every parameter.
              "param_types": sorted({type(p).__name__ for p in trainer.policy.parameters()})}
    with open(f"{out_dir}/{mode}-rank{trainer.rank}.json", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
