"""What data parallelism through ``accelerate`` (DDP, or FSDP2 sharding) asks of the trainer:
the accelerator, the wrapping of the trained models, reads of whole weights, and the optimiser
step with gradient clipping. Outside a distributed launch each is the plain one-process step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from rlgaf_fast.rlgaf.build import Models, Optimizers


def make_accelerator(accelerator: Any = None) -> tuple[Any, bool]:
    """``(accelerator, fsdp)``: the given ``accelerate.Accelerator`` or a new one, and whether it
    shards the models with FSDP (version 2; version 1 is refused)."""
    if accelerator is None:
        from accelerate import Accelerator

        # cpu=True on a machine without CUDA makes several processes run DDP over gloo.
        accelerator = Accelerator(cpu=not torch.cuda.is_available())
    fsdp = getattr(accelerator, "distributed_type", None) == "FSDP"
    if fsdp and accelerator.state.fsdp_plugin.fsdp_version != 2:
        # FSDP1 flattens the wrapped modules' weights; rollouts, the weight average and the
        # checkpoints read them through FSDP2's unshard() instead.
        raise NotImplementedError(
            "RLGAFTrainer supports FSDP2 only (accelerate launch --use_fsdp "
            "--fsdp_version 2); got FSDP version "
            f"{accelerator.state.fsdp_plugin.fsdp_version}"
        )
    return accelerator, fsdp


def prepare(accelerator: Any, models: Models, optimizers: Optimizers) -> tuple[Models, Optimizers]:
    """The trained models and their optimisers wrapped by ``accelerator`` (DDP, FSDP2, or
    moved to the device); the schedulers stay unwrapped, stepped once per iteration."""
    # One model per prepare call: accelerate's FSDP2 takes no more.
    policy, g_opt = accelerator.prepare(models.policy, optimizers.g_opt)
    discriminator, d_opt = models.discriminator, optimizers.d_opt
    if discriminator is not None:
        discriminator, d_opt = accelerator.prepare(discriminator, d_opt)
    return (
        models._replace(policy=policy, discriminator=discriminator),
        optimizers._replace(g_opt=g_opt, d_opt=d_opt),
    )


@contextlib.contextmanager
def unsharded(fsdp: bool, *modules: nn.Module | None) -> Iterator[None]:
    """Under FSDP, gathers the full weights of ``modules`` (and of their FSDP submodules)
    for reads outside their forward, such as generation; does nothing otherwise. Every
    process must enter it together."""
    if not fsdp:
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    modules = tuple(m for m in modules if isinstance(m, FSDPModule))
    for module in modules:
        # Make the outermost module FSDP's root before an inner one runs on its own (a
        # decoder layer during generation), which would otherwise claim to be the root.
        module._get_fsdp_state()._lazy_init()
    sharded = [m for module in modules for m in module.modules() if isinstance(m, FSDPModule)]
    for m in sharded:
        m.unshard()
    try:
        yield
    finally:
        for m in sharded:
            m.reshard()


def optimizer_step(
    accelerator: Any,
    fsdp: bool,
    loss: Tensor,
    module: nn.Module,
    optimizer: Any,
    max_grad_norm: float,
) -> None:
    """Backward of ``loss`` through ``accelerator``, the gradients of ``module`` clipped to
    ``max_grad_norm`` (when > 0), and a step of ``optimizer``."""
    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    if max_grad_norm > 0 and fsdp:
        # accelerate's FSDP branch finds the model by comparing parameter lists, which
        # fails when two prepared models have as many tensors; torch's clipping takes the
        # sharded (DTensor) gradients directly, after the unscaling that branch does.
        accelerator.unscale_gradients(optimizer)
        torch.nn.utils.clip_grad_norm_(module.parameters(), max_grad_norm)
    elif max_grad_norm > 0:
        accelerator.clip_grad_norm_(module.parameters(), max_grad_norm)
    optimizer.step()


def weight_for_other_update(weight: Tensor, wrapped: nn.Module, fsdp: bool) -> Tensor:
    """``weight``, a parameter of the model that ``wrapped`` wraps, as read by another model's
    update that needs no gradient for it (the generator's Gumbel update reading the
    discriminator's embedding; the fused op skips forming a gradient for a detached weight).
    Under FSDP a detached copy of the gathered weight outlives the resharding during backward;
    DDP, in contrast, expects every parameter it wraps to get a gradient, so under DDP the
    weight stays attached (a one-process CPU launch is DDP-wrapped too, so the wrapper decides,
    not the process count)."""
    if fsdp:
        return weight.detach().clone()
    if not isinstance(wrapped, DistributedDataParallel):
        return weight.detach()
    return weight
