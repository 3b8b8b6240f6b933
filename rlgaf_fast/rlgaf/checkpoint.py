"""Checkpoints of an :class:`RLGAFTrainer`: save one directory, load it back, and training
continues exactly.

A checkpoint is complete or absent: it is written into a hidden sibling directory
(``.<name>.partial``), flushed to disk and renamed into place, so a process killed during a save
(preemption, out of memory) leaves the previous checkpoints intact and no directory that looks
like a checkpoint but is not one. :func:`latest_checkpoint` finds the newest complete one, and
:class:`GracefulStop` turns SIGTERM and SIGINT into "finish this step, save, stop".

A checkpoint directory holds the weights as safetensors (``generator``, ``discriminator`` and,
with a weight average, ``generator_ema``), the optimisers' and schedulers' state as a
tensors-only torch file (``optimizer.pt``, loaded with ``weights_only=True`` so that a crafted
file cannot run code), the step, the REINFORCE baseline and the config as JSON
(``trainer_state.json``), and each process's random state (``rng-<rank>.pt``).

Under FSDP each process holds a shard of the weights and of the optimiser state; checkpoints
hold them whole (torch.distributed.checkpoint's full state dicts). The weights files are those
written without FSDP; the optimiser state is keyed by parameter name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from rlgaf_fast.rlgaf.trainer import RLGAFTrainer

# Config fields a resumed run may change without changing what it computes.
RESUMABLE_CHANGES = frozenset(
    {
        "output_dir",
        "log_every",
        "save_every",
        "save_total_limit",
        "resume_from",
        "tensorboard",
        "progress_bar",
    }
)
STATE_FILE = "trainer_state.json"  # written last: a directory with it is a checkpoint
_STEP_DIR = re.compile(r"checkpoint-(\d+)")


def save_checkpoint(trainer: RLGAFTrainer, path: str | Path) -> Path:
    """Write ``trainer``'s whole state to directory ``path`` (replacing one of that name)
    atomically: ``path`` appears complete or not at all; returns it. Every process must call
    it together."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    t = trainer
    if t.is_main:
        shutil.rmtree(partial, ignore_errors=True)  # left by a process killed while saving
        partial.mkdir(parents=True)
    t.accelerator.wait_for_everyone()
    _write_checkpoint(t, partial)
    t.accelerator.wait_for_everyone()
    if t.is_main:
        _publish(partial, path)
    t.accelerator.wait_for_everyone()
    return path


def _write_checkpoint(t: RLGAFTrainer, path: Path) -> None:
    from safetensors.torch import save_model

    state = {
        "g_opt": _optimizer_state(t.fsdp, t.policy, t.g_opt),
        "g_sched": t.g_sched.state_dict(),
    }
    if t.d_opt is not None:
        state.update(
            d_opt=_optimizer_state(t.fsdp, t.discriminator, t.d_opt),
            d_sched=t.d_sched.state_dict(),
        )
    _save_weights(t, t.policy, t.unwrapped_policy, path / "generator.safetensors")
    if t.discriminator is not None:
        _save_weights(
            t, t.discriminator, t.unwrapped_discriminator, path / "discriminator.safetensors"
        )
    if t.is_main:
        if t.ema is not None:  # the average and its count (n_averaged)
            save_model(t.ema, str(path / "generator_ema.safetensors"))
        torch.save(state, path / "optimizer.pt")
        trainer_state = {
            "step": t.step_count,
            "reward_baseline": t.reward_baseline,
            "config": t.config.to_dict(),
        }
        (path / STATE_FILE).write_text(json.dumps(trainer_state, indent=1))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, path / f"rng-{t.rank}.pt")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(partial: Path, path: Path) -> None:
    """Make the finished ``partial`` directory ``path``, replacing an older one of that name
    (``final`` saved twice); a crash in between leaves the older one or none, never a mix."""
    for file in partial.iterdir():  # on disk before the rename makes them visible
        _fsync(file)
    _fsync(partial)
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(partial, path)
    _fsync(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_step(path: Path) -> int | None:
    """The step of the complete checkpoint at ``path``, or None if it is not one."""
    try:
        return int(json.loads((path / STATE_FILE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint directly under ``output_dir`` (highest step; of equal
    steps, ``final`` or the most recently written), or None."""
    found = []
    root = Path(output_dir)
    for path in root.iterdir() if root.is_dir() else ():
        step = None if path.name.startswith(".") else checkpoint_step(path)
        if step is not None:
            found.append((step, (path / STATE_FILE).stat().st_mtime, path))
    return max(found)[2] if found else None


def resolve_resume(resume_from: str, output_dir: str | None) -> Path | None:
    """The checkpoint ``resume_from`` names: ``"latest"`` is the newest complete one under
    ``output_dir`` (None when there is none yet: the run starts from the beginning)."""
    if resume_from == "latest":
        if output_dir is None:
            raise ValueError('resume_from="latest" needs output_dir, where checkpoints are saved')
        return latest_checkpoint(output_dir)
    path = Path(resume_from)
    if checkpoint_step(path) is None:
        what = "does not exist" if not path.exists() else f"holds no {STATE_FILE}"
        raise FileNotFoundError(
            f"resume_from: {path} {what}; give a checkpoint directory or 'latest'"
        )
    return path


def prune_checkpoints(output_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest ``checkpoint-<step>`` directories; returns those
    deleted. ``final`` and other names are never deleted."""
    steps = []
    for path in Path(output_dir).iterdir():
        match = _STEP_DIR.fullmatch(path.name)
        if match and path.is_dir():
            steps.append((int(match.group(1)), path))
    doomed = [path for _, path in sorted(steps)[: max(len(steps) - keep, 0)]]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


class GracefulStop:
    """While active, SIGTERM (how clusters and spot machines stop a job) and SIGINT (Ctrl-C) set
    a flag instead of killing the process, so the loop can finish its step, save and return.
    A second SIGINT interrupts at once. Handlers are installed only in the main thread (Python
    allows no other) and restored on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        print(
            f"rlgaf: {self.received} received: finishing this step, saving, then stopping "
            "(Ctrl-C again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def requested(self, accelerator: Any) -> bool:
        """Whether any process received a stop signal (all processes agree, so that they stop
        at the same step)."""
        flag = self.received is not None
        if accelerator.num_processes == 1:
            return flag
        tensor = torch.tensor([float(flag)], device=accelerator.device)
        return bool(accelerator.reduce(tensor, reduction="sum").item() > 0)


def load_checkpoint(trainer: RLGAFTrainer, path: str | Path, stacklevel: int = 2) -> None:
    """Restore into ``trainer`` everything :func:`save_checkpoint` wrote. Warns when the
    trainer's config differs from the checkpoint's in a field that changes what is computed, or
    when this process's random state is missing; ``stacklevel`` is those warnings' (as
    :func:`warnings.warn` counts from here: 2 names the caller)."""
    from safetensors.torch import load_model

    path = Path(path)
    t = trainer
    device = _load_device(t.device)
    _load_weights(t, t.policy, t.unwrapped_policy, path / "generator.safetensors")
    if t.discriminator is not None:
        _load_weights(
            t, t.discriminator, t.unwrapped_discriminator, path / "discriminator.safetensors"
        )
    if t.ema is not None:
        load_model(t.ema, str(path / "generator_ema.safetensors"), device=device)
    state = torch.load(path / "optimizer.pt", map_location=device, weights_only=True)
    _load_optimizer_state(t.fsdp, t.policy, t.g_opt, state["g_opt"])
    t.g_sched.load_state_dict(state["g_sched"])
    if t.d_opt is not None:
        _load_optimizer_state(t.fsdp, t.discriminator, t.d_opt, state["d_opt"])
        t.d_sched.load_state_dict(state["d_sched"])
    trainer_state = json.loads((path / "trainer_state.json").read_text())
    resumable = set(RESUMABLE_CHANGES)
    if t.config.lr_schedule == t.config.tau_schedule == "constant":
        resumable.add("total_steps")  # a longer run, the same steps
    changed = [
        f"{k} ({v!r} -> {getattr(t.config, k)!r})"
        for k, v in trainer_state.get("config", {}).items()
        if k not in resumable and getattr(t.config, k, v) != v
    ]
    if changed:
        warnings.warn(
            f"resuming {path} with a config that differs from its own in "
            f"{', '.join(changed)}; the run will not continue as it would have",
            stacklevel=stacklevel,
        )
    t.step_count = trainer_state["step"]
    t.reward_baseline = trainer_state["reward_baseline"]
    rng_file = path / f"rng-{t.rank}.pt"
    if rng_file.exists():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    else:  # saved by fewer processes: the weights are restored, dropout noise is not
        warnings.warn(
            f"{rng_file} is missing: process {t.rank} keeps its own random "
            "state, so the run will not continue exactly",
            stacklevel=stacklevel,
        )


def _load_device(device: torch.device) -> str:
    # safetensors and torch.load take a CPU as "cpu" only (accelerate may say "cpu:0").
    return "cpu" if device.type == "cpu" else str(device)


def _optimizer_state(fsdp: bool, module: nn.Module, optimizer: Any) -> dict:
    if not fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    return get_optimizer_state_dict(
        module,
        optimizer.optimizer,
        options=StateDictOptions(full_state_dict=True, cpu_offload=True),
    )


def _load_optimizer_state(fsdp: bool, module: nn.Module, optimizer: Any, state: dict) -> None:
    if not fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    set_optimizer_state_dict(
        module, optimizer.optimizer, state, options=StateDictOptions(full_state_dict=True)
    )


def _aliases(module: nn.Module) -> list[list[str]]:
    """The names of each parameter of ``module``: several for a tied weight."""
    names: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return list(names.values())


def _save_weights(
    trainer: RLGAFTrainer, module: nn.Module, unwrapped: nn.Module, file: Path
) -> None:
    from safetensors.torch import save_file, save_model

    if not trainer.fsdp:
        if trainer.is_main:
            save_model(unwrapped, str(file))
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    state = get_model_state_dict(
        module, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if trainer.is_main:
        prefix = "discriminator." if unwrapped is not module else ""
        state = {k.removeprefix(prefix): v.contiguous() for k, v in state.items()}
        for names in _aliases(unwrapped):  # one name per tied weight, as save_model
            for name in [n for n in names if n in state][1:]:
                del state[name]
        save_file(state, str(file), metadata={"format": "pt"})


def _load_weights(
    trainer: RLGAFTrainer, module: nn.Module, unwrapped: nn.Module, file: Path
) -> None:
    from safetensors.torch import load_file, load_model

    device = _load_device(trainer.device)
    if not trainer.fsdp:
        load_model(unwrapped, str(file), device=device)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )

    state = load_file(str(file), device=device)
    # A file holds one name of each tied weight, and torch.distributed.checkpoint shards
    # only the first name of a tied weight that its own state dict lists: give it exactly
    # that name (strict=False lets the other names go, as they are the same tensor).
    group = {}
    for i, names in enumerate(_aliases(unwrapped)):
        found = [state[n] for n in names if n in state]
        if not found:
            raise KeyError(f"{file} lacks the weight {names[0]}")
        for name in names:
            state.setdefault(name, found[0])
            group[name] = i
    prefix = "discriminator." if unwrapped is not module else ""
    chosen: dict[Any, str] = {}
    for key in get_model_state_dict(module):  # sharded: no gathering
        name = key.removeprefix(prefix)
        chosen.setdefault(group.get(name, name), key)
    set_model_state_dict(
        module,
        {k: state[k.removeprefix(prefix)] for k in chosen.values()},
        options=StateDictOptions(full_state_dict=True, strict=False),
    )
