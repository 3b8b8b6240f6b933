"""Where the LM discriminator's equilibrium lies: the warm start's mean log-probability per
token of its training demonstrations, of held-out oracle samples, and of its own samples at
temperatures 0.8 to 1.2, with their NLL_oracle and NLL_test (the quality-diversity frontier at
a finer grid than run_oracle's sweep, with the same sample seed).

LMDiscriminator scores tokens by these log-probabilities (and the prediction entropy), so the
generator is pushed until its samples' mean log-probability matches the demonstrations'.
With --d-fit-steps N, each row also gives the mean log-probability under the feature model
that run_oracle builds with d_fit_steps=N (the warm start fit N more steps to the
demonstrations, seed 0), which the discriminator then reads instead.

    python benchmarks/oracle/lm_features.py --oracle seqgan \
        --init runs/oracle/sft --out benchmarks/oracle/lm_features.json
"""

import argparse
import json

import torch

from rlgaf_fast.bench.oracle import (
    PRESETS,
    START_TOKEN,
    OracleLSTM,
    evaluate,
    fit_features,
    load_warm_start,
    oracle_data,
)
from rlgaf_fast.bench.seqgan_data import seqgan_oracle_path

TEMPERATURES = (0.8, 0.85, 0.9, 0.93, 0.95, 1.0, 1.1, 1.2)


@torch.no_grad()
def token_features(model: torch.nn.Module, tokens: torch.Tensor) -> dict:
    ids = torch.cat([torch.full_like(tokens[:, :1], START_TOKEN), tokens], 1)
    logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[:, :-1].float(), -1)
    token_logp = logp.gather(-1, tokens[..., None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return {"mean_logp": token_logp.mean().item(), "mean_entropy": entropy.mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--oracle", required=True, help="seqgan, or target_params_py3.pkl")
    parser.add_argument("--init", required=True, help="an sft run's directory (seed 0)")
    parser.add_argument("--num", type=int, default=5000, help="sequences per row")
    parser.add_argument("--d-fit-steps", type=int, default=0)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    p = PRESETS["full"]
    oracle = OracleLSTM.from_file(seqgan_oracle_path(args.oracle))
    model, warm = load_warm_start(args.init, p)
    demos, test = oracle_data(oracle, warm["data_seed"], p.num_demos, p.num_test)
    model.eval()
    sequences = [demos[: args.num], test[: args.num]]
    rows = [
        {"sequences": "training demonstrations", **token_features(model, sequences[0])},
        {"sequences": "held-out oracle samples", **token_features(model, sequences[1])},
    ]
    for t in TEMPERATURES:
        scores, samples = evaluate(model, oracle, test, p.num_sweep, seed=6000, temperature=t)
        sequences.append(samples[: args.num])
        rows.append(
            {
                "sequences": f"warm start at temperature {t}",
                **token_features(model, sequences[-1]),
                **scores,
            }
        )
    if args.d_fit_steps:
        fit = fit_features(model, demos, args.d_fit_steps, seed=0).eval()
        for row, tokens in zip(rows, sequences, strict=True):
            row["mean_logp_fit"] = token_features(fit, tokens)["mean_logp"]
    for row in rows:
        print(", ".join(f"{k}={v:.3f}" if isinstance(v, float) else str(v) for k, v in row.items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
