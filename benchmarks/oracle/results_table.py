"""Prints a Markdown table of the oracle runs under a folder (one directory per mode, each with
the metrics.json that `rlgaf-fast oracle` writes), as docs/seqgan-oracle.md shows them.

    python benchmarks/oracle/results_table.py RUNS_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# NLL_oracle of the SeqGAN paper (Yu et al., 2017, table 1) on the same oracle
SEQGAN_PUBLISHED = {
    "random": 10.310,
    "MLE": 9.038,
    "scheduled sampling": 8.985,
    "PG-BLEU": 8.946,
    "SeqGAN": 8.736,
}


def results_table(root: str | Path) -> str:
    """A Markdown table of the runs under ``root`` (one directory per mode, as the README
    shows): NLL_oracle, NLL_test and the distinct fraction of each mode, the MLE temperature
    sweep, and SeqGAN's published NLL_oracle figures."""
    root = Path(root)
    lines = [
        "| run | NLL_oracle | NLL_test | distinct | vs. MLE warm start | time |",
        "|---|---|---|---|---|---|",
    ]
    for mode in ("sft", "ppo", "gumbel", "reinforce", "rlhf"):
        path = root / mode / "metrics.json"
        if not path.exists():
            continue
        m = json.loads(path.read_text())
        f = m["final"]
        delta = ""
        if "warm_start" in m:
            w = m["warm_start"]
            delta = (
                f"NLL_oracle {f['nll_oracle'] - w['nll_oracle']:+.3f}, "
                f"NLL_test {f['nll_test'] - w['nll_test']:+.3f}"
            )
        name = "MLE (sft)" if mode == "sft" else mode
        lines.append(
            f"| {name} | {f['nll_oracle']:.3f} | {f['nll_test']:.3f} | "
            f"{f['distinct']:.3f} | {delta} | {m['time_s'] / 60:.1f} min |"
        )
        for row in m.get("temperature_sweep", []):
            if row["temperature"] != 1.0:
                lines.append(
                    f"| MLE at temperature {row['temperature']} | "
                    f"{row['nll_oracle']:.3f} | {row['nll_test']:.3f} | "
                    f"{row['distinct']:.3f} | | |"
                )
    for name, value in SEQGAN_PUBLISHED.items():
        lines.append(f"| SeqGAN paper: {name} | {value:.3f} | | | | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python benchmarks/oracle/results_table.py RUNS_DIR")
    print(results_table(sys.argv[1]))
