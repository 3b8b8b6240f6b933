"""Sweep the launch configuration of the Triton Gumbel-Softmax row kernels on a GPU.

The row kernels stage each block's exponentials in their output and read them back in a second
pass, so how many rows are in flight (programs per SM) decides whether that second pass finds
its blocks in L2. This script times ``gumbel_softmax`` forward + backward (bf16, soft: the
backward from the logits) at one size for each candidate ``GPU_ROW_CONFIG["noise"]`` (largest
BLOCK, num_warps, programs per SM), with eager ``torch.nn.functional.gumbel_softmax`` beside
them, and writes the table as JSON and Markdown. benchmarks/gpu_check.sh runs it.

    python benchmarks/row_config_sweep.py --out DIR [--time-limit 60]
    python benchmarks/row_config_sweep.py --out DIR --device cpu   # a dry run, tiny size
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

CANDIDATES = [(4096, 8, 2), (4096, 8, 1), (4096, 16, 1), (8192, 16, 1), (2048, 4, 4)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--time-limit", type=float, default=60.0, help="seconds; no new candidate after it"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    candidates, repeats = CANDIDATES, 20
    if device.type == "cpu":  # the interpreter ignores the configuration: check the plumbing
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.rows, args.vocab = 4, 300
        candidates, repeats = CANDIDATES[:2], 1

    from rlgaf_fast import gumbel_softmax
    from rlgaf_fast.bench.measure import time_call
    from rlgaf_fast.kernels import gumbel_softmax as row_kernels

    started = time.perf_counter()
    x = torch.randn(args.rows, args.vocab, device=device, dtype=torch.bfloat16)
    x.requires_grad_()
    grad = torch.randn_like(x)

    def step(fn):
        def run():
            x.grad = None
            fn(x).backward(grad)

        run()  # compile and warm up
        return time_call(
            run, device, min_repeats=min(3, repeats), max_repeats=repeats, budget_s=3.0
        ).median_ms

    rows = [{"config": "eager", "ms": step(lambda t: F.gumbel_softmax(t, tau=0.7))}]
    default = row_kernels.GPU_ROW_CONFIG["noise"]
    try:
        for candidate in candidates:
            if time.perf_counter() - started > args.time_limit:
                rows.append({"config": list(candidate), "ms": None, "note": "time limit"})
                continue
            row_kernels.GPU_ROW_CONFIG["noise"] = candidate
            ms = step(lambda t: gumbel_softmax(t, 0.7, seed=1, backend="triton"))
            rows.append({"config": list(candidate), "ms": ms, "default": candidate == default})
    finally:
        row_kernels.GPU_ROW_CONFIG["noise"] = default
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)"
    doc = {"device": name, "shape": [args.rows, args.vocab], "dtype": "bfloat16", "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "row_config_sweep.json").write_text(json.dumps(doc, indent=1) + "\n")
    eager = rows[0]["ms"]
    lines = [
        f"gumbel_softmax fwd+bwd [{args.rows}, {args.vocab}] bf16 on {name}",
        "| GPU_ROW_CONFIG['noise'] (BLOCK, warps, programs/SM) | median ms | vs eager |",
        "|---|---|---|",
    ]
    for row in rows:
        ms = row["ms"]
        label = row["config"] if row["config"] == "eager" else tuple(row["config"])
        label = f"{label} (default)" if row.get("default") else label
        speed = f"{eager / ms:.2f}x" if ms else row.get("note", "")
        lines.append(f"| {label} | {ms:.3f} | {speed} |" if ms else f"| {label} | | {speed} |")
    (args.out / "row_config_sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
