"""Control for ``mle_coef``: continue MLE alone from the warm start, with the adversarial runs'
generator optimiser (learning rate 2e-4, weight average 0.99) and as many updates of 32
demonstrations as a 300-iteration ``ppo`` run makes (2 epochs of 2 minibatches: 1200).

It tells how much of an ``mle_coef`` run's result the extra MLE alone would give.

    python benchmarks/oracle/mle_continuation.py \
        --oracle seqgan --init runs/oracle/sft \
        --out benchmarks/oracle/seeds/mle-continuation-control.json
"""

import argparse
import json

import torch

from rlgaf_fast.bench.oracle import (
    OracleLSTM,
    copied_fraction,
    evaluate,
    load_warm_start,
    oracle_data,
    oracle_examples,
)
from rlgaf_fast.bench.seqgan_data import seqgan_oracle_path
from rlgaf_fast.rlgaf import RLGAFConfig, RLGAFTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--oracle", required=True, help="seqgan, or target_params_py3.pkl")
    parser.add_argument("--init", required=True, help="the sft run's directory")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    oracle = OracleLSTM.from_file(seqgan_oracle_path(args.oracle))
    generator, warm = load_warm_start(args.init)
    demos, test = oracle_data(oracle, warm["data_seed"])
    config = RLGAFConfig(
        mode="sft",
        total_steps=args.steps,
        batch_size=args.batch,
        minibatch_size=args.batch,
        generator_lr=2e-4,
        generator_ema=0.99,
        progress_bar=True,
        tensorboard=False,
    )
    trainer = RLGAFTrainer(config, generator, demonstrations=oracle_examples(demos))
    trainer.train()
    final, samples = evaluate(trainer.evaluation_model, oracle, test, 10_000, seed=5000)
    final["copied"] = copied_fraction(samples, demos)
    result = {"steps": args.steps, "batch": args.batch, "warm_start": warm["final"], "final": final}
    print(json.dumps(result, indent=1))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
