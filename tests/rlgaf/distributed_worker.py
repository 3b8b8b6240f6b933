"""Run by test_distributed.py under `accelerate launch` with two CPU processes: trains a few
steps of each mode and writes, per rank, a fingerprint of the parameters and of its rollouts.
With "fsdp" as third argument the processes shard the models with FSDP2 instead of DDP, and a
checkpoint is saved and loaded back into a fresh trainer."""

import json
import os
import sys

import torch

from rlgaf_fast.rlgaf import RLGAFConfig, RLGAFTrainer, build_transformer_discriminator
from rlgaf_fast.rlgaf.data import synthetic_examples
from rlgaf_fast.rlgaf.discriminator import LMDiscriminator
from rlgaf_fast.rlgaf.models import build_causal_lm


def fingerprint(module: torch.nn.Module | None) -> list[float]:
    if module is None:
        return []
    return [p.detach().double().sum().item() for p in module.parameters()]


def fsdp2_accelerator():
    """An FSDP2 accelerator on CPU processes. accelerate selects FSDP only on GPU-type devices
    (on a CPU it falls back to DDP), so the test sets its state as a GPU launch with
    --use_fsdp --fsdp_version 2 would; FSDP2 itself then shards over gloo."""
    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    accelerator = Accelerator(cpu=True)
    # Every AcceleratorState copies PartialState's type, so both are set.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    # Each decoder layer sharded on its own, inside the sharded model, as launches usually do.
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
    )
    return accelerator


def main(out_dir: str, modes: str, sharding: str = "ddp") -> None:
    torch.set_num_threads(1)
    for mode in modes.split(","):
        run(out_dir, mode, fsdp=sharding == "fsdp")
    # End without interpreter shutdown, all results being written. A gloo worker thread may
    # still be releasing the last all-gather's tensors, which takes the GIL; a thread that asks
    # for the GIL during shutdown is ended by Python, and the unwinding through gloo's C++
    # aborts the process ("terminate called without an active exception"; seen in about one
    # FSDP2 launch in ten on the 2-core machine, the main thread in Py_FinalizeEx).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def make_trainer(run_name: str, fsdp: bool) -> RLGAFTrainer:
    """``run_name``: a mode, with a Llama classifier as discriminator, or ``MODE-lm`` for an
    LMDiscriminator with bigram counts (its embedding carries a token-id channel)."""
    mode, _, kind = run_name.partition("-")
    torch.manual_seed(0)  # the same initial weights everywhere (DDP also broadcasts rank 0's)
    # Tied input and output embeddings (as the oracle's generator) in the "lm" runs: one
    # weight under two names in the checkpoints.
    generator = build_causal_lm(
        32, hidden_size=32, num_layers=1, eos_token_id=1, tie_embeddings=kind == "lm"
    )
    discriminator = build_transformer_discriminator(32, hidden_size=32, num_layers=1)
    if kind == "lm":
        lm = build_causal_lm(32, hidden_size=32, num_layers=1, eos_token_id=1, tie_embeddings=True)
        discriminator = LMDiscriminator(lm, bigram_sequences=torch.randint(0, 32, (50, 8)))
    config = RLGAFConfig(
        mode=mode,
        total_steps=3,
        batch_size=8,
        minibatch_size=4,
        max_new_tokens=8,
        generator_lr=1e-3,
        discriminator_lr=1e-3,
        generator_ema=0.5,
        straight_through=kind == "lm",
        progress_bar=False,
    )
    return RLGAFTrainer(
        config,
        generator,
        discriminator,
        synthetic_examples(64, 32),
        eos_token_id=1,
        pad_token_id=0,
        accelerator=fsdp2_accelerator() if fsdp else None,
    )


def run(out_dir: str, mode: str, fsdp: bool) -> None:
    trainer = make_trainer(mode, fsdp)
    with trainer.unsharded(trainer.policy):
        initial = fingerprint(trainer.unwrapped_policy)
    history = trainer.train()
    rollout = trainer.rollout()
    with trainer.unsharded(trainer.policy, trainer.discriminator):
        result = {
            "rank": trainer.rank,
            "world": trainer.accelerator.num_processes,
            "distributed_type": str(trainer.accelerator.distributed_type),
            "initial": initial,
            "generator": fingerprint(trainer.unwrapped_policy),
            "discriminator": fingerprint(trainer.discriminator and trainer.unwrapped_discriminator),
            "ema": fingerprint(trainer.evaluation_model),
            "rollout": rollout.response_ids.tolist(),
            "history": history,
        }
    # DTensor under FSDP2: each rank holds a shard of every parameter.
    models = [m for m in (trainer.policy, trainer.discriminator) if m is not None]
    result["param_types"] = sorted({type(p).__name__ for m in models for p in m.parameters()})
    result["fsdp"] = trainer.fsdp
    if fsdp:
        path = trainer.save_checkpoint(f"{out_dir}/{mode}-checkpoint")
        resumed = make_trainer(mode, fsdp)
        resumed.load_checkpoint(path)
        with resumed.unsharded(resumed.policy, resumed.discriminator):
            result["resumed"] = {
                "generator": fingerprint(resumed.unwrapped_policy),
                "discriminator": fingerprint(
                    resumed.discriminator and resumed.unwrapped_discriminator
                ),
                "ema": fingerprint(resumed.evaluation_model),
            }
        # The next step of both continues identically: the same loss and the same updated
        # generator (reinforce's first loss is zero whatever the weights; the update is not).
        result["next_step"] = []
        for t in (trainer, resumed):
            loss = t.step()["g_loss"]
            with t.unsharded(t.policy):
                result["next_step"].append([loss, fingerprint(t.unwrapped_policy)])
    with open(f"{out_dir}/{mode}-rank{trainer.rank}.json", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
