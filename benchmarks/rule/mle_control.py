"""The MLE control of an adversarial rule-task run: the same warm start trained further by MLE
alone, with the run's optimiser settings, and scored as run_oracle scores a run.

    python benchmarks/rule/mle_control.py benchmarks/rule/sft OUT --steps 1000 --lr 5e-4

The adversarial runs with ``mle_coef`` > 0 keep taking MLE steps on the demonstrations; if the
warm start is not converged, those steps alone raise validity and lower NLL_test. This run
tells that part apart: AdamW at ``--lr`` (constant, no weight decay, gradient norm clipped at 1),
batches of 64 demonstrations, the shipped model a moving average of the weights (0.99), as in
the adversarial phase. OUT/metrics.json holds ``final`` (10,000 samples at temperature 1.0), the
temperature sweep of the trained model (5,000 samples each) and ``time_s``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from rlgaf_fast.bench.oracle import (
    evaluate,
    load_warm_start,
    oracle_data,
    oracle_examples,
    plot_curves,
)
from rlgaf_fast.bench.rule_task import RULE_PRESETS, RuleTask
from rlgaf_fast.rlgaf.config import RLGAFConfig
from rlgaf_fast.rlgaf.trainer import RLGAFTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("init", type=Path, help="the warm start (an sft run's directory)")
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    task, preset = RuleTask(), RULE_PRESETS["full"]
    torch.manual_seed(args.seed)
    generator, warm = load_warm_start(args.init, preset, task)
    demos, test = oracle_data(task, warm["data_seed"], preset.num_demos, preset.num_test)
    history: list[dict] = []

    def eval_fn(trainer: RLGAFTrainer) -> dict:
        result, _ = evaluate(
            trainer.evaluation_model,
            task,
            test[: preset.num_eval],
            preset.num_eval,
            seed=3000 + trainer.step_count,
        )
        history.append({"phase": "mle", "step": trainer.step_count, **result})
        return result

    config = RLGAFConfig(
        mode="sft",
        total_steps=args.steps,
        batch_size=64,
        minibatch_size=64,
        generator_lr=args.lr,
        generator_ema=0.99,
        seed=args.seed,
        max_new_tokens=task.seq_len,
        extra={"eval_every": preset.eval_every},
        progress_bar=True,
        tensorboard=False,
    )
    trainer = RLGAFTrainer(
        config, generator, demonstrations=oracle_examples(demos), eval_fn=eval_fn
    )
    eval_fn(trainer)
    trainer.train()
    trainer.close()
    model = trainer.evaluation_model
    final, _ = evaluate(model, task, test, preset.num_final, seed=5000)
    metrics = {
        "task": task.name,
        "mode": "mle-control",
        "seed": args.seed,
        "data_seed": warm["data_seed"],
        "steps": args.steps,
        "lr": args.lr,
        "warm_start": warm["final"],
        "final": final,
        "temperature_sweep": [
            {
                "temperature": t,
                **evaluate(model, task, test, preset.num_sweep, seed=6000, temperature=t)[0],
            }
            for t in preset.sweep_temperatures
        ],
        "history": history,
        "time_s": time.perf_counter() - started,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    plot_curves(metrics, args.out / "curves.png")
    print(json.dumps({"final": final, "time_s": round(metrics["time_s"], 1)}))


if __name__ == "__main__":
    main()
