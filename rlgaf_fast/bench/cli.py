"""``rlgaf-fast bench``: the benchmark suite from the command line (registered in
rlgaf_fast/cli.py): its arguments, the run, and the short plain-text summary."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from rlgaf_fast.bench.presets import BASELINES, OPS, PEERS


def add_bench_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "bench",
        help="benchmark the fused ops against eager PyTorch and torch.compile",
        description="Time every op x backend (and eager, torch.compile) forward and "
        "forward+backward; check each against the reference first; write results.json, "
        "results.md and PNG plots under --out (default bench-results/<device>/<preset>/).",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--quick",
        dest="preset",
        action="store_const",
        const="quick",
        help="small sizes with the CPU targets: fp32 fwd+bwd of gumbel_softmax "
        "[512, 32000] >= 15x eager and >= 5x torch.compile, of ppo_loss [2048, 32000] "
        ">= 8x eager and >= 3x torch.compile with extra memory <= its gradient + O(N); "
        "gumbel_softmax_embedding's extra memory O(N*D), not O(N*V) (default; aims at "
        "under 3 minutes on an idle 2-core CPU)",
    )
    size.add_argument(
        "--full",
        dest="preset",
        action="store_const",
        const="full",
        help="vocabularies 32000, 128256 and 151936 at 1k-16k tokens (up to 4k on a "
        "CPU), fp32 and bf16",
    )
    size.add_argument(
        "--goals",
        dest="preset",
        action="store_const",
        const="goals",
        help="the cases that carry a target (the GPU targets on a GPU, with a few "
        "watched cases beside them)",
    )
    size.add_argument(
        "--tiny",
        dest="preset",
        action="store_const",
        const="tiny",
        help="seconds; a smoke test of the suite itself",
    )
    size.add_argument(
        "--peers",
        dest="preset",
        action="store_const",
        const="peers",
        help="rlgaf_fast beside TRL's chunked log-prob function, Liger-Kernel's fused linear "
        "GRPO loss and Cut Cross-Entropy (those installed: pip install rlgaf_fast[peers]), "
        "eager and torch.compile: per-token log-probs + entropy and the GRPO loss from hidden "
        "states, fwd+bwd, at N=4096, H=1024, V=32000 fp32 on a CPU and N=8192, H=4096, "
        "V=128256 bf16 on a GPU (or --shape, --dtype)",
    )
    p.add_argument(
        "--ops",
        nargs="+",
        metavar="OP",
        choices=OPS,
        help=f"restrict to these ops ({' '.join(OPS)})",
    )
    p.add_argument(
        "--shape",
        nargs=3,
        type=int,
        metavar=("N", "H", "V"),
        help="with --peers: tokens, hidden size and vocabulary",
    )
    p.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), help="with --peers: the dtype"
    )
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--note", help="a note recorded with the results (e.g. other load)")
    p.add_argument("--out", help="output folder")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--max-plots", type=int, help="write at most this many PNG files")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--time-limit",
        type=float,
        metavar="S",
        help="start no new run after S seconds (the rest become skipped rows)",
    )
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile baseline")
    p.add_argument(
        "--train",
        action="store_true",
        help="time training steps of the adversarial loop (ppo and gumbel modes) "
        "with use_fused_kernels off and on, instead of the op cases",
    )
    p.add_argument(
        "--trl",
        action="store_true",
        help="time GRPO training steps of a small Llama through TRL's GRPOTrainer, with TRL's own "
        "log-probs and with rlgaf_fast.integrations.trl.enable: step time, peak memory and "
        "whether the training curves agree (--tiny: a seconds-long smoke run), instead of the "
        "op cases",
    )
    p.add_argument(
        "--train-steps",
        type=int,
        default=None,
        help="timed steps per configuration for --train and --trl",
    )
    p.add_argument(
        "--docs",
        metavar="FILE.md",
        help="only regenerate the benchmarks page (docs/benchmarks.md) from every "
        "benchmarks/results/**/results.json (tiny runs left out)",
    )
    p.set_defaults(func=run_bench, preset=None)


def run_bench(args: argparse.Namespace) -> int:
    from rlgaf_fast.bench import report, suite

    if args.docs:
        out = Path(args.docs).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report.benchmarks_page(suite.REPO_ROOT / "benchmarks" / "results", out))
        print(f"wrote {out}")
        return 0
    if args.train:
        from rlgaf_fast.bench import train

        return train.run(args)
    if args.trl:
        from rlgaf_fast.bench import trl_grpo

        return trl_grpo.run(args)
    preset = args.preset or "quick"
    if (args.shape or args.dtype) and preset != "peers":
        print("--shape and --dtype go with --peers", file=sys.stderr)
        return 2
    if args.shape and min(args.shape) < 1:
        print(f"--shape N H V must be positive, got {args.shape}", file=sys.stderr)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    doc = suite.run_suite(
        preset,
        ops=args.ops,
        out_dir=args.out,
        device=args.device,
        plots=not args.no_plots,
        max_plots=args.max_plots,
        progress=not args.no_progress,
        time_limit_s=args.time_limit,
        compile_baseline=not args.no_compile,
        shape=tuple(args.shape) if args.shape else None,
        dtype=args.dtype,
        note=args.note,
    )
    print(summary(doc))
    where = Path(args.out) if args.out else suite.default_out_dir(_device(doc), preset)
    print(
        f"\nwrote {where}/results.json, results.md"
        + "".join(f", {name}" for name in doc.get("plots", []))
    )
    # A wrong result, or a fused kernel that raised, fails the run; a baseline or another
    # library that raised (torch.compile on a shape it cannot handle) or is not installed, or a
    # run skipped at the time limit, does not.
    failed = [
        r
        for r in doc["rows"]
        if r["check"] is False
        or (r["status"] == "error" and r["provider"] not in (*BASELINES, *PEERS))
    ]
    return 1 if failed else 0


def _device(doc: dict):
    import torch

    return torch.device(doc["environment"]["device_type"])


def summary(doc: dict) -> str:
    """A short plain-text table: one line per case and provider, then the targets."""
    lines = [
        f"{doc['environment']['device']} - preset {doc['preset']} - {doc.get('elapsed_s', 0):.0f} s"
    ]
    lines.append(
        f"{'case':<58} {'provider':<13} {'check':<6} {'median ms':>10} "
        f"{'peak MiB':>9} {'vs eager':>9} {'vs compile':>10} {'%ceil':>6}"
    )
    for row in doc["rows"]:

        def fmt(value, spec):
            return "-" if value is None else format(value, spec)

        check = {True: "pass", False: "FAIL", None: "n/a"}[row["check"]]
        if row["status"] != "ok":
            lines.append(
                f"{row['case'][:58]:<58} {row['provider']:<13} {row['status']:<6} "
                f"{(row['error'] or '')[:60]}"
            )
            continue
        lines.append(
            f"{row['case'][:58]:<58} {row['provider']:<13} {check:<6} "
            f"{fmt(row['median_ms'], '10.3f')} "
            f"{fmt(row['peak_bytes'] and row['peak_bytes'] / 2**20, '9.1f')} "
            f"{fmt(row.get('speedup_vs_eager'), '8.2f')}x "
            f"{fmt(row.get('speedup_vs_compile'), '9.2f')}x "
            f"{fmt(row.get('fraction_of_ceiling') and 100 * row['fraction_of_ceiling'], '5.0f')}%"
        )
    if doc.get("goals"):
        lines.append("targets:")
        for goal in doc["goals"]:
            met = {True: "MET", False: "NOT MET", None: "not measured"}[goal["met"]]
            value = "-" if goal["value"] is None else f"{goal['value']:.4g}"
            lines.append(
                f"  [{met}] {goal['text']} ({goal['provider_row']}: {goal['metric']} = {value})"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m rlgaf_fast.bench ...``: the same as ``rlgaf-fast bench ...``."""
    parser = argparse.ArgumentParser(prog="python -m rlgaf_fast.bench")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_bench_parser(subparsers)
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)
