"""Small config-built Hugging Face models (random init, nothing downloaded), for tests, the
``tiny`` preset and the SeqGAN oracle benchmark."""

from __future__ import annotations

from torch import nn


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
