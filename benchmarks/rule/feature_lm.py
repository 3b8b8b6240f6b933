"""Train a wider MLE model on the rule task's demonstrations: a feature model for the lm
discriminators (``rlgaf-fast oracle --discriminator lm --d-features DIR``).

    python benchmarks/rule/feature_lm.py benchmarks/rule/feature-lm-64x4

An sft run of the full preset (the same 10,000 demonstrations and test set as the warm start,
data seed 0) with a 4-layer Llama of width 64 instead of the generator's 2 layers of width 32,
2,000 MLE steps of 64 at 2e-3 (AdamW, cosine schedule). It writes what any sft run writes
(metrics.json with its validity and NLL_test, generator.safetensors, ...); the temperature sweep
is left out (temperature 1.0 only).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from rlgaf_fast.bench.oracle import run_oracle
from rlgaf_fast.bench.rule_task import RULE_PRESETS, RuleTask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="output directory")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    preset = dataclasses.replace(
        RULE_PRESETS["full"],
        gen_hidden=args.hidden,
        gen_layers=args.layers,
        sft_steps=args.steps,
        sft_lr=args.lr,
        sweep_temperatures=(1.0,),
    )
    metrics = run_oracle(RuleTask(), "sft", args.out, preset=preset, seed=0)
    print(metrics["final"], f"{metrics['time_s']:.0f} s")


if __name__ == "__main__":
    main()
