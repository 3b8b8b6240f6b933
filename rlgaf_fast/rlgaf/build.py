"""The pieces :class:`RLGAFTrainer` is built from, one builder each, in the order the trainer
calls them: the special tokens, a check of the inputs against the mode, the data samplers, the
models, the optimisers (with the learning-rate and Gumbel temperature schedules) and the logs.
What accelerate contributes is in parallel.py.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, NamedTuple

import torch
from torch import nn

from rlgaf_fast.rlgaf.config import RLGAFConfig
from rlgaf_fast.rlgaf.data import ExampleSampler, load_examples
from rlgaf_fast.rlgaf.models import DiscriminatorOnSequences, PolicyWithValue
from rlgaf_fast.rlgaf.modes import Mode


def special_tokens(
    tokenizer: Any, generator: nn.Module, eos_token_id: int | None, pad_token_id: int | None
) -> tuple[int | None, int]:
    """``(eos_token_id, pad_token_id)``: the explicit arguments, else the tokenizer's, else the
    generator config's; the pad token defaults to 0."""
    for source in (tokenizer, getattr(generator, "config", None)):
        if eos_token_id is None and isinstance(getattr(source, "eos_token_id", None), int):
            eos_token_id = source.eos_token_id
        if pad_token_id is None and isinstance(getattr(source, "pad_token_id", None), int):
            pad_token_id = source.pad_token_id
    return eos_token_id, 0 if pad_token_id is None else pad_token_id


def check_inputs(
    mode: Mode,
    config: RLGAFConfig,
    discriminator: nn.Module | None,
    reward_fn: Callable | None,
    demonstrations: Any,
    prompts: Any,
) -> None:
    """Raise ValueError naming what ``mode`` (or ``config``) needs and was not given."""
    if mode.discriminator and discriminator is None:
        raise ValueError(f"mode {mode.name!r} needs a discriminator")
    if mode.reward_fn and reward_fn is None:
        raise ValueError(f"mode {mode.name!r} needs reward_fn (a fixed reward function or model)")
    if demonstrations is None and mode.demonstrations:
        raise ValueError(f"mode {mode.name!r} needs demonstrations")
    if demonstrations is None and config.mle_coef > 0:
        raise ValueError(f"mle_coef > 0 (got {config.mle_coef}) needs demonstrations")
    if demonstrations is None and prompts is None:
        raise ValueError("give prompts (or demonstrations, whose prompts are used)")


def data(
    config: RLGAFConfig,
    generator: nn.Module,
    demonstrations: Any,
    prompts: Any,
    tokenizer: Any,
    eos_token_id: int | None,
    pad_token_id: int,
) -> tuple[ExampleSampler | None, ExampleSampler]:
    """``(demonstrations, prompts)`` as samplers of padded batches; the prompts default to the
    demonstrations' own. Refuses prompts that, with ``max_new_tokens``, overrun the generator's
    positions."""
    lengths = (config.max_new_tokens, config.max_prompt_length)
    demos = None
    if demonstrations is not None:
        demos = ExampleSampler(
            load_examples(demonstrations, tokenizer, eos_token_id), pad_token_id, *lengths
        )
    prompt_sampler = demos
    if prompts is not None:
        prompt_sampler = ExampleSampler(
            load_examples(prompts, tokenizer, eos_token_id), pad_token_id, *lengths
        )
    if config.discriminator_loss == "bradley_terry" and demos is not None and prompts is not None:
        missing = demos.missing_prompts(prompt_sampler)
        if missing:
            raise ValueError(
                f"discriminator_loss 'bradley_terry' pairs each generation with a demonstration "
                f"of its prompt, but {missing} of the {len(prompt_sampler)} prompts have none; "
                f"use discriminator_loss 'bce' or prompts that the demonstrations answer"
            )
    positions = getattr(getattr(generator, "config", None), "max_position_embeddings", None)
    samplers = {"demonstrations": demos}
    if prompts is not None:  # else the prompts are the demonstrations', checked once
        samplers["prompts"] = prompt_sampler
    if isinstance(positions, int):
        for name, sampler in samplers.items():
            if sampler is not None and sampler.longest_prompt + config.max_new_tokens > positions:
                raise ValueError(
                    f"the longest prompt of the {name} ({sampler.longest_prompt} tokens) "
                    f"plus max_new_tokens ({config.max_new_tokens}) exceeds the generator's "
                    f"{positions} positions; set max_prompt_length (at most "
                    f"{positions - config.max_new_tokens}) to keep the last tokens of each "
                    f"prompt"
                )
    return demos, prompt_sampler


class Models(NamedTuple):
    """What :func:`models` returns; ``None`` for what the mode does without."""

    policy: PolicyWithValue
    discriminator: DiscriminatorOnSequences | None
    reference: nn.Module | None
    ema: torch.optim.swa_utils.AveragedModel | None


def models(
    mode: Mode,
    config: RLGAFConfig,
    generator: nn.Module,
    discriminator: nn.Module | None,
    reference_model: nn.Module | None,
    device: torch.device,
) -> Models:
    """The policy (the generator, with a value head where the mode has one), the
    discriminator, the frozen KL reference (default: a copy of the generator as it starts) and
    the weight average. Draws the value head's initial weights from torch's global generator."""
    if config.disable_dropout:
        for module in generator.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
            if isinstance(getattr(module, "attention_dropout", None), float):
                module.attention_dropout = 0.0  # Llama-style attention passes a float
    policy = PolicyWithValue(generator, with_value_head=mode.value_head)
    if mode.reference and config.kl_coef > 0 and reference_model is None:
        reference_model = copy.deepcopy(generator)
    if reference_model is not None:
        reference_model.requires_grad_(False).eval().to(device)
    wrapped = DiscriminatorOnSequences(discriminator) if mode.discriminator else None
    ema = None
    if config.generator_ema > 0:
        ema = torch.optim.swa_utils.AveragedModel(
            generator,
            device=device,
            multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(config.generator_ema),
        )
        ema.requires_grad_(False).eval()
    return Models(policy, wrapped, reference_model, ema)


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The learning-rate factor at a step: linear warmup, then constant, linear or cosine
    decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


def tau_at(config: RLGAFConfig, step: int) -> float:
    """Gumbel-Softmax temperature at ``step``: constant, linear or exponential from
    ``tau_start`` at step 0 to ``tau_end`` at step ``total_steps``. As with learning-rate
    schedules, the last update (step ``total_steps - 1``) uses the value one step short of
    ``tau_end``."""
    c = config
    progress = min(1.0, step / max(1, c.total_steps))
    if c.tau_schedule == "linear":
        return c.tau_start + (c.tau_end - c.tau_start) * progress
    if c.tau_schedule == "exponential":
        return c.tau_start * (c.tau_end / c.tau_start) ** progress
    return c.tau_start


class Optimizers(NamedTuple):
    """What :func:`optimizers` returns; the discriminator's are ``None`` without one."""

    g_opt: torch.optim.Optimizer
    g_sched: torch.optim.lr_scheduler.LambdaLR
    d_opt: torch.optim.Optimizer | None
    d_sched: torch.optim.lr_scheduler.LambdaLR | None


def optimizers(
    config: RLGAFConfig, policy: nn.Module, discriminator: nn.Module | None
) -> Optimizers:
    """AdamW for the policy on ``lr_schedule``, and for the discriminator at a constant rate."""
    betas = (config.adam_beta1, 0.999)
    g_opt = torch.optim.AdamW(
        policy.parameters(),
        lr=config.generator_lr,
        betas=betas,
        weight_decay=config.weight_decay,
    )
    schedule = lr_lambda(config.lr_schedule, config.warmup_steps, max(1, config.total_steps))
    g_sched = torch.optim.lr_scheduler.LambdaLR(g_opt, schedule)
    d_opt = d_sched = None
    if discriminator is not None:
        d_opt = torch.optim.AdamW(
            discriminator.parameters(),
            lr=config.discriminator_lr,
            betas=betas,
            weight_decay=config.discriminator_weight_decay,
        )
        d_sched = torch.optim.lr_scheduler.LambdaLR(d_opt, lambda _: 1.0)
    return Optimizers(g_opt, g_sched, d_opt, d_sched)


class RunLog:
    """``output_dir/log.jsonl`` and, when asked for and installed, TensorBoard under
    ``output_dir/tb``; written by the main process only, nothing without ``output_dir``."""

    def __init__(self, config: RLGAFConfig, is_main: bool) -> None:
        self.jsonl: IO[str] | None = None
        self.tensorboard: Any = None
        if not (config.output_dir and is_main):
            return
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
        self.jsonl = open(Path(config.output_dir) / "log.jsonl", "a", encoding="utf-8")
        if config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                pass
            else:
                self.tensorboard = SummaryWriter(str(Path(config.output_dir) / "tb"))

    def write(self, logs: dict, step: int) -> None:
        """One line of JSON, and every number but the step as a TensorBoard scalar."""
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(logs) + "\n")
            self.jsonl.flush()
        if self.tensorboard is not None:
            for key, value in logs.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tensorboard.add_scalar(key, value, step)

    def close(self) -> None:
        """Close the files."""
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
