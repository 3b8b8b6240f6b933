"""``rlgaf-fast bench --trl``: GRPO training steps of a small causal LM through TRL's
GRPOTrainer, with TRL's own per-token log-probabilities and with rlgaf_fast's
(``rlgaf_fast.integrations.trl.enable``).

TRL 1.16's GRPOTrainer always computes log-probabilities and entropies through its own fused LM
head (``add_fused_lm_head`` around ``ChunkedLogProbFunction``, vocabulary tiles of 32768 columns);
GRPOConfig has no switch for it, so "TRL" here is that fused head. On a device without Triton (a
CPU) it projects every position of the batch, prompt and padding included; rlgaf_fast's adapter
projects only the completion tokens.

Each path trains a fresh model from the same seed: a Llama built from its config (random weights),
a word-level tokenizer built in memory and a rule-based reward (the fraction of words with an even
index), nothing downloaded. ``WARMUP_STEPS`` untimed steps, ``steps`` timed ones, then one step
whose peak memory is measured as the rest of the suite measures it (``bench.measure.peak_memory``
around the trainer's ``training_step``: generation, loss forward and backward; on a CPU the peak
of the tensor allocations the profiler records). The paths run in turn, ``rounds`` times in the
order TRL, ours, ours, TRL, ..., so that a drift of the machine's load touches both alike; the
step time reported is the median over every timed step of a path. The logged curves (loss,
reward, gradient norm, entropy) of every run are compared with TRL's first run at the tolerance
of the adapter's equality test: rewards exactly, the rest within ``RTOL`` relative (``ATOL``
absolute).
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

# Sizes per device kind. cpu: a few seconds per step on one core of a 2-core machine, with a real
# vocabulary so that the LM head is a large share of the training step. tiny: seconds in all, the
# smoke test's size.
SHAPES: dict[str, dict[str, Any]] = {
    "cpu": {
        "vocab_size": 32000,
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "prompt_words": 8,
        "prompts_per_step": 2,
        "num_generations": 4,
        "max_completion_length": 64,
        "steps": 8,
        "rounds": 2,
    },
    "tiny": {
        "vocab_size": 512,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "prompt_words": 3,
        "prompts_per_step": 2,
        "num_generations": 2,
        "max_completion_length": 8,
        "steps": 2,
        "rounds": 1,
    },
}
WARMUP_STEPS = 2
LEARNING_RATE = 1e-3
SEED = 0
SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")
# The curves compared, and the tolerance of the adapter's equality test: rewards must be equal, the
# rest within RTOL relative; ATOL floors the GRPO loss, which is zero up to rounding when the
# advantages cancel.
METRICS = ("loss", "reward", "grad_norm", "entropy")
RTOL, ATOL = 1e-4, 1e-6
TRL_PATH, OURS_PATH = "trl", "rlgaf_fast"
COMPUTES = {
    TRL_PATH: "TRL's fused LM head (ChunkedLogProbFunction), every position",
    OURS_PATH: "rlgaf_fast.fused_linear_logprobs via integrations.trl.enable, completion tokens",
}
GOAL = (
    "GRPO step of a tiny model through TRL, CPU: our path at least as fast as TRL's own and no "
    "more memory; identical training curves"
)


# --- the model, tokenizer, data and reward (also the adapter's equality test's) ------------------


def word_tokenizer(vocab_size: int):
    """A word-level ``PreTrainedTokenizerFast`` built in memory: ids 0-3 are <pad>, <unk>, <bos>,
    <eos>, then the words ``w0`` ... ``w{vocab_size - 5}`` (whitespace-separated)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be > {len(SPECIAL_TOKENS)}, got {vocab_size}")
    words = [f"w{i}" for i in range(vocab_size - len(SPECIAL_TOKENS))]
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
    )


def llama(
    vocab_size: int,
    hidden_size: int,
    intermediate_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    max_position_embeddings: int,
    seed: int = SEED,
    **config: Any,
):
    """A float32 ``LlamaForCausalLM`` with random weights drawn from ``seed``, its special token
    ids those of :func:`word_tokenizer` and an untied LM head ``[vocab_size, hidden_size]``;
    ``config`` goes to ``LlamaConfig``."""
    import transformers

    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            num_key_value_heads=num_attention_heads,
            max_position_embeddings=max_position_embeddings,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
            tie_word_embeddings=False,
            **config,
        )
    )


def word_prompts(n: int, words: int, vocab_size: int):
    """A ``datasets.Dataset`` of ``n`` prompts of ``words`` words each, a fixed pattern over the
    vocabulary of :func:`word_tokenizer`."""
    import datasets

    count = vocab_size - len(SPECIAL_TOKENS)
    return datasets.Dataset.from_dict(
        {"prompt": [" ".join(f"w{(7 * i + j) % count}" for j in range(words)) for i in range(n)]}
    )


def even_words(completions: list[str], **kwargs: Any) -> list[float]:
    """The reward of each completion: the fraction of its words with an even index (0 for an
    empty completion); dense enough that a group's rewards differ and the advantages are nonzero."""
    rewards = []
    for completion in completions:
        words = completion.split()
        even = sum(w[1:].isdigit() and int(w[1:]) % 2 == 0 for w in words)
        rewards.append(even / len(words) if words else 0.0)
    return rewards


def curves(trainer: Any) -> dict[str, list[float | None]]:
    """The logged ``METRICS`` of every step of a trained ``trainer`` (None where a step did not
    log one, e.g. the reward of a step that reuses a generation)."""
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return {key: [entry.get(key) for entry in logs] for key in METRICS}


def compare_curves(theirs: dict[str, list], ours: dict[str, list]) -> dict:
    """The curves of two runs side by side, at the equality test's tolerance.

    Returns ``{"identical": bool, "max_rel_diff": {metric: float}, "first_mismatch": str | None}``:
    identical when both logged the same steps, the rewards are equal and every other value is
    within ``RTOL`` relative or ``ATOL`` absolute; max_rel_diff is ``|a - b| / max(|a|, ATOL)``
    at its largest (``inf`` where one run logged a value the other did not).
    """
    worst = {key: 0.0 for key in METRICS}
    mismatch = None
    for key in METRICS:
        a_values, b_values = theirs.get(key, []), ours.get(key, [])
        if len(a_values) != len(b_values):
            worst[key] = math.inf
            mismatch = mismatch or f"{key}: {len(a_values)} steps against {len(b_values)}"
            continue
        for step, (a, b) in enumerate(zip(a_values, b_values, strict=True)):
            if a is None and b is None:
                continue
            if a is None or b is None:
                worst[key] = math.inf
                mismatch = mismatch or f"{key} at step {step}: {a} against {b}"
                continue
            worst[key] = max(worst[key], abs(a - b) / max(abs(a), ATOL))
            same = a == b if key == "reward" else math.isclose(a, b, rel_tol=RTOL, abs_tol=ATOL)
            if not same:
                mismatch = mismatch or f"{key} at step {step}: {a} against {b}"
    return {"identical": mismatch is None, "max_rel_diff": worst, "first_mismatch": mismatch}


# --- one training run ---------------------------------------------------------------------------


def _trainer(shape: dict, steps: int, output_dir: str):
    import trl

    prompts_per_step = shape["prompts_per_step"]
    generations = shape["num_generations"]
    settings = dict(
        output_dir=output_dir,
        per_device_train_batch_size=prompts_per_step * generations,
        num_generations=generations,
        max_completion_length=shape["max_completion_length"],
        max_steps=steps,
        learning_rate=LEARNING_RATE,
        logging_steps=1,
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        seed=SEED,
        save_strategy="no",
        disable_tqdm=True,
        # float32: the two paths then agree to float32 rounding, which the curves are held to
        bf16=False,
    )
    model = llama(
        vocab_size=shape["vocab_size"],
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_hidden_layers"],
        num_attention_heads=shape["num_attention_heads"],
        max_position_embeddings=2 + shape["prompt_words"] + shape["max_completion_length"],
    )
    return trl.GRPOTrainer(
        model=model,
        reward_funcs=even_words,
        args=trl.GRPOConfig(**settings),
        train_dataset=word_prompts(
            steps * prompts_per_step, shape["prompt_words"], shape["vocab_size"]
        ),
        processing_class=word_tokenizer(shape["vocab_size"]),
    )


def train_path(path: str, shape: dict, steps: int, device: torch.device) -> dict:
    """One run of ``path`` (``TRL_PATH`` or ``OURS_PATH``): a fresh trainer, ``WARMUP_STEPS`` +
    ``steps`` timed steps + one memory-measured step.

    Returns the step times (s, each optimizer step: generation, loss, backward, update), the time
    of each step's generation and scoring (``_generate_and_score_completions``), the peak bytes of
    the measured step's ``training_step`` and how they were measured, and the logged curves.
    """
    from transformers import PrinterCallback, TrainerCallback

    from rlgaf_fast.bench import measure
    from rlgaf_fast.integrations import trl as rlgaf_trl

    total = WARMUP_STEPS + steps + 1
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = _trainer(shape, total, output_dir)
        if path == OURS_PATH:
            rlgaf_trl.enable(trainer)
        elif path != TRL_PATH:
            raise ValueError(f"path must be {TRL_PATH!r} or {OURS_PATH!r}, got {path!r}")
        step_s: list[float] = []
        generate_s: list[float] = []
        memory: dict[str, Any] = {}
        step = {"index": 0}  # the step running (train() gives the trainer a fresh state)

        class Clock(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                step["index"] = state.global_step
                measure.synchronize(device)
                self.started = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                measure.synchronize(device)
                step_s.append(time.perf_counter() - self.started)

        generate = trainer._generate_and_score_completions

        def timed_generate(*args: Any, **kwargs: Any):
            measure.synchronize(device)
            started = time.perf_counter()
            result = generate(*args, **kwargs)
            measure.synchronize(device)
            generate_s.append(time.perf_counter() - started)
            return result

        training_step = trainer.training_step

        def measured_training_step(*args: Any, **kwargs: Any):
            if step["index"] < total - 1:
                return training_step(*args, **kwargs)
            gc.collect()
            loss, memory["peak_bytes"], memory["method"] = measure.peak_memory(
                lambda: training_step(*args, **kwargs), device
            )
            return loss

        trainer._generate_and_score_completions = timed_generate
        trainer.training_step = measured_training_step
        trainer.add_callback(Clock())
        trainer.remove_callback(PrinterCallback)  # the curves are kept, not printed per step
        trainer.train()
        history = curves(trainer)
        enabled = rlgaf_trl.is_enabled(trainer)
        del trainer
        gc.collect()
    if len(step_s) != total or len(generate_s) != total:
        raise RuntimeError(
            f"{path}: expected {total} steps and generations, got {len(step_s)} and "
            f"{len(generate_s)} (does every step still generate in this TRL?)"
        )
    timed = slice(WARMUP_STEPS, WARMUP_STEPS + steps)
    return {
        "path": path,
        "enabled": enabled,
        "step_times_s": step_s[timed],
        "generate_times_s": generate_s[timed],
        "peak_bytes": memory.get("peak_bytes"),
        "memory_method": memory.get("method"),
        "curves": history,
    }


# --- the benchmark ------------------------------------------------------------------------------


def _order(rounds: int) -> list[str]:
    """TRL, ours, ours, TRL, TRL, ours, ...: each path as often first as second."""
    pair = (TRL_PATH, OURS_PATH)
    return [p for r in range(rounds) for p in (pair if r % 2 == 0 else pair[::-1])]


def _summary(path: str, runs: list[dict]) -> dict:
    steps = [t for run in runs for t in run["step_times_s"]]
    generate = [t for run in runs for t in run["generate_times_s"]]
    train = [
        s - g
        for run in runs
        for s, g in zip(run["step_times_s"], run["generate_times_s"], strict=True)
    ]
    peaks = [run["peak_bytes"] for run in runs if run["peak_bytes"] is not None]
    return {
        "path": path,
        "computes": COMPUTES[path],
        "enabled": all(run["enabled"] for run in runs),
        "runs": len(runs),
        "step_s": statistics.median(steps),
        "step_p20_s": _percentile(steps, 20),
        "step_p80_s": _percentile(steps, 80),
        "best_step_s": min(steps),
        "generate_s": statistics.median(generate),
        "train_s": statistics.median(train),
        "peak_bytes": max(peaks) if peaks else None,
        "memory_method": runs[0]["memory_method"],
    }


def _percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q))


def run_benchmark(
    shape: dict, steps: int, rounds: int, device: torch.device, note: str | None = None
) -> dict:
    """Both paths ``rounds`` times each; the results document (see ``write``)."""
    from rlgaf_fast.bench.suite import _load_average, environment

    started = time.perf_counter()
    env = environment(device)
    runs: dict[str, list[dict]] = {TRL_PATH: [], OURS_PATH: []}
    for path in _order(rounds):
        print(f"training {path} ({WARMUP_STEPS} + {steps} + 1 steps) ...", flush=True)
        runs[path].append(train_path(path, shape, steps, device))
        median = statistics.median(runs[path][-1]["step_times_s"])
        print(f"  median step {median:.3f} s", flush=True)
    env["load_average_end"] = _load_average()
    reference = runs[TRL_PATH][0]["curves"]
    comparisons = {
        f"{path} run {i + 1}": compare_curves(reference, run["curves"])
        for path, path_runs in runs.items()
        for i, run in enumerate(path_runs)
        if run is not runs[TRL_PATH][0]
    }
    rows = [_summary(path, path_runs) for path, path_runs in runs.items()]
    theirs, ours = rows
    ratios = {
        "step_time_ours_over_trl": ours["step_s"] / theirs["step_s"],
        "train_time_ours_over_trl": ours["train_s"] / theirs["train_s"],
        "peak_memory_ours_over_trl": ours["peak_bytes"] / theirs["peak_bytes"]
        if ours["peak_bytes"] and theirs["peak_bytes"]
        else None,
    }
    identical = all(c["identical"] for c in comparisons.values())
    max_rel_diff = {
        key: max(c["max_rel_diff"][key] for c in comparisons.values()) for key in METRICS
    }
    memory_ratio = ratios["peak_memory_ours_over_trl"]
    goals = {
        "at_least_as_fast": ratios["step_time_ours_over_trl"] <= 1.0,
        "no_more_memory": None if memory_ratio is None else memory_ratio <= 1.0,
        "identical_curves": identical,
    }
    shape_doc = {k: v for k, v in shape.items() if k not in ("steps", "rounds")}
    doc = {
        "kind": "trl-grpo",
        "environment": env,
        "shape": shape_doc,
        "dtype": "float32",
        "torch_threads": torch.get_num_threads(),
        "trl": _version("trl"),
        "transformers": _version("transformers"),
        "steps": steps,
        "warmup_steps": WARMUP_STEPS,
        "rounds": rounds,
        "learning_rate": LEARNING_RATE,
        "rows": rows,
        "ratios": ratios,
        "curves_identical": identical,
        "curves_max_rel_diff": max_rel_diff,
        "curves_tolerance": {"reward": "equal", "rtol": RTOL, "atol": ATOL},
        "curve_comparisons": comparisons,
        "curves": {path: path_runs[0]["curves"] for path, path_runs in runs.items()},
        "runs": runs,
        "goal": GOAL,
        "goals": goals,
        "goal_met": all(goals.values()),
        "elapsed_s": time.perf_counter() - started,
    }
    if note:
        doc["note"] = note
    return doc


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


# --- reports ------------------------------------------------------------------------------------


def table(doc: dict) -> list[str]:
    """The Markdown rows of both paths: step time, its parts, peak memory, and ours over TRL's."""
    lines = [
        "| path | log-probs computed by | step s: median (p20-p80), best | generation s | "
        "rest of the step s | peak MiB | time / TRL | peak / TRL |",
        "|---|---|---|---|---|---|---|---|",
    ]
    theirs = doc["rows"][0]
    for row in doc["rows"]:
        peak = row["peak_bytes"]
        mem = "-" if peak is None else f"{peak / 2**20:.0f}"
        mem_ratio = f"{peak / theirs['peak_bytes']:.2f}x" if peak and theirs["peak_bytes"] else "-"
        lines.append(
            f"| {row['path']} | {row['computes']} | {row['step_s']:.3f} "
            f"({row['step_p20_s']:.3f}-{row['step_p80_s']:.3f}), {row['best_step_s']:.3f} | "
            f"{row['generate_s']:.3f} | {row['train_s']:.3f} | {mem} | "
            f"{row['step_s'] / theirs['step_s']:.2f}x | {mem_ratio} |"
        )
    return lines


def curves_lines(doc: dict) -> list[str]:
    """Whether the curves agree, and their largest relative differences."""
    worst = ", ".join(f"{k} {v:.2g}" for k, v in doc["curves_max_rel_diff"].items())
    verdict = "identical" if doc["curves_identical"] else "**not identical**"
    mismatches = [
        f"{name}: {c['first_mismatch']}"
        for name, c in doc["curve_comparisons"].items()
        if c["first_mismatch"]
    ]
    tolerance = doc["curves_tolerance"]
    text = (
        f"Training curves {verdict} (rewards equal, the rest within {tolerance['rtol']:g} "
        f"relative or {tolerance['atol']:g} absolute, every run against TRL's first); largest "
        f"relative differences: {worst}."
    )
    return [text + (" First mismatch: " + "; ".join(mismatches) + "." if mismatches else "")]


def _header(doc: dict) -> str:
    env = doc["environment"]
    date = env["date"].replace("T", " ").split("+")[0][:16] + " UTC"
    shape = ", ".join(f"{k}={v}" for k, v in doc["shape"].items())
    start, end = env.get("load_average_start"), env.get("load_average_end")
    load = ""
    if env.get("device_type") == "cpu" and start:
        load = f" Load average (1 min) {start[0]:.1f} at the start" + (
            f", {end[0]:.1f} at the end." if end else "."
        )
    return (
        f"{env['device']}, {date}; torch {env['torch']}, TRL {doc['trl']}, transformers "
        f"{doc['transformers']}; commit {env['commit']}; {doc['torch_threads']} torch thread(s), "
        f"{doc['dtype']}. Llama from a config ({shape}), learning rate {doc['learning_rate']:g}; "
        f"per path {doc['rounds']} run(s) of {doc['warmup_steps']} warm-up + {doc['steps']} timed "
        f"+ 1 memory-measured step(s), median over every timed step.{load}"
        + (f" Note: {doc['note'].rstrip('.')}." if doc.get("note") else "")
    )


def _goal_lines(doc: dict) -> list[str]:
    goals = doc["goals"]
    ratios = doc["ratios"]

    def mark(value: bool | None) -> str:
        return {True: "met", False: "**not met**", None: "not measured"}[value]

    memory = ratios["peak_memory_ours_over_trl"]
    return [
        f"Target: {doc['goal']}.",
        "",
        f"- at least as fast: {mark(goals['at_least_as_fast'])} (median step ours / TRL "
        f"{ratios['step_time_ours_over_trl']:.3f}; without generation "
        f"{ratios['train_time_ours_over_trl']:.3f})",
        f"- no more memory: {mark(goals['no_more_memory'])} (peak ours / TRL "
        + ("-" if memory is None else f"{memory:.3f}")
        + ")",
        f"- identical curves: {mark(goals['identical_curves'])}",
    ]


def section(doc: dict) -> list[str]:
    """The run as Markdown: header, target verdicts, the table and the curves' agreement."""
    return [
        _header(doc),
        "",
        *_goal_lines(doc),
        "",
        *table(doc),
        "",
        *curves_lines(doc),
        "",
        f"Peak memory: {doc['rows'][0]['memory_method']}, during the trainer's training_step "
        "(generation, loss forward and backward; not the optimizer's update).",
    ]


def write(doc: dict, out: Path) -> None:
    """``trl_grpo.json`` (everything, per-step times and curves included) and ``trl_grpo.md``
    (the section, then every logged step of both paths' first runs) under ``out``."""
    from rlgaf_fast.bench import report

    out.mkdir(parents=True, exist_ok=True)
    report.write_json(doc, out / "trl_grpo.json")
    steps = len(doc["curves"][TRL_PATH]["loss"])
    rows = [
        "| step | " + " | ".join(f"{k} TRL | {k} ours" for k in METRICS) + " |",
        "|---" * (1 + 2 * len(METRICS)) + "|",
    ]
    for step in range(steps):
        cells = []
        for key in METRICS:
            for path in (TRL_PATH, OURS_PATH):
                value = doc["curves"][path][key][step]
                cells.append("-" if value is None else f"{value:.6g}")
        rows.append(f"| {step + 1} | " + " | ".join(cells) + " |")
    text = [
        "# GRPO training step through TRL: TRL's log-probs against rlgaf_fast's",
        "",
        *section(doc),
        "",
        "## Curves (first run of each path)",
        "",
        *rows,
    ]
    (out / "trl_grpo.md").write_text("\n".join(text) + "\n")


def run(args: argparse.Namespace) -> int:
    """``rlgaf-fast bench --trl [--tiny] [--train-steps K] [--threads T] [--out DIR]``."""
    try:
        import datasets  # noqa: F401
        import tokenizers  # noqa: F401
        import transformers  # noqa: F401
        import trl  # noqa: F401
    except ImportError as error:
        print(
            f"rlgaf-fast bench --trl: skipped, TRL is not importable here ({error}); "
            "pip install 'rlgaf_fast[trl]'"
        )
        return 0
    from rlgaf_fast.bench.suite import device_slug

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shape = dict(SHAPES["tiny" if args.preset == "tiny" else "cpu"])
    steps = args.train_steps or shape["steps"]
    # The model is small: on a shared 2-core CPU a second thread mostly waits on the first.
    torch.set_num_threads(args.threads or 1)
    doc = run_benchmark(shape, steps, shape["rounds"], device, note=args.note)
    out = Path(args.out) if args.out else Path("bench-results") / device_slug(device) / "trl-grpo"
    write(doc, out)
    print("\n".join(section(doc)))
    print(f"wrote {out}/trl_grpo.json, trl_grpo.md")
    # Curves that differ are a wrong result; a slower or larger run is a measurement.
    return 0 if doc["curves_identical"] else 1
