"""The results table of docs/rule-task.md from rule-task runs' metrics.json.

    python benchmarks/rule/table.py benchmarks/rule/sft benchmarks/rule/ppo-seed0 ...

The first directory is the MLE warm start (an sft run): its temperature sweep gives the rows
"MLE at temperature t" and the best validity any temperature reaches; each other run is read
against it (validity points above that best, NLL_test above the warm start's).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def row(name: str, m: dict, best: float | None, warm_nll_test: float | None, time_s) -> str:
    cells = [
        name,
        f"{100 * m['validity']:.1f}%",
        "n/a" if m["nll_true_valid"] is None else f"{m['nll_true_valid']:.3f}",
        f"{m['nll_test']:.3f}",
        f"{m['distinct']:.3f}",
    ]
    if best is None:
        cells.append("")
    else:
        cells.append(
            f"validity {100 * (m['validity'] - best):+.1f} points, "
            f"NLL_test {m['nll_test'] - warm_nll_test:+.3f}"
        )
    cells.append("" if time_s is None else f"{time_s / 60:.1f} min")
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="the sft run first, then the others")
    args = parser.parse_args()
    sft = json.loads((args.runs[0] / "metrics.json").read_text())
    sweep = sft["temperature_sweep"]
    best = max(r["validity"] for r in sweep)
    lines = [
        "| run | validity | NLL_true(valid) | NLL_test | distinct | vs. best MLE temperature "
        "| time |",
        "|---|---|---|---|---|---|---|",
        row("MLE (sft)", sft["final"], None, None, sft["time_s"]),
    ]
    lines += [row(f"MLE at temperature {r['temperature']}", r, None, None, None) for r in sweep]
    for run in args.runs[1:]:
        m = json.loads((run / "metrics.json").read_text())
        lines.append(row(run.name, m["final"], best, sft["final"]["nll_test"], m["time_s"]))
    print("\n".join(lines))
    print(f"\nbest MLE validity: {100 * best:.1f}%; goal: {100 * best + 20:.1f}%")


if __name__ == "__main__":
    main()
