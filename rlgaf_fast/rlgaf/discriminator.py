"""Discriminators: anything called as ``d(inputs_embeds=[B, L, D], attention_mask=[B, L])``
returning an object with ``.logits`` of shape ``[B, 1]`` (or ``[B, 2]``: real minus fake), with
``get_input_embeddings()`` for its token embedding. Hugging Face sequence-classification models
qualify; :class:`CNNDiscriminator` is the SeqGAN-style alternative.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rlgaf_fast.rlgaf.data import Batch
from rlgaf_fast.rlgaf.rollout import forward_takes, left_align, pad_left_to, position_ids


def build_transformer_discriminator(
    vocab_size: int,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 256,
    pad_token_id: int = 0,
) -> nn.Module:
    """A small randomly initialised ``LlamaForSequenceClassification`` with one output logit."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        num_labels=1,
        pad_token_id=pad_token_id,
    )
    return LlamaForSequenceClassification(config)


class CNNDiscriminator(nn.Module):
    """SeqGAN's discriminator: embedding, parallel 1-D convolutions of several widths with
    max-pooling over time, a highway layer, dropout, one logit."""

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int = 64,
        filters: tuple[tuple[int, int], ...] = ((2, 64), (3, 64), (4, 64), (5, 64)),
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.convs = nn.ModuleList(nn.Conv1d(embed_dim, n, w) for w, n in filters)
        width = sum(n for _, n in filters)
        self.highway = nn.Linear(width, 2 * width)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(width, 1)
        self.max_width = max(w for w, _ in filters)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embedding

    def forward(
        self,
        input_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> SimpleNamespace:
        x = self.embedding(input_ids) if inputs_embeds is None else inputs_embeds
        if attention_mask is not None:
            x = x * attention_mask.unsqueeze(-1).to(x.dtype)
        if x.shape[1] < self.max_width:
            x = F.pad(x, (0, 0, self.max_width - x.shape[1], 0))
        x = x.transpose(1, 2)
        h = torch.cat([F.relu(conv(x)).amax(-1) for conv in self.convs], dim=-1)
        transform, gate = self.highway(h).chunk(2, dim=-1)
        gate = torch.sigmoid(gate)
        h = gate * F.relu(transform) + (1 - gate) * h
        return SimpleNamespace(logits=self.out(self.dropout(h)))


class RecurrentDiscriminator(nn.Module):
    """An LSTM (or GRU) sequence classifier: embedding, a recurrent network over the real tokens,
    one logit from the final state and the outputs max-pooled over time.

    A recurrent state can keep a stack of open brackets, the inductive bias of the rule task
    (docs/rule-task.md); the max-pool keeps a violation seen mid-sequence from being forgotten by
    the end. Rows may be left-padded (as :func:`sequences_for_discriminator` writes them): only
    the positions the mask marks real are read, in order.
    """

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int = 64,
        hidden_size: int = 128,
        num_layers: int = 1,
        cell: str = "lstm",
    ) -> None:
        super().__init__()
        if cell not in ("lstm", "gru"):
            raise ValueError(f"cell must be lstm or gru, got {cell!r}")
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        rnn = nn.LSTM if cell == "lstm" else nn.GRU
        self.rnn = rnn(embed_dim, hidden_size, num_layers, batch_first=True)
        self.out = nn.Linear(2 * hidden_size, 1)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embedding

    def forward(
        self,
        input_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> SimpleNamespace:
        """``logits`` float ``[B, 1]`` of ``input_ids [B, L]`` or ``inputs_embeds [B, L, D]``
        with ``attention_mask [B, L]`` (1 real, 0 padding; every row needs a real token)."""
        x = self.embedding(input_ids) if inputs_embeds is None else inputs_embeds
        if attention_mask is None:
            attention_mask = torch.ones(x.shape[:2], dtype=torch.int64, device=x.device)
        # Real tokens first, in order (padding last), so that packing reads exactly them.
        order = torch.argsort(1 - attention_mask.long(), dim=1, stable=True)
        x = x.gather(1, order[..., None].expand_as(x))
        lengths = attention_mask.sum(1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(
            x, lengths, batch_first=True, enforce_sorted=False
        )
        outputs, state = self.rnn(packed)
        last = (state[0] if isinstance(state, tuple) else state)[-1]  # [B, H]
        outputs, _ = nn.utils.rnn.pad_packed_sequence(
            outputs, batch_first=True, padding_value=-math.inf, total_length=x.shape[1]
        )
        pooled = outputs.amax(1)
        return SimpleNamespace(logits=self.out(torch.cat([last, pooled], -1)))


class LMDiscriminator(nn.Module):
    """A discriminator that judges a sequence by how a causal LM finds it.

    The LM (typically a copy of the generator's MLE warm start, as RLHF reward models start from
    the SFT model) reads the sequence; each token t >= 1 is scored by a small MLP of two
    features of the LM's prediction for it: the token's log-probability log p(x_t | x_<t) and
    the entropy of that prediction, both divided by log V. The logit is the sum of the scores
    over the real tokens: a learned log density ratio of demonstrations to generations.

    With the LM frozen (the default) only the MLP trains (4 * hidden + 1 parameters: 129) and it
    cannot memorise the demonstrations, so it generalises to sequences it never saw. With
    ``context_features=True`` the MLP also reads the LM's final hidden state before the token (the
    context it was predicted from), so it can learn where the LM is over- or under-confident
    ((d + 4) * hidden + 1 parameters for model width d). It needs tied
    input and output embeddings: the log-probability of a soft token (Gumbel mode, a convex
    combination of embedding rows) is then the same combination of the tokens' log-probabilities.

    ``bigram_sequences`` ``[N, L]`` (int64 token ids) adds a third feature: log(1 + the number of
    times the bigram (x_{t-1}, x_t) occurs in them), divided by log V. It is knowledge the LM
    lacks: a small LM spreads probability over transitions the data never shows. Give sequences
    other than the discriminator's real examples, so that for those the count is what a fresh
    sequence would see rather than the sequence's own. The token ids then travel as one more
    channel of the input embeddings (:class:`TokenIdEmbedding`). In Gumbel mode this needs
    ``straight_through=True`` (soft tokens are refused): the channel then holds the hard token's
    id, and the feature is a constant without gradient.
    """

    def __init__(
        self,
        lm: nn.Module,
        hidden: int = 32,
        train_lm: bool = False,
        context_features: bool = False,
        bigram_sequences: Tensor | None = None,
    ) -> None:
        super().__init__()
        head = lm.get_output_embeddings()
        if head is None or head.weight is not lm.get_input_embeddings().weight:
            raise ValueError(
                "lm must tie its input and output embeddings (tie_word_embeddings=True)"
            )
        if getattr(head, "bias", None) is not None:
            raise ValueError("lm's output layer must have no bias")
        self.lm = lm.requires_grad_(train_lm)
        self.context_features = context_features
        self.embedding: nn.Module = lm.get_input_embeddings()
        self.bigrams = bigram_sequences is not None
        if self.bigrams:
            self.embedding = TokenIdEmbedding(self.embedding)
            keys, counts = bigram_keys(bigram_sequences, head.weight.shape[0]).unique(
                return_counts=True
            )
            self.register_buffer("bigram_keys", keys, persistent=False)
            self.register_buffer("bigram_log_counts", counts.float().log1p(), persistent=False)
        inputs = 2 + self.bigrams + (head.weight.shape[1] if context_features else 0)
        self.head = nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def get_input_embeddings(self) -> nn.Module:
        return self.embedding

    def bigram_feature(self, ids: Tensor) -> Tensor:
        """log(1 + count) ``[B, L-1]`` of each bigram of ``ids`` ``[B, L]`` in the table."""
        keys = bigram_keys(ids, self.lm.get_input_embeddings().weight.shape[0])
        index = torch.searchsorted(self.bigram_keys, keys).clamp(max=len(self.bigram_keys) - 1)
        found = self.bigram_keys[index] == keys
        return torch.where(found, self.bigram_log_counts[index], 0.0)

    def forward(
        self,
        input_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> SimpleNamespace:
        x = self.get_input_embeddings()(input_ids) if inputs_embeds is None else inputs_embeds
        if self.bigrams:  # the last channel is the token id (TokenIdEmbedding)
            channel, x = x[..., -1].detach(), x[..., :-1]
            ids = channel.round().long()
            if not torch.equal(ids.to(channel.dtype), channel):
                raise ValueError(
                    "LMDiscriminator(bigram_sequences=...) needs hard tokens: the "
                    "token-id channel holds non-integers (soft Gumbel-Softmax tokens "
                    "need straight_through=True)"
                )
        if attention_mask is None:
            attention_mask = torch.ones(x.shape[:2], dtype=torch.int64, device=x.device)
        hidden = self.lm.model(
            inputs_embeds=x,
            attention_mask=attention_mask,
            position_ids=position_ids(attention_mask),
            use_cache=False,
        ).last_hidden_state
        weight = self.lm.get_input_embeddings().weight
        logits = (hidden[:, :-1] @ weight.T).float()  # [B, L-1, V]: predictions of x_1..
        lse = torch.logsumexp(logits, -1)
        entropy = lse - (torch.softmax(logits, -1) * logits).sum(-1)
        # <h_{t-1}, e_t> - logsumexp: the token's log-probability, linear in a soft token.
        token_logp = (hidden[:, :-1] * x[:, 1:]).float().sum(-1) - lse
        scale = math.log(weight.shape[0])
        features = [token_logp / scale, entropy / scale]
        if self.bigrams:
            features.append(self.bigram_feature(ids) / scale)
        features = torch.stack(features, -1)
        if self.context_features:
            features = torch.cat([features, hidden[:, :-1].float()], -1)
        scores = self.head(features).squeeze(-1)  # [B, L-1]
        valid = (attention_mask[:, 1:] * attention_mask[:, :-1]).to(scores.dtype)
        return SimpleNamespace(logits=(scores * valid).sum(-1, keepdim=True))


class TokenIdEmbedding(nn.Module):
    """An embedding whose output carries the token id as one more channel: ``[..., D + 1]``.

    Its ``weight`` (``[V, D + 1]``, the last column the ids 0 .. V-1) makes the soft-embedding op
    of Gumbel mode carry the id of a hard or straight-through token in that channel too.
    """

    def __init__(self, embedding: nn.Module) -> None:
        super().__init__()
        if embedding.weight.dtype not in (torch.float32, torch.float64):
            raise ValueError(
                "TokenIdEmbedding needs a float32 or float64 embedding to carry "
                f"token ids exactly, got {embedding.weight.dtype}"
            )
        self.embedding = embedding

    @property
    def weight(self) -> Tensor:
        w = self.embedding.weight
        ids = torch.arange(w.shape[0], device=w.device, dtype=w.dtype)
        return torch.cat([w, ids[:, None]], 1)

    def forward(self, input_ids: Tensor) -> Tensor:
        x = self.embedding(input_ids)
        return torch.cat([x, input_ids.to(x.dtype)[..., None]], -1)


def bigram_keys(ids: Tensor, vocab_size: int) -> Tensor:
    """``x_{t-1} * V + x_t`` ``[B, L-1]`` of the bigrams of ``ids`` ``[B, L]``."""
    return ids[:, :-1] * vocab_size + ids[:, 1:]


class _ClassifierPaddingWarningFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "will not detect padding tokens in `inputs_embeds`" not in record.getMessage()


_CLASSIFIER_PADDING_WARNING = _ClassifierPaddingWarningFilter()


@contextlib.contextmanager
def left_aligned_inputs(discriminator: nn.Module | None = None) -> Iterator[None]:
    """Calls of a discriminator on left-aligned sequences (:func:`sequences_for_discriminator`,
    :func:`stack_batches`): drops transformers' warning that a sequence classifier given
    ``inputs_embeds`` cannot find the padding and reads the last position, which is real in
    every left-aligned row. Only for the duration, so that other code keeps the warning (but
    transformers gives it once per process, and a dropped one counts as given).

    The generic sequence-classification head (Llama, Qwen, ...) warns through
    ``transformers.modeling_layers``; models with their own head (GPT-2, OPT, ...) through their
    module's logger, which ``discriminator`` names."""
    names = {"transformers.modeling_layers"}
    if discriminator is not None:
        names.add(type(discriminator).__module__)
    loggers = [logging.getLogger(name) for name in names]
    for logger in loggers:
        logger.addFilter(_CLASSIFIER_PADDING_WARNING)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(_CLASSIFIER_PADDING_WARNING)


def discriminator_logit(discriminator: nn.Module, embeds: Tensor, mask: Tensor) -> Tensor:
    """The "real" logit ``[B]`` of sequences given as embeddings ``[B, L, D]`` (float32).

    A discriminator whose forward takes ``position_ids`` gets positions that count real tokens
    only: with absolute position embeddings (GPT-2, BERT) left padding would otherwise shift a
    sequence's positions and change its score with the length of its batch-mates."""
    kwargs = {}
    if forward_takes(type(discriminator), "position_ids"):
        kwargs["position_ids"] = position_ids(mask)
    out = discriminator(inputs_embeds=embeds, attention_mask=mask, **kwargs)
    logits = (out.logits if hasattr(out, "logits") else out).float()
    if logits.dim() == 2 and logits.shape[-1] == 2:
        return logits[:, 1] - logits[:, 0]
    return logits.reshape(logits.shape[0])


def sequences_for_discriminator(parts: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Concatenate (values, mask) parts along time, left-align each row, and return
    ``(values [B, L, ...], mask [B, L])``."""
    values = torch.cat([v for v, _ in parts], dim=1)
    mask = torch.cat([m for _, m in parts], dim=1)
    return left_align(values, mask)


def token_sequences(batch: Batch) -> tuple[Tensor, Tensor]:
    """Prompt + response token ids of ``batch``, left-aligned, with their mask: how the
    discriminator (or an rlhf reward model) reads a batch of hard tokens."""
    return sequences_for_discriminator(
        [(batch.prompt_ids, batch.prompt_mask), (batch.response_ids, batch.response_mask)]
    )


def stack_batches(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Stack two left-aligned batches of possibly different lengths along the batch."""
    length = max(a[0].shape[1], b[0].shape[1])
    a, b = pad_left_to(*a, length), pad_left_to(*b, length)
    return torch.cat([a[0], b[0]], 0), torch.cat([a[1], b[1]], 0)


def discriminator_loss(real_logit: Tensor, fake_logit: Tensor, objective: str) -> Tensor:
    """The discriminator's loss (float scalar) from its logits on demonstrations ``[B_real]``
    and generations ``[B_fake]``. ``bce``: binary cross-entropy, demonstrations labelled 1 and
    generations 0, averaged over all B_real + B_fake sequences. ``bradley_terry``: row i of each
    is a pair for the same prompt (B_real == B_fake), loss -log sigmoid(s_demo - s_gen) averaged
    over the pairs."""
    if objective == "bce":
        logit = torch.cat([real_logit, fake_logit])
        labels = torch.cat([torch.ones_like(real_logit), torch.zeros_like(fake_logit)])
        return F.binary_cross_entropy_with_logits(logit, labels)
    if objective == "bradley_terry":
        if real_logit.shape != fake_logit.shape:
            raise ValueError(
                f"bradley_terry pairs demonstrations with generations row for row; got "
                f"{list(real_logit.shape)} and {list(fake_logit.shape)} scores"
            )
        return -F.logsigmoid(real_logit - fake_logit).mean()
    raise ValueError(f"discriminator_loss must be bce or bradley_terry, got {objective!r}")


def reward_from_logit(logit: Tensor, reward_type: str) -> Tensor:
    """Generator reward from the discriminator's real logit l (D = sigmoid(l)):
    ``log_d`` = log D, ``neg_log_1m_d`` = -log(1 - D), ``logit`` = l."""
    if reward_type == "log_d":
        return F.logsigmoid(logit)
    if reward_type == "neg_log_1m_d":
        return -F.logsigmoid(-logit)
    if reward_type == "logit":
        return logit
    raise ValueError(f"reward_type must be log_d, neg_log_1m_d or logit, got {reward_type!r}")
