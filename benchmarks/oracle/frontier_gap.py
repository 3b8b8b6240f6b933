"""How far each oracle run ends from the MLE warm start's temperature frontier.

For each run directory (holding metrics.json): its final NLL_oracle and NLL_test against the
warm start, and its NLL_test minus the frontier's at the same NLL_oracle. The frontier is the
warm start sampled at temperatures 0.8 to 1.2 (lm_features.json), interpolated linearly. A
negative gap is a run that got ahead of simply cooling the warm start.

    python benchmarks/oracle/frontier_gap.py benchmarks/oracle/ppo benchmarks/oracle/seeds/*
"""

import argparse
import json
from pathlib import Path

FEATURES = Path(__file__).with_name("lm_features.json")


def frontier_points(path: Path = FEATURES) -> list[tuple[float, float]]:
    rows = json.loads(path.read_text())
    return sorted((r["nll_oracle"], r["nll_test"]) for r in rows if "nll_oracle" in r)


def frontier_nll_test(points: list[tuple[float, float]], nll_oracle: float) -> float | None:
    """The frontier's NLL_test at ``nll_oracle``; None outside the measured temperatures."""
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x0 <= nll_oracle <= x1:
            return y0 + (y1 - y0) * (nll_oracle - x0) / (x1 - x0)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument(
        "--features",
        type=Path,
        default=FEATURES,
        help="lm_features.py's output for the runs' warm start",
    )
    args = parser.parse_args()
    points = frontier_points(args.features)
    print("| run | NLL_oracle | NLL_test | vs. frontier |")
    print("|---|---|---|---|")
    for run in args.runs:
        if not (run / "metrics.json").is_file():
            continue
        metrics = json.loads((run / "metrics.json").read_text())
        if "warm_start" not in metrics:
            continue
        warm, final = metrics["warm_start"], metrics["final"]
        frontier = frontier_nll_test(points, final["nll_oracle"])
        gap = "outside" if frontier is None else f"{final['nll_test'] - frontier:+.3f}"
        print(
            f"| {run.name} | {final['nll_oracle'] - warm['nll_oracle']:+.3f} "
            f"| {final['nll_test'] - warm['nll_test']:+.3f} | {gap} |"
        )


if __name__ == "__main__":
    main()
