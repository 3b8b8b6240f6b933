"""What the lm-bigram discriminator's feature sees: the fraction of bigram positions of a set
of sequences whose bigram occurs in the 10,000 training demonstrations, for held-out oracle
samples and for the warm start's own samples at temperatures 1.0 to 0.8 (5,000 each).

    python benchmarks/oracle/bigram_coverage.py \
        --oracle seqgan --init runs/oracle/sft \
        --out benchmarks/oracle/bigram_coverage.json
"""

import argparse
import json

import torch

from rlgaf_fast.bench.oracle import OracleLSTM, load_warm_start, oracle_data, sample_generator
from rlgaf_fast.bench.seqgan_data import seqgan_oracle_path


def coverage(tokens: torch.Tensor, seen: set[tuple[int, int]]) -> float:
    rows = tokens.tolist()
    hits = sum((a, b) in seen for row in rows for a, b in zip(row, row[1:], strict=False))
    return hits / (len(rows) * (len(rows[0]) - 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--oracle", required=True, help="seqgan, or target_params_py3.pkl")
    parser.add_argument("--init", required=True, help="the sft run's directory")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    oracle = OracleLSTM.from_file(seqgan_oracle_path(args.oracle))
    generator, warm = load_warm_start(args.init)
    demos, test = oracle_data(oracle, warm["data_seed"])
    seen = {(a, b) for row in demos.tolist() for a, b in zip(row, row[1:], strict=False)}
    rows = [{"sequences": "held-out oracle samples", "coverage": coverage(test[:5000], seen)}]
    for temperature in (1.0, 0.9, 0.85, 0.8):
        samples = sample_generator(generator, 5000, seed=6000, temperature=temperature)
        rows.append(
            {
                "sequences": f"warm start at temperature {temperature}",
                "coverage": coverage(samples, seen),
            }
        )
    for row in rows:
        print(f"{row['sequences']:40s} {row['coverage']:.4f}")
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
