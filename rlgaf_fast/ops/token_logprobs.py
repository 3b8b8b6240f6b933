"""Per-token log-probabilities of the actions: public function, custom operators with autograd,
and backend dispatch.

The fused backends reuse the PPO kernels (rlgaf_fast.ops._ppo): their forward already computes
each row's log-probability of its action in one read of the row (ppo_loss_fwd). The gradient of
sum_n g_n * logp_n is the PPO kernel's gradient for the loss with only a k1 KL term: with zero
advantages the policy term and its gradient vanish, d kl / d logp = 1 for k1, so kl_coef = 1 and
token weights g leave w_n * d loss_n / d logits = g_n * d logp_n / d logits, written in the same
two reads of the row. The torch backend is rlgaf_fast.reference.token_logprobs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlgaf_fast import reference
from rlgaf_fast._backend import kernel_module, resolve_backend
from rlgaf_fast.ops._checks import check_floating, check_positive, check_tensor
from rlgaf_fast.ops._ppo import (
    PPOOptions,
    TokenInputs,
    compute_dtype,
    fused_rows,
    refuse_double_backward,
)
from rlgaf_fast.ops.registry import OPS

__all__ = ["token_logprobs"]

_OP = "token_logprobs"


@torch.library.custom_op("rlgaf_fast::token_logprobs", mutates_args=())
def _token_logprobs_op(logits: Tensor, actions: Tensor, temperature: float, backend: str) -> Tensor:
    """logprobs [N] in the compute dtype for contiguous logits [N, V] and int64 actions [N]."""
    logprobs, _, _ = kernel_module(_OP, backend).ppo_loss_fwd(logits, actions, temperature)
    return logprobs


@_token_logprobs_op.register_fake
def _(logits, actions, temperature, backend):
    return logits.new_empty(logits.shape[:1], dtype=compute_dtype(logits.dtype))


@torch.library.custom_op("rlgaf_fast::token_logprobs_backward", mutates_args=())
def _token_logprobs_backward_op(
    grad: Tensor, logits: Tensor, actions: Tensor, temperature: float, backend: str
) -> Tensor:
    """d(sum_n grad[n] * logp_n) / d logits, in the logits' shape and dtype."""
    zeros = torch.zeros_like(grad)
    tokens = TokenInputs(
        actions=actions, old_logprobs=zeros, advantages=zeros, ref_logprobs=zeros, token_weight=grad
    )
    options = PPOOptions(
        ratio_low=1.0,
        ratio_high=1.0,
        dual_clip=0.0,
        kl_coef=1.0,
        kl_estimator="k1",
        entropy_coef=0.0,
        temperature=temperature,
    )
    grad_logits = torch.empty_like(logits)
    fused_rows(kernel_module(_OP, backend), logits, tokens, options, grad_logits)
    return grad_logits


@_token_logprobs_backward_op.register_fake
def _(grad, logits, actions, temperature, backend):
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output):
    logits, actions, temperature, backend = inputs
    ctx.save_for_backward(logits, actions)
    ctx.temperature, ctx.backend = temperature, backend


def _backward(ctx, grad):
    refuse_double_backward(_OP)
    logits, actions = ctx.saved_tensors
    grad = grad.to(compute_dtype(logits.dtype)).contiguous()
    grad_logits = _token_logprobs_backward_op(grad, logits, actions, ctx.temperature, ctx.backend)
    return grad_logits, None, None, None


_token_logprobs_op.register_autograd(_backward, setup_context=_setup_context)


def token_logprobs(
    logits: Tensor, actions: Tensor, *, temperature: float = 1.0, backend: str = "auto"
) -> Tensor:
    """The log-probability of each action: ``log_softmax(logits / temperature)`` at ``actions``.

    Args:
        logits: ``[B, T, V]`` or ``[N, V]`` (any ``[..., V]`` with V >= 1), float16, bfloat16,
            float32 or float64; arithmetic in float32 (float64 for float64 logits).
        actions: integer, the logits' shape without V, values in [0, V).
        temperature: > 0; the logits are divided by it.
        backend: "auto", "torch", "cpp" or "triton".

    Returns:
        float32 ``[B, T]`` (the actions' shape), differentiable with respect to the logits; equal
        to the ``logprobs`` that :func:`ppo_loss` returns for the same inputs.
    """
    check_floating(logits, "logits", OPS[_OP].dtypes)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must be [..., V] with V >= 1, got shape {list(logits.shape)}")
    check_tensor(actions, "actions")
    if actions.dtype.is_floating_point or actions.dtype.is_complex or actions.dtype == torch.bool:
        raise TypeError(f"actions must be an integer tensor, got {actions.dtype}")
    shape, V = logits.shape[:-1], logits.shape[-1]
    if tuple(actions.shape) != tuple(shape):
        raise ValueError(
            f"actions must have the logits' shape without the vocabulary {list(shape)}, got "
            f"{list(actions.shape)}"
        )
    if actions.device != logits.device:
        raise ValueError(
            f"actions must be on the logits' device {logits.device}, got {actions.device}"
        )
    # eager only: under torch.compile the check would be a data-dependent branch (the kernels
    # give NaN for an action out of range instead of reading out of bounds)
    if not torch.compiler.is_compiling() and actions.numel() > 0:
        if bool(((actions < 0) | (actions >= V)).any()):
            raise ValueError(f"actions must be in [0, V) = [0, {V})")
    temperature = check_positive(temperature, "temperature")
    name = resolve_backend(backend, logits, _OP)
    if name == "torch":
        return reference.token_logprobs(logits, actions, temperature=temperature)
    logprobs = _token_logprobs_op(
        logits.reshape(-1, V).contiguous(),
        actions.detach().reshape(-1).long().contiguous(),
        temperature,
        name,
    )
    return logprobs.float().reshape(shape)
