"""The ``rlgaf-fast`` command.

Subcommands register themselves in ``SUBCOMMANDS``: a name mapped to a function that adds its
parser to argparse's subparsers and sets ``func`` (called with the parsed arguments, returning
an exit status). To add one (e.g. ``bench``), write ``add_bench_parser(subparsers)`` and add it
to the dict.

A mistake of the user's (a missing file, a malformed record, an unknown key, an invalid value)
is raised as the library raises it (ValueError, FileNotFoundError, ... or UsageError for the
command line itself) and ``main`` prints it as one line, ``rlgaf-fast CMD: error: ...``, with
exit status 2; other exceptions keep their traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlgaf_fast.rlgaf.modes import MODE_NAMES


class UsageError(Exception):
    """A mistake in the command line itself (not in a file it names), reported in one line."""


# ---------------------------------------------------------------------- rlgaf-fast train

TINY_PRESET: dict[str, Any] = {
    "generator": {
        "config": {
            "model_type": "llama",
            "vocab_size": 32,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "max_position_embeddings": 32,
        }
    },
    "discriminator": {
        "config": {
            "model_type": "llama",
            "vocab_size": 32,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "max_position_embeddings": 32,
        }
    },
    "data": {"synthetic": {"num_examples": 512, "vocab_size": 32}},
    "pad_token_id": 0,
    "eos_token_id": 1,
    "trainer": {
        "mode": "ppo",
        "total_steps": 1000,
        "batch_size": 16,
        "minibatch_size": 8,
        "max_new_tokens": 10,
        "generator_lr": 3e-4,
        "discriminator_lr": 3e-4,
        "kl_coef": 0.02,
    },
}


# The keys build_from_config reads, so that a misspelt one is an error rather than a default.
TRAIN_KEYS = (
    "generator",
    "discriminator",
    "reward_model",
    "tokenizer",
    "data",
    "pad_token_id",
    "eos_token_id",
    "trainer",
)
MODEL_KEYS = ("name_or_path", "config")
DATA_KEYS = ("synthetic", "demonstrations", "prompts")
SYNTHETIC_KEYS = ("num_examples", "vocab_size")  # the rest of synthetic_examples' come from spec


def load_train_config(path: str) -> dict:
    """The YAML mapping of ``rlgaf-fast train --config``, every section's keys checked."""
    import dataclasses

    from rlgaf_fast.rlgaf.config import RLGAFConfig, check_keys, load_yaml

    if not Path(path).is_file():
        problem = "is a directory" if Path(path).is_dir() else "does not exist"
        raise FileNotFoundError(
            f"config file {path} {problem}; give --config a YAML file (or use --preset tiny)"
        )
    spec = load_yaml(path)
    data = spec.get("data") if isinstance(spec.get("data"), dict) else {}
    sections = {
        "top-level": (spec, TRAIN_KEYS),
        "generator": (spec.get("generator"), MODEL_KEYS),
        "discriminator": (spec.get("discriminator"), MODEL_KEYS),
        "reward_model": (spec.get("reward_model"), MODEL_KEYS),
        "data": (data, DATA_KEYS),
        "data.synthetic": (data.get("synthetic"), SYNTHETIC_KEYS),
        "trainer": (spec.get("trainer"), [f.name for f in dataclasses.fields(RLGAFConfig)]),
    }
    for name, (values, known) in sections.items():
        if isinstance(values, dict):  # a section of the wrong type is build_from_config's error
            check_keys(values, list(known), name, source=path)
    return spec


def _build_model(spec: dict, kind: str, pad_token_id: int | None):
    """A transformers model from ``{"name_or_path": ...}`` or ``{"config": {"model_type": ...,
    ...}}`` (config-built, random init). kind: "causal_lm" or "classifier" (one logit)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if kind == "causal_lm" else AutoModelForSequenceClassification
    extra = {} if kind == "causal_lm" else {"num_labels": 1}
    if "name_or_path" in spec:
        return auto.from_pretrained(spec["name_or_path"], **extra)
    if "config" not in spec:
        raise ValueError(f"{kind} spec needs name_or_path or config, got {sorted(spec)}")
    values = dict(spec["config"])
    model_type = values.pop("model_type")
    if pad_token_id is not None:
        values.setdefault("pad_token_id", pad_token_id)
    config = AutoConfig.for_model(model_type, **values, **extra)
    return auto.from_config(config)


def build_from_config(spec: dict, output_dir: str | None = None, overrides: dict | None = None):
    """An ``RLGAFTrainer`` from a train config (the YAML's mapping): models, data, trainer;
    ``overrides`` (RLGAFConfig fields) replace the trainer section's values."""
    from rlgaf_fast.rlgaf import RLGAFConfig, RLGAFTrainer
    from rlgaf_fast.rlgaf.data import check_examples_file, synthetic_examples
    from rlgaf_fast.rlgaf.modes import mode_spec

    trainer_values = spec.get("trainer") or {}
    if not isinstance(trainer_values, dict):
        raise ValueError(
            f"the config's trainer section must be a mapping, got {type(trainer_values).__name__}"
        )
    trainer_values = {**trainer_values, **(overrides or {})}
    if output_dir is not None:
        trainer_values["output_dir"] = output_dir
    config = RLGAFConfig.from_dict(trainer_values)
    data = spec.get("data") or {}
    if not isinstance(data, dict):
        raise ValueError(f"the config's data section must be a mapping, got {type(data).__name__}")
    for name in ("demonstrations", "prompts"):
        if isinstance(data.get(name), (str, Path)):  # checked here, before any model is built
            check_examples_file(data[name], f"data.{name}")
    tokenizer = None
    if spec.get("tokenizer"):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    pad_id = spec.get("pad_token_id", getattr(tokenizer, "pad_token_id", None))
    eos_id = spec.get("eos_token_id", getattr(tokenizer, "eos_token_id", None))
    import torch

    torch.manual_seed(config.seed)  # config-built models start from the run's seed
    if "generator" not in spec:
        raise ValueError("the config needs a generator section (name_or_path or config)")
    generator = _build_model(spec["generator"], "causal_lm", pad_id)
    mode = mode_spec(config.mode)
    discriminator = None
    if mode.discriminator:
        if "discriminator" not in spec:
            raise ValueError(f"mode {config.mode!r} needs a discriminator section in the config")
        discriminator = _build_model(spec["discriminator"], "classifier", pad_id)
    if "synthetic" in data:
        # Generated data needs an end token; the trainer must stop on the same one.
        eos_id = 1 if eos_id is None else eos_id
        demonstrations = synthetic_examples(
            seed=config.seed,
            eos_token_id=eos_id,
            pad_token_id=0 if pad_id is None else pad_id,
            **data["synthetic"],
        )
    else:
        demonstrations = data.get("demonstrations")
    reward_fn = None
    if mode.reward_fn:
        if "reward_model" not in spec:
            raise ValueError(
                f"mode {config.mode!r} needs a reward_model section (name_or_path or config)"
            )
        reward_fn = _reward_model_fn(_build_model(spec["reward_model"], "classifier", pad_id))
    return RLGAFTrainer(
        config,
        generator,
        discriminator,
        demonstrations,
        data.get("prompts"),
        reward_fn=reward_fn,
        tokenizer=tokenizer,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )


def _reward_model_fn(model):
    """The rlhf reward of a batch: a sequence classifier's logit for prompt + response, read
    like the discriminator's (left-aligned embeddings, so no pad token id is needed)."""
    import torch

    from rlgaf_fast.rlgaf.discriminator import token_sequences
    from rlgaf_fast.rlgaf.models import DiscriminatorOnSequences

    scorer = DiscriminatorOnSequences(model.requires_grad_(False).eval())
    device = None  # where the scorer is: moved once, as moving walks every parameter

    def reward(batch):
        nonlocal device
        ids, mask = token_sequences(batch)
        if ids.device != device:
            scorer.to(ids.device)
            device = ids.device
        with torch.no_grad():
            return scorer(ids, mask)

    return reward


def run_train(args: argparse.Namespace) -> int:
    if args.config is None and args.preset is None:
        raise UsageError("give --config FILE.yaml or --preset tiny")
    spec = json.loads(json.dumps(TINY_PRESET)) if args.preset == "tiny" else {}
    if args.config is not None:
        spec.update(load_train_config(args.config))
    overrides = {
        key: value
        for key, value in (
            ("mode", args.mode),
            ("total_steps", args.steps),
            ("use_fused_kernels", args.fused or None),
        )
        if value is not None
    }
    _set_threads(args.threads)
    if args.resume:
        overrides["resume_from"] = args.resume
    trainer = build_from_config(spec, args.out, overrides)
    history = trainer.train()
    if trainer.stopped_by is not None:
        if trainer.is_main:
            saved = f"; saved step {trainer.step_count}" if trainer.config.output_dir else ""
            print(
                f"stopped by {trainer.stopped_by}{saved}; continue with --resume latest",
                file=sys.stderr,
            )
    elif trainer.config.output_dir:
        path = trainer.save_checkpoint(Path(trainer.config.output_dir) / "final")
        if trainer.is_main:
            print(f"saved {path}")
    trainer.close()
    if trainer.is_main and history:
        print(json.dumps(history[-1]))
    return 0


def add_train_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train",
        help="adversarial fine-tuning from a YAML config",
        description="Train a generator LM with RLGAF. The YAML holds "
        "generator/discriminator (name_or_path or config), tokenizer, data "
        "(demonstrations, prompts: JSON Lines) and trainer (RLGAFConfig).",
    )
    p.add_argument("--config", help="YAML file (read with yaml.safe_load)")
    p.add_argument(
        "--preset",
        choices=["tiny"],
        help="built-in config: a config-built model on "
        "generated data (about a minute); --config then overrides its sections",
    )
    p.add_argument("--mode", choices=MODE_NAMES)
    p.add_argument("--steps", type=int, help="override trainer.total_steps")
    p.add_argument("--out", help="output directory (logs, checkpoints)")
    p.add_argument(
        "--resume",
        metavar="DIR|latest",
        help="checkpoint directory to continue from, or 'latest': the newest complete "
        "checkpoint under --out (none yet: start from the beginning)",
    )
    p.add_argument("--fused", action="store_true", help="use_fused_kernels: true")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.set_defaults(func=run_train)


# ---------------------------------------------------------------------- rlgaf-fast oracle


def run_oracle_command(args: argparse.Namespace) -> int:
    import dataclasses

    import yaml

    from rlgaf_fast.bench.oracle import PRESETS, check_discriminator, run_oracle
    from rlgaf_fast.bench.rule_task import RuleTask
    from rlgaf_fast.rlgaf.config import RLGAFConfig, check_keys

    _set_threads(args.threads)
    if args.task == "rule":
        if args.oracle:
            raise UsageError("--oracle is for --task seqgan; --task rule needs no file")
        task = RuleTask()
        preset = task.presets[args.preset]
    else:
        if not args.oracle:
            raise UsageError(
                "--task seqgan needs --oracle: seqgan (downloaded once) or a path to SeqGAN's "
                "target_params_py3.pkl"
            )
        task = args.oracle
        preset = PRESETS[args.preset]
    if args.discriminator:
        has_features = args.discriminator.startswith("lm")
        no_features = {} if has_features else {"d_fit_steps": 0}
        preset = dataclasses.replace(preset, discriminator=args.discriminator, **no_features)
    if args.d_fit_steps is not None:
        preset = dataclasses.replace(preset, d_fit_steps=args.d_fit_steps)
    if args.d_features is not None:
        preset = dataclasses.replace(preset, d_features=args.d_features)
    if args.d_pretrain_steps is not None:
        if args.d_pretrain_steps < 0:
            raise UsageError(f"--d-pretrain-steps must be >= 0, got {args.d_pretrain_steps}")
        preset = dataclasses.replace(preset, d_pretrain_steps=args.d_pretrain_steps)
    check_discriminator(preset, args.mode)
    overrides = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--set expects KEY=VALUE, got {item!r}")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):
            try:  # YAML 1.1 reads 1e-4 (no dot) as a string
                parsed = float(parsed)
            except ValueError:
                pass
        overrides[key] = parsed
    check_keys(overrides, [f.name for f in dataclasses.fields(RLGAFConfig)], "--set")
    metrics = run_oracle(
        task,
        args.mode,
        args.out,
        preset=preset,
        init=args.init,
        seed=args.seed,
        use_fused_kernels=args.fused,
        overrides=overrides,
    )
    summary = {"mode": args.mode, "time_s": round(metrics["time_s"], 1), **metrics["final"]}
    if "warm_start" in metrics:
        summary["warm_start"] = metrics["warm_start"]
    print(json.dumps(summary))
    return 0


def add_oracle_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "oracle",
        help="the SeqGAN synthetic benchmark and the rule task",
        description="Train one mode against the SeqGAN oracle (--task seqgan) or on the "
        "bracket-language rule task (--task rule); writes OUT/metrics.json, OUT/samples.txt "
        "and OUT/curves.png.",
    )
    p.add_argument(
        "--task",
        default="seqgan",
        choices=["seqgan", "rule"],
        help="seqgan (default): SeqGAN's oracle LSTM, needs --oracle; rule: demonstrations "
        "from a known bracket-language generator (docs/rule-task.md), needs no file",
    )
    p.add_argument(
        "--oracle",
        help="--task seqgan: 'seqgan' for SeqGAN's published parameters, downloaded once "
        "into $RLGAF_FAST_CACHE (default ~/.cache/rlgaf_fast) and checked, or "
        "$RLGAF_SEQGAN_ORACLE where set; else a path to target_params_py3.pkl",
    )
    p.add_argument("--mode", required=True, choices=MODE_NAMES)
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default="smoke", choices=["smoke", "full"])
    p.add_argument("--init", help="directory of an sft run to warm-start from (else train one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fused", action="store_true", help="use_fused_kernels: true")
    p.add_argument(
        "--discriminator",
        choices=["lm", "lm-context", "lm-tuned", "lm-bigram", "cnn", "transformer", "lstm", "gru"],
        help="lm (default): a small head over a frozen feature model (the warm "
        "start, fit --d-fit-steps further); "
        "lm-context: the head reads the LM's hidden state too; "
        "lm-tuned: that model trained too; lm-bigram: bigram counts of half the "
        "demonstrations as one more feature; cnn: SeqGAN's CNN; transformer: a small "
        "Llama classifier trained from scratch (the rule task's default); lstm, gru: a "
        "recurrent classifier trained from scratch",
    )
    p.add_argument(
        "--d-fit-steps",
        type=int,
        metavar="N",
        help="MLE steps the lm discriminators' feature model takes on the "
        "demonstrations past the warm start (the preset's: full 500, smoke 20)",
    )
    p.add_argument(
        "--d-features",
        metavar="DIR",
        help="an sft run's directory (any width and depth, same task) whose generator is the "
        "lm discriminators' feature model instead of the warm start",
    )
    p.add_argument(
        "--d-pretrain-steps",
        type=int,
        metavar="N",
        help="minibatches of 64 demonstrations against 64 warm-start samples that the "
        "discriminator is pretrained on before the adversarial phase (the preset's: full "
        "600, smoke 5; the rule task's smoke 20)",
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override an RLGAFConfig field of the adversarial phase (repeatable)",
    )
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest on a busy CPU)")
    p.set_defaults(func=run_oracle_command)


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


# ---------------------------------------------------------------------- entry point

from rlgaf_fast.bench.cli import add_bench_parser  # noqa: E402 - the benchmark suite

SUBCOMMANDS: dict[str, Callable[[Any], None]] = {
    "train": add_train_parser,
    "oracle": add_oracle_parser,
    "bench": add_bench_parser,
}


DEBUG_EPILOG = (
    "A mistake in the arguments or in the files they name is reported in one line, with exit "
    "status 2; set RLGAF_FAST_DEBUG=1 to see the full traceback instead."
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="rlgaf-fast", description=__doc__.splitlines()[0], epilog=DEBUG_EPILOG
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for register in SUBCOMMANDS.values():
        register(subparsers)
    for subparser in subparsers.choices.values():
        subparser.epilog = subparser.epilog or DEBUG_EPILOG
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as error:
        if os.environ.get("RLGAF_FAST_DEBUG", "0") not in ("", "0"):
            raise
        print(f"rlgaf-fast {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2


def _user_errors() -> tuple[type[BaseException], ...]:
    """What the library raises for a bad argument, file or value. Other exceptions are bugs,
    whose traceback is wanted."""
    import pickle

    import yaml

    return (
        UsageError,
        FileNotFoundError,
        IsADirectoryError,
        NotADirectoryError,
        PermissionError,
        ValueError,  # json.JSONDecodeError too
        KeyError,
        TypeError,
        yaml.YAMLError,
        pickle.UnpicklingError,
    )


def _one_line(error: BaseException) -> str:
    import yaml

    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        where = f"{mark.name}, line {mark.line + 1}, column {mark.column + 1}"
        text = f"{where}: invalid YAML: {error.problem}"
    elif isinstance(error, OSError) and error.filename is not None:
        text = f"{error.filename}: {error.strerror}"  # the bare "[Errno 2] ..." form otherwise
    elif isinstance(error, KeyError) and len(error.args) == 1:
        text = str(error.args[0])  # str() would quote it
    else:
        text = str(error)
    return " ".join(text.split()) or type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
