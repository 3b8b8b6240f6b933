"""``rlgaf-fast bench --train``: end-to-end speed of the adversarial loop with
``use_fused_kernels`` off and on, in the PPO and the Gumbel modes, on a Llama-shaped
``transformers`` model built from a config (random weights; only the shapes matter here).

Each configuration gets a fresh trainer, two untimed warm-up steps, then ``steps`` timed steps
(rollout, generator update, discriminator update). Reported: the median step time, tokens per
second (generated tokens trained on per second, as the trainer counts them) and peak memory
(GPU: ``torch.cuda.max_memory_allocated``; CPU: the process's resident-set high-water mark,
reset before each configuration), and the fused/unfused ratios.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch

# Model shapes. CPU: small enough for seconds per step on two cores, with a real vocabulary so
# the [tokens, V] work the kernels fuse is there. GPU: about 1B parameters (Llama 3.2 1B's shape).
SHAPES = {
    "cpu": {
        "vocab_size": 32000,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "batch_size": 8,
        "max_new_tokens": 16,
        "dtype": torch.float32,
        "steps": 5,
    },
    "cuda": {
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "batch_size": 32,
        "max_new_tokens": 128,
        "dtype": torch.bfloat16,
        "steps": 5,
    },
}
WARMUP_STEPS = 2
DISCRIMINATOR = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}


def _llama(shape: dict, classifier: bool):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    sizes = (
        DISCRIMINATOR
        if classifier
        else {
            k: shape[k]
            for k in (
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
            )
        }
    )
    config = LlamaConfig(
        vocab_size=shape["vocab_size"],
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=1,
        num_labels=1,
        **sizes,
    )
    model = LlamaForSequenceClassification(config) if classifier else LlamaForCausalLM(config)
    return model.to(shape["dtype"])


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _rss_reset() -> int | None:
    """Reset the resident-set high-water mark; the resident set now."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        return None
    return _status_bytes("VmRSS")


def time_configuration(
    mode: str, fused: bool, shape: dict, steps: int, device: torch.device
) -> dict:
    """A fresh trainer in ``mode``; warm-up steps, then ``steps`` timed ones."""
    from rlgaf_fast.rlgaf import RLGAFConfig, RLGAFTrainer
    from rlgaf_fast.rlgaf.data import synthetic_examples

    torch.manual_seed(0)
    config = RLGAFConfig(
        mode=mode,
        use_fused_kernels=fused,
        total_steps=steps + WARMUP_STEPS,
        batch_size=shape["batch_size"],
        minibatch_size=max(1, shape["batch_size"] // 2),
        max_new_tokens=shape["max_new_tokens"],
        ppo_epochs=1,
        progress_bar=False,
        tensorboard=False,
    )
    generator = _llama(shape, classifier=False)
    discriminator = _llama(shape, classifier=True)
    demos = synthetic_examples(64, shape["vocab_size"])
    trainer = RLGAFTrainer(config, generator, discriminator, demos)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_reset()
    for _ in range(WARMUP_STEPS):  # kernel compilation, allocator growth, first-use paths
        trainer.step()
    times, rates = [], []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        logs = trainer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        rates.append(logs.get("tokens_per_s", 0.0))
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
        method = "torch.cuda.max_memory_allocated above the models' own memory"
    else:
        high = _status_bytes("VmHWM")
        peak = None if high is None or before is None else high - before
        method = "process RSS high-water mark (VmHWM) above the RSS once the models were built"
    trainer.close()
    del trainer, generator, discriminator
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "mode": mode,
        "use_fused_kernels": fused,
        "step_s": statistics.median(times),
        "best_step_s": min(times),
        "step_times_s": times,
        "tokens_per_s": statistics.median(rates),
        "peak_bytes": peak,
        "memory_method": method,
    }


def run(args: argparse.Namespace) -> int:
    try:
        import transformers  # noqa: F401

        from rlgaf_fast.rlgaf import RLGAFTrainer  # noqa: F401 - only whether it imports
    except ImportError as error:
        print(
            f"rlgaf-fast bench --train: skipped, the training loop is not importable here ({error})"
        )
        return 0
    from rlgaf_fast.bench.suite import device_slug, environment

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shape = dict(SHAPES["cuda" if device.type == "cuda" else "cpu"])
    steps = args.train_steps or shape["steps"]
    rows = []
    for mode in ("ppo", "gumbel"):
        for fused in (False, True):
            label = f"{mode} use_fused_kernels={fused}"
            print(f"timing {label} ...", flush=True)
            try:
                rows.append(time_configuration(mode, fused, shape, steps, device))
            except Exception as error:  # noqa: BLE001 - record it and go on
                rows.append(
                    {
                        "mode": mode,
                        "use_fused_kernels": fused,
                        "error": f"{type(error).__name__}: {error}"[:500],
                    }
                )
            print(
                f"  {json.dumps({k: v for k, v in rows[-1].items() if k != 'step_times_s'})}",
                flush=True,
            )
    ratios = {}
    for mode in ("ppo", "gumbel"):
        off, on = (
            next(
                (
                    r
                    for r in rows
                    if r["mode"] == mode and r["use_fused_kernels"] == f and "error" not in r
                ),
                None,
            )
            for f in (False, True)
        )
        if off and on:
            ratios[mode] = {
                "tokens_per_s_fused_over_unfused": on["tokens_per_s"] / off["tokens_per_s"]
                if off["tokens_per_s"]
                else None,
                "step_time_unfused_over_fused": off["step_s"] / on["step_s"],
                "best_step_time_unfused_over_fused": off["best_step_s"] / on["best_step_s"],
                "peak_memory_fused_over_unfused": on["peak_bytes"] / off["peak_bytes"]
                if on["peak_bytes"] and off["peak_bytes"]
                else None,
            }
    shape_doc = {
        k: (str(v).removeprefix("torch.") if k == "dtype" else v)
        for k, v in shape.items()
        if k != "steps"
    }
    doc = {
        "kind": "train",
        "environment": environment(device),
        "shape": shape_doc,
        "steps": steps,
        "warmup_steps": WARMUP_STEPS,
        "rows": rows,
        "ratios": ratios,
        "goal": "GPU (about 1B parameters, V=128256, bf16, one H100): fused >= 1.5x tokens/s "
        "and <= 60% of the unfused peak memory",
    }
    out = Path(args.out) if args.out else Path("bench-results") / device_slug(device) / "train"
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = [
        "| mode | use_fused_kernels | step s (median, best) | tokens/s | peak MiB |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['mode']} | {r['use_fused_kernels']} | error: {r['error'][:80]} | | |"
            )
        else:
            peak = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.0f}"
            lines.append(
                f"| {r['mode']} | {r['use_fused_kernels']} | {r['step_s']:.3f}, "
                f"{r['best_step_s']:.3f} | "
                f"{r['tokens_per_s']:.1f} | {peak} |"
            )
    for mode, ratio in ratios.items():
        lines.append(
            f"\n{mode}: " + ", ".join(f"{k} = {v:.2f}" for k, v in ratio.items() if v is not None)
        )
    table = "\n".join(lines)
    (out / "train.md").write_text(
        f"# Training-step benchmark\n\n{doc['environment']['device']}, "
        f"{doc['environment']['date']}, shape {shape_doc}\n\n{table}\n"
    )
    print(table)
    print(f"wrote {out}/train.json, train.md")
    return 0
