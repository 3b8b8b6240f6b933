"""Rolling out responses from a causal LM, token by token with a KV cache.

By default a token is drawn from softmax(logits / temperature) with a torch generator; the
Gumbel mode passes its own ``token_sampler`` (Gumbel-max with the randomness contract's noise),
so that its training pass can regenerate the very same noise from the seeds.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch
from torch import Tensor

from rlgaf_fast.rlgaf.data import Batch


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions ``[B, L]`` that count real tokens only, so left padding does not shift them."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def sequence_inputs(batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
    """``(input_ids, attention_mask, position_ids)`` of prompt + response, each ``[B, P + T]``."""
    input_ids = torch.cat([batch.prompt_ids, batch.response_ids], dim=1)
    attention_mask = torch.cat([batch.prompt_mask, batch.response_mask], dim=1)
    return input_ids, attention_mask, position_ids(attention_mask)


def response_slice(logits: Tensor, prompt_len: int) -> Tensor:
    """The positions of a ``[B, P + T, ...]`` forward that predict the T response tokens."""
    return logits[:, prompt_len - 1 : -1]


@functools.cache
def forward_takes(cls: type, name: str) -> bool:
    """Whether ``cls.forward`` has a parameter ``name`` (asked once per class)."""
    return name in inspect.signature(cls.forward).parameters


def _cache_keyword(model: torch.nn.Module) -> str:
    # transformers 5 renamed `past_key_values` to `cache`; support both.
    return "cache" if forward_takes(type(model), "cache") else "past_key_values"


def sample_categorical(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One index per row of ``probs [N, V]`` by inverse-CDF sampling (cumulative sum and binary
    search): several times faster on the CPU than torch.multinomial for large V."""
    cdf = probs.cumsum(-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device) * cdf[:, -1:]
    # The first index whose cdf reaches u: token j takes (cdf[j-1], cdf[j]], and a run of
    # zero-probability tokens shares its cdf with the token before it, which is found first.
    # u = 0 (torch.rand can return 0) would find token 0 even at probability 0: lift it.
    u = u.clamp(min=torch.finfo(u.dtype).tiny)
    return torch.searchsorted(cdf, u).squeeze(-1).clamp(max=probs.shape[-1] - 1)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    generator: torch.Generator | None = None,
    token_sampler: Callable[[Tensor, int], Tensor] | None = None,
) -> Batch:
    """Sample ``max_new_tokens`` tokens after left-padded prompts ``[B, P]``.

    ``token_sampler(logits / temperature [B, V] float32, t) -> tokens [B]`` chooses the tokens
    of step t; by default they are sampled from the softmax with ``generator``. After an EOS a
    sequence gets ``pad_token_id`` and mask 0.
    Returns a Batch whose response_mask is 1 up to and including the EOS.
    """
    batch_size, prompt_len = prompt_ids.shape
    cache_keyword = _cache_keyword(model)
    attention_mask = prompt_mask
    positions = position_ids(attention_mask)
    out = model(
        input_ids=prompt_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True
    )
    next_position = positions[:, -1:] + 1
    tokens = torch.full(
        (batch_size, max_new_tokens), pad_token_id, dtype=torch.int64, device=prompt_ids.device
    )
    mask = torch.zeros_like(tokens)
    finished = torch.zeros(batch_size, dtype=torch.bool, device=prompt_ids.device)
    for t in range(max_new_tokens):
        logits = out.logits[:, -1].float() / temperature
        if token_sampler is not None:
            token = token_sampler(logits, t)
        else:
            token = sample_categorical(torch.softmax(logits, dim=-1), generator)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        tokens[:, t] = token
        mask[:, t] = (~finished).long()
        if eos_token_id is not None:
            finished |= token == eos_token_id
        if t + 1 == max_new_tokens or bool(finished.all()):
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], 1)
        cache = out["cache"] if "cache" in out else out["past_key_values"]
        out = model(
            input_ids=token[:, None],
            attention_mask=attention_mask,
            position_ids=next_position,
            use_cache=True,
            **{cache_keyword: cache},
        )
        next_position = next_position + 1
    return Batch(prompt_ids, prompt_mask, tokens, mask)


def left_align(values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Move the padding of each row of ``values [B, L, ...]`` to the left, keeping the order of
    real tokens, so that the last position is always real (sequence classifiers read it)."""
    order = torch.argsort(mask, dim=1, stable=True)
    mask = mask.gather(1, order)
    index = order.view(*order.shape, *([1] * (values.dim() - 2))).expand_as(values)
    return values.gather(1, index), mask


def pad_left_to(
    values: Tensor, mask: Tensor, length: int, pad_value: float = 0
) -> tuple[Tensor, Tensor]:
    """Left-pad ``values [B, L, ...]`` and ``mask [B, L]`` to ``length`` positions."""
    extra = length - values.shape[1]
    if extra <= 0:
        return values, mask
    pad = values.new_full((values.shape[0], extra, *values.shape[2:]), pad_value)
    return torch.cat([pad, values], 1), torch.cat([mask.new_zeros(mask.shape[0], extra), mask], 1)
