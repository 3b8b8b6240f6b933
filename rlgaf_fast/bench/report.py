"""Reports of a benchmark run: the raw JSON, a Markdown table, PNG plots, and the benchmarks page
(docs/benchmarks.md) generated from every committed results file (never typed by hand).

    rlgaf-fast bench --docs docs/benchmarks.md
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

MIB = 2**20


def write_json(doc: dict, path: Path) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    os.replace(tmp, path)  # a reader never sees a half-written file


def load(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


# --- formatting ---------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _mib(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / MIB:.3g}" if value < 100 * MIB else f"{value / MIB:.0f}"


def _throughput(row: dict) -> str:
    value = row.get("achieved_per_s")
    if not value:
        return "-"
    if row["bound"] == "bytes":
        return f"{value / 1e9:.3g} GB/s"
    return f"{value / 1e12:.3g} TFLOP/s" if value >= 1e12 else f"{value / 1e9:.3g} GFLOP/s"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _check(row: dict) -> str:
    if row["status"] != "ok":
        return row["status"]
    return {True: "pass", False: "FAIL", None: "n/a"}[row["check"]]


def _bandwidth_line(ceilings: dict) -> str:
    return (
        f"Ceilings measured in this run: copy bandwidth "
        f"{ceilings['bytes_per_s'] / 1e9:.3g} GB/s ({ceilings['bytes_method']}); matmul "
        f"{ceilings['flops_per_s'] / 1e12:.3g} TFLOP/s ({ceilings['flops_method']})."
    )


def _goal_value(goal: dict) -> str:
    value = goal["value"]
    if value is None:
        return "-"
    if goal["metric"] == "peak_bytes":
        return f"{value / MIB:.4g} MiB (limit {goal['at_most'] / MIB:.4g})"
    if goal["metric"] == "fraction_of_ceiling":
        return _percent(value)
    return _ratio(value)


def goals_table(doc: dict) -> list[str]:
    if not doc.get("goals"):
        return []
    lines = ["| target | provider | measured | met |", "|---|---|---|---|"]
    for goal in doc["goals"]:
        met = {True: "yes", False: "**no**", None: "not measured"}[goal["met"]]
        if goal["note"]:
            met += f" ({goal['note'][:80]})"
        lines.append(f"| {goal['text']} | {goal['provider_row']} | {_goal_value(goal)} | {met} |")
    return lines


def _timing(row: dict, error_width: int) -> str:
    """A row's median (p20-p80) in ms, or the start of its error."""
    if row["status"] == "ok":
        return f"{_ms(row['median_ms'])} ({_ms(row['p20_ms'])}-{_ms(row['p80_ms'])})"
    return (row["error"] or "")[:error_width].replace("|", "/")


def case_table(rows: list[dict]) -> list[str]:
    lines = [
        "| case | provider | check | median ms (p20-p80) | peak MiB | speed-up vs eager / "
        "compile | memory vs eager / compile | throughput | % of ceiling |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        timing = _timing(row, 90)
        lines.append(
            f"| {row['case']} | {row['provider']} | {_check(row)} | {timing} | "
            f"{_mib(row['peak_bytes'])} | {_ratio(row.get('speedup_vs_eager'))} / "
            f"{_ratio(row.get('speedup_vs_compile'))} | {_ratio(row.get('mem_ratio_vs_eager'))} / "
            f"{_ratio(row.get('mem_ratio_vs_compile'))} | {_throughput(row)} | "
            f"{_percent(row.get('fraction_of_ceiling'))} |"
        )
    return lines


def _load_note(env: dict) -> str:
    start, end = env.get("load_average_start"), env.get("load_average_end")
    if not start or env.get("device_type") != "cpu":
        return ""
    text = f" Load average (1 min) {start[0]:.1f} at the start"
    text += f", {end[0]:.1f} at the end" if end else ""
    return text + (
        f" on {env['device'].split('(')[-1].split(' cores')[0]} cores: other work "
        "shared the CPU, times are noisier than on an idle machine."
        if start[0] > 1.5
        else "."
    )


def _header(doc: dict) -> list[str]:
    env = doc["environment"]
    return [
        f"Device: **{env['device']}**; torch {env['torch']}, triton {env['triton']}, "
        f"CUDA {env['cuda']}; backends {', '.join(env['backends'])}; "
        f"{env['date']}; commit {env['commit']}; preset `{doc['preset']}`"
        + (f", {doc['elapsed_s']:.0f} s" if doc.get("elapsed_s") else "")
        + "."
        + _load_note(env)
        + (f" Note: {doc['note']}." if doc.get("note") else ""),
        "",
        _bandwidth_line(doc["ceilings"]),
        "",
        f"Peak memory: the extra bytes above the inputs, {doc['memory_method']}. Speed-up: "
        "the provider's median time divided into the baseline's; memory ratio: the "
        "provider's peak over the baseline's. Throughput and % of ceiling follow the "
        "roofline: the bytes a fused kernel must move and the FLOPs of its matrix "
        "products each take a least time at the ceilings above; the longer of the two "
        "bounds the case, and % of ceiling is that time over the measured one.",
    ]


def peer_table(rows: list[dict]) -> list[str]:
    """The rows of the --peers cases side by side: what each provider computes, its time and
    peak memory, and both over rlgaf_fast's; empty where the run has no peer case."""
    rows = [r for r in rows if "computes" in r]
    if not rows:
        return []
    lines = [
        "| case | provider | computes | check | median ms (p20-p80) | peak MiB | time / ours | "
        "peak / ours |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        timing = _timing(row, 120)
        lines.append(
            f"| {row['case']} | {row['provider']} | {row['computes']} | {_check(row)} | "
            f"{timing} | {_mib(row['peak_bytes'])} | {_ratio(row.get('time_ratio_vs_ours'))} | "
            f"{_ratio(row.get('mem_ratio_vs_ours'))} |"
        )
    return lines


def markdown(doc: dict, heading: str = "#") -> str:
    lines = [f"{heading} Benchmark results", "", *_header(doc), ""]
    goals = goals_table(doc)
    if goals:
        lines += [f"{heading}# Targets", "", *goals, ""]
    peers = peer_table(doc["rows"])
    if peers:
        lines += [f"{heading}# Peers", "", *peers, ""]
    ops: dict[str, list[dict]] = {}
    for row in doc["rows"]:
        ops.setdefault(row["op"], []).append(row)
    for op, rows in ops.items():
        lines += [f"{heading}# {op}", "", *case_table(rows), ""]
    return "\n".join(lines)


def write_markdown(doc: dict, path: Path) -> None:
    path.write_text(markdown(doc))


# --- plots ------------------------------------------------------------------------------------


def _series(rows: list[dict], axis: str) -> list[tuple[str, dict, list[dict]]]:
    """Groups of ok rows that differ only in ``axis`` ("v" or "n") with at least 2 values:
    (title, the fixed fields, rows)."""
    fixed_fields = [f for f in ("op", "mode", "dtype", "variant", "d", "n", "v") if f != axis]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["status"] == "ok":
            groups.setdefault(tuple(row[f] for f in fixed_fields), []).append(row)
    found = []
    for key, members in groups.items():
        if len({r[axis] for r in members}) >= 2:
            fixed = dict(zip(fixed_fields, key, strict=True))
            other = "n" if axis == "v" else "v"
            title = (
                f"{fixed['op']} {fixed['mode']} {fixed['dtype']}"
                f"{' ' + fixed['variant'] if fixed['variant'] else ''}, "
                f"{other.upper()}={fixed[other]}" + (f", d={fixed['d']}" if fixed["d"] else "")
            )
            found.append((title, fixed, members))
    return found


def write_plots(doc: dict, out: Path, max_plots: int | None = None) -> list[str]:
    """One PNG per op: time and peak memory against V and against N, one line per provider."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    except ImportError:
        return []
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    blank = NullFormatter()
    env = doc["environment"]
    written = []
    ops = list(dict.fromkeys(row["op"] for row in doc["rows"]))
    for op in ops:
        rows = [r for r in doc["rows"] if r["op"] == op]
        panels = [(axis, s) for axis in ("v", "n") for s in _series(rows, axis)][:4]
        if not panels:
            continue
        if max_plots is not None and len(written) >= max_plots:
            break
        fig, axes = plt.subplots(len(panels), 2, figsize=(11, 3.6 * len(panels)), squeeze=False)
        for (axis, (title, _, members)), (time_ax, mem_ax) in zip(panels, axes, strict=True):
            providers = list(dict.fromkeys(r["provider"] for r in members))
            for provider in providers:
                points = sorted(
                    (r[axis], r["median_ms"], r["peak_bytes"])
                    for r in members
                    if r["provider"] == provider
                )
                xs = [p[0] for p in points]
                time_ax.plot(xs, [p[1] for p in points], marker="o", label=provider)
                mem_ax.plot(
                    xs, [(p[2] or math.nan) / MIB for p in points], marker="o", label=provider
                )
            label = "vocabulary size V" if axis == "v" else "tokens N"
            for ax, ylabel in ((time_ax, "median time (ms)"), (mem_ax, "peak extra memory (MiB)")):
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_xticks(sorted({r[axis] for r in members}))  # the measured sizes
                ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                for axis_ticks in (ax.xaxis, ax.yaxis):
                    axis_ticks.set_major_formatter(plain)
                    axis_ticks.set_minor_formatter(blank)
                ax.set_xlabel(label)
                ax.set_ylabel(ylabel)
                ax.set_title(title, fontsize=9)
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=8)
        fig.suptitle(f"{op} - {env['device']} - {env['date'][:10]}", fontsize=10)
        fig.tight_layout()
        path = out / f"{op}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path.name)
    if max_plots is None or len(written) < max_plots:
        written += _peer_plot(doc, out, plt)
    return written


def _peer_plot(doc: dict, out: Path, plt) -> list[str]:
    """peers.png: per --peers case, the median time and the peak memory of each provider that
    ran, as bars; [] where the run has no peer case."""
    cases: dict[str, list[dict]] = {}
    for row in doc["rows"]:
        if "computes" in row and row["status"] == "ok" and row["median_ms"]:
            cases.setdefault(row["case"], []).append(row)
    if not cases:
        return []
    fig, axes = plt.subplots(len(cases), 2, figsize=(12, 0.5 + 2.6 * len(cases)), squeeze=False)
    for (case, rows), (time_ax, mem_ax) in zip(cases.items(), axes, strict=True):
        names = [r["provider"] for r in rows]
        time_ax.barh(names, [r["median_ms"] for r in rows])
        mem_ax.barh(names, [(r["peak_bytes"] or 0) / MIB for r in rows])
        for ax, label in ((time_ax, "median time (ms)"), (mem_ax, "peak extra memory (MiB)")):
            ax.invert_yaxis()
            ax.set_xlabel(label)
            ax.set_title(case, fontsize=9)
            ax.grid(True, axis="x", alpha=0.3)
            ax.tick_params(axis="y", labelsize=8)
    env = doc["environment"]
    fig.suptitle(f"peers - {env['device']} - {env['date'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "peers.png", dpi=90)
    plt.close(fig)
    return ["peers.png"]


# --- the benchmarks page (docs/benchmarks.md) ----------------------------------------------------

INTRO = """\
# Benchmarks

Generated by `rlgaf-fast bench --docs docs/benchmarks.md` from the JSON files under
`benchmarks/results/`; do not edit by hand. Rerun it after committing a new results file.

## How the numbers are taken

- `rlgaf-fast bench --quick`: small sizes and the CPU targets (under 3 minutes on an idle
  2-core CPU). `--full`: vocabularies 32000 to 151936, 1k to 16k tokens. `--goals`: the cases
  that carry a target (the GPU targets on a GPU). `--train`: training steps of the adversarial
  loop with `use_fused_kernels` off and on. `--trl`: GRPO training steps through TRL's
  GRPOTrainer, TRL's own log-probs against rlgaf_fast's (section below). On a GPU machine,
  `bash benchmarks/gpu_check.sh` runs the `--goals` preset among its stages (see
  [gpu.md](gpu.md)).
- Each run writes `results.json`, `results.md` and PNG plots under
  `bench-results/<device>/<preset>/` in the current directory, or under `--out`; committed
  results are in `benchmarks/results/`.
- Providers: **eager** is the PyTorch code one writes without this library
  (`torch.nn.functional.gumbel_softmax`, then `@ weight` for the embedding;
  `rlgaf_fast.reference` for the PPO loss; `hidden @ weight.T` then the reference loss for the
  fused linear loss); **compile** is `torch.compile` of the same code; **cpp** and **triton**
  are rlgaf_fast's fused backends (one H200 run of 2026-11-27 also has rows of **cuda**, a CUDA
  C++ backend since removed: it was slower than Triton on every case); **matmuls** times only
  the three matrix products of the fused linear loss (its floor).
- Every result is compared with `rlgaf_fast.reference` before it is timed (the check column;
  eager and compile Gumbel-Softmax draw torch's own noise, so for them only finiteness and
  rows summing to 1 are checked).
- Time: median of many runs, with the 20th and 80th percentiles. Peak memory: the extra bytes
  above the inputs (how it is measured is named per run). Speed-up: the provider's median time
  divided into the baseline's; memory ratio: the provider's peak over the baseline's.
- Throughput and % of ceiling follow the roofline: the bytes a fused kernel must move and the
  FLOPs of its matrix products each take a least time at the ceilings measured in the same
  run; the longer of the two bounds the case, and % of ceiling is that time over the measured
  one.
- The protocol is described in [design.md](design.md#benchmark-protocol).
"""

PEERS_INTRO = """## Peers

`rlgaf-fast bench --peers` (the other libraries come with `pip install rlgaf_fast[peers]`) gives
the same inputs to eager PyTorch, torch.compile, rlgaf_fast and other libraries' fused LM-head
code, checks every result against `rlgaf_fast.reference`, then times forward+backward from
hidden states:

- per-token log-probs and entropy (`fused_linear_logprobs`): rlgaf_fast's
  `fused_linear_logprobs`; TRL's `ChunkedLogProbFunction` (the fused LM head of its
  GRPOTrainer, with the trainer's vocabulary chunk); Cut Cross-Entropy's `linear_cross_entropy`
  per token, which gives log-probs only (no entropy: less work; checked against the reference
  of the log-probs alone; its torch.compile implementation on a CPU, its Triton kernels on a
  GPU);
- the GRPO loss (`fused_linear_ppo_loss` variant `grpo,beta=0.04`: Liger's loss_type `grpo`,
  clip epsilon 0.2, KL to a reference policy with the k3 estimator and beta 0.04, 8 sequences
  with completion lengths from T/2 to T): rlgaf_fast's `fused_linear_ppo_loss` and
  Liger-Kernel's `LigerFusedLinearGRPOLoss` (its compiled loss, one sequence per chunk).

**matmuls** is the floor (the three matrix products alone). "time / ours" and "peak / ours"
divide a provider's median time and peak memory by rlgaf_fast's. A library that is not
installed shows as "unavailable" with the reason. rlgaf_fast's `fused_linear_logprobs` appears
twice: by default (row `cpp`) it forms each chunk's logits twice, in forward and again in
backward (their gradient needs the incoming gradients of both outputs, known only then), four
matrix products where eager, torch.compile and Cut Cross-Entropy, which keep the full logits,
do three; with `save_logits=True` (row `cpp (save_logits)`) it keeps them too, does three, and
frees each chunk of them as the backward finishes it. Its `fused_linear_ppo_loss` knows its
gradient in forward and does three.
"""


def _clean_goal_text(text: str) -> str:
    """A target's text without the numbered prefix that older results files carry."""
    return re.sub(r"^issue \d+:\s*", "", text)


def _date(doc: dict) -> str:
    return doc["environment"]["date"]


def _run_header(doc: dict) -> list[str]:
    env = doc["environment"]
    date = env["date"].replace("T", " ").split("+")[0][:16] + " UTC"
    versions = f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}"
    text = (
        f"**{env['device']}**, {date}; {versions}; backends available: "
        f"{', '.join(env['backends'])}; preset `{doc['preset']}`"
    )
    if doc.get("elapsed_s"):
        text += f", {doc['elapsed_s']:.0f} s"
    text += "."
    start, end = env.get("load_average_start"), env.get("load_average_end")
    if env.get("device_type") == "cpu" and start:
        text += f" Load average (1 min) {start[0]:.1f} at the start"
        text += f", {end[0]:.1f} at the end." if end else "."
    ceilings = doc["ceilings"]
    return [
        text,
        "",
        f"Ceilings measured in this run: copy bandwidth {ceilings['bytes_per_s'] / 1e9:.3g} GB/s "
        f"({ceilings['bytes_method']}); matmul {ceilings['flops_per_s'] / 1e12:.3g} TFLOP/s "
        f"({ceilings['flops_method']}). Peak memory: {doc['memory_method']}.",
    ]


def _train_section(doc: dict) -> list[str]:
    env = doc["environment"]
    date = env["date"].replace("T", " ").split("+")[0][:16] + " UTC"
    shape = ", ".join(f"{k}={v}" for k, v in doc["shape"].items() if k != "steps")
    lines = [
        "#### Training steps (`rlgaf-fast bench --train`)",
        "",
        f"{env['device']}, {date}; torch {env['torch']}. Llama-shaped model from a config "
        f"({shape}); median of {doc['steps']} steps after {doc.get('warmup_steps', 1)} warm-up "
        f"step(s). Target: {doc['goal']}.",
        "",
        "| mode | use_fused_kernels | step s (median, best) | tokens/s | peak MiB |",
        "|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        if "error" in r:
            error = r["error"][:80].replace("|", "/")
            lines.append(f"| {r['mode']} | {r['use_fused_kernels']} | error: {error} | | |")
            continue
        best = f", {r['best_step_s']:.3g}" if "best_step_s" in r else ""
        peak = r["peak_bytes"] / MIB if r.get("peak_bytes") else None
        lines.append(
            f"| {r['mode']} | {r['use_fused_kernels']} | {r['step_s']:.3g}{best} | "
            f"{r['tokens_per_s']:.4g} | {'-' if peak is None else f'{peak:.0f}'} |"
        )
    lines.append("")
    for mode, ratio in doc.get("ratios", {}).items():
        parts = [f"{k.replace('_', ' ')} {v:.2f}" for k, v in ratio.items() if v is not None]
        lines.append(f"- {mode}: " + "; ".join(parts) + ".")
    return [*lines, ""]


def _run_section(path: Path, doc: dict, out: Path) -> list[str]:
    env = doc["environment"]
    title = f"### {env['date'][:10]} {env['date'][11:16]} UTC, preset `{doc['preset']}`"
    if doc["preset"] == "peers":
        title = f"### {env['device']}, {env['date'][:10]} {env['date'][11:16]} UTC"
    lines = [title, "", *_run_header(doc), ""]
    if doc.get("note"):
        lines += [f"Note: {doc['note'].rstrip('.')}.", ""]
    goals = [{**goal, "text": _clean_goal_text(goal["text"])} for goal in doc.get("goals") or []]
    if goals:
        lines += ["#### Targets", "", *goals_table({"goals": goals}), ""]
    peers = peer_table(doc["rows"])
    if peers:
        lines += ["#### Peers", "", *peers, ""]
    else:
        lines += ["#### All cases", "", *case_table(doc["rows"]), ""]
    for name in doc.get("plots", []):
        rel = os.path.relpath(path.parent / name, out.parent)
        lines += [f"![{name} on {env['device']}, {env['date'][:10]}]({rel})", ""]
    train = path.parent / "train.json"
    if train.exists():
        lines += _train_section(load(train))
    source = os.path.relpath(path, out.parent)
    lines += [f"Source: [{path.name}]({source}).", ""]
    return lines


TRL_GRPO_INTRO = """## GRPO training step through TRL

`rlgaf-fast bench --trl` trains a Llama built from its config (random weights, a word-level
tokenizer built in memory, a rule-based reward) with TRL's `GRPOTrainer` twice from the same seed:
with TRL's own per-token log-probabilities and entropies (its fused LM head, which TRL 1.16's
GRPOTrainer always uses; GRPOConfig has no switch for it) and with
`rlgaf_fast.integrations.trl.enable(trainer)`. Step time: each optimizer step (generation, loss,
backward, update), median over the timed steps of every run of a path; "generation" is TRL's
`_generate_and_score_completions`, the same work on both paths, and "rest of the step" the step
without it. Peak memory: one further step's `training_step`, measured as the op cases measure it.
The logged loss, reward, gradient norm and entropy of every run are compared with TRL's first run
at the tolerance of the adapter's equality test. With one update per generation (TRL's default) the
GRPO loss is zero up to rounding, as the ratios are 1 and the advantages of a group sum to zero;
the gradient norm and the entropy are the curves that show the updates agreeing.
"""


def _trl_grpo_sections(results_dir: Path, out: Path) -> list[str]:
    """The --trl runs under ``results_dir``, newest first; [] where there is none."""
    from rlgaf_fast.bench import trl_grpo

    runs = [(path, load(path)) for path in sorted(results_dir.rglob("trl_grpo.json"))]
    if not runs:
        return []
    lines = [TRL_GRPO_INTRO]
    for path, doc in sorted(runs, key=lambda run: _date(run[1]), reverse=True):
        env = doc["environment"]
        source = os.path.relpath(path, out.parent)
        lines += [
            f"### {env['device']}, {env['date'][:10]} {env['date'][11:16]} UTC",
            "",
            *trl_grpo.section(doc),
            "",
            f"Source: [{path.name}]({source}); every step's values in "
            f"[{path.with_suffix('.md').name}]({source.removesuffix('.json')}.md).",
            "",
        ]
    return lines


def benchmarks_page(results_dir: Path, out: Path) -> str:
    """The benchmarks page from every results.json under ``results_dir``: one section per device,
    its runs newest first; plots and sources linked relative to ``out``."""
    runs = []
    for path in sorted(results_dir.rglob("results.json")):
        doc = load(path)
        if doc.get("preset") == "tiny":  # smoke tests of the suite, not measurements
            continue
        runs.append((path, doc))
    devices: dict[str, list[tuple[Path, dict]]] = {}
    peer_runs = []
    for path, doc in sorted(runs, key=lambda run: _date(run[1]), reverse=True):
        if doc.get("preset") == "peers":
            peer_runs.append((path, doc))
        else:
            devices.setdefault(doc["environment"]["device"], []).append((path, doc))
    lines = [INTRO]
    if peer_runs:
        lines.append(PEERS_INTRO)
        for path, doc in peer_runs:
            lines += _run_section(path, doc, out)
    lines += _trl_grpo_sections(results_dir, out)
    for device, device_runs in devices.items():
        lines += [f"## {device}", ""]
        for path, doc in device_runs:
            lines += _run_section(path, doc, out)
    return "\n".join(lines).rstrip() + "\n"
