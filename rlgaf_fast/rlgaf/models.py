"""The trainer's model wrappers (the policy with its value head, the discriminator reading
sequences), and small config-built Hugging Face models (random init, nothing downloaded) for
tests, the ``tiny`` preset and the SeqGAN oracle benchmark."""

from __future__ import annotations

import math

from torch import Tensor, nn

from rlgaf_fast.rlgaf.discriminator import discriminator_logit, left_aligned_inputs


def build_causal_lm(
    vocab_size: int,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 256,
    pad_token_id: int = 0,
    eos_token_id: int | None = None,
    tie_embeddings: bool = False,
    attention_dropout: float = 0.0,
) -> nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` of the given size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=tie_embeddings,
        attention_dropout=attention_dropout,
    )
    return LlamaForCausalLM(config)


class PolicyWithValue(nn.Module):
    """The generator LM and, for PPO, a scalar value head on its last hidden state. One module,
    so that one DDP wrapper synchronises both."""

    def __init__(self, model: nn.Module, with_value_head: bool) -> None:
        super().__init__()
        self.model = model
        self.value_head = None
        if with_value_head:
            hidden = model.get_input_embeddings().weight.shape[1]
            self.value_head = nn.Linear(hidden, 1)
            nn.init.normal_(self.value_head.weight, std=1.0 / math.sqrt(hidden))
            nn.init.zeros_(self.value_head.bias)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        """``(logits [B, L, V], values [B, L] or None)``."""
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            output_hidden_states=self.value_head is not None,
        )
        values = None
        if self.value_head is not None:
            # [B, L, 1] -> [B, L] as a tensor of its own: FSDP2 warns about outputs that are
            # views, whose in-place changes would skip its backward hooks.
            values = self.value_head(out.hidden_states[-1].float()).squeeze(-1).clone()
        return out.logits, values


class DiscriminatorOnSequences(nn.Module):
    """The discriminator, reading left-aligned sequences ``[B, L]`` of token ids (embedded here)
    or ``[B, L, D]`` embeddings, with their mask; returns the real logit ``[B]``.

    The embedding lookup sits inside this module's forward so that the data-parallel wrapper
    sees every use of the discriminator's weights: FSDP reduces a parameter's gradient only for
    uses inside the forward it wraps.
    """

    def __init__(self, discriminator: nn.Module) -> None:
        super().__init__()
        self.discriminator = discriminator
        config = getattr(discriminator, "config", None)
        if config is not None and hasattr(config, "pad_token_id") and config.pad_token_id is None:
            # transformers' classifiers refuse batches without a pad token id, which they use
            # only to find the last token of input_ids; given left-aligned embeddings they
            # read the last position, whatever the id.
            config.pad_token_id = 0

    def forward(self, values: Tensor, mask: Tensor) -> Tensor:
        if not values.is_floating_point():
            values = self.discriminator.get_input_embeddings()(values)
        with left_aligned_inputs(self.discriminator):
            logit = discriminator_logit(self.discriminator, values, mask)
        # Not a view of the discriminator's [B, 1] output (FSDP2 warns about views, as above).
        return logit.clone()
