import contextlib
import logging

import pytest
import torch
import torch.nn.functional as F

import rlgaf_fast
from rlgaf_fast.rlgaf.discriminator import (
    LMDiscriminator,
    TokenIdEmbedding,
    discriminator_logit,
    left_aligned_inputs,
)
from rlgaf_fast.rlgaf.models import build_causal_lm

VOCAB = 40


def tied_lm(seed=0):
    torch.manual_seed(seed)
    return build_causal_lm(VOCAB, hidden_size=16, num_layers=1, num_heads=2, tie_embeddings=True)


def features_by_hand(lm, ids):
    """log p(x_t | x_<t) and the entropy of that prediction, from the LM's own logits."""
    logp = torch.log_softmax(lm(input_ids=ids).logits[:, :-1].double(), -1)
    token_logp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return token_logp, entropy


def test_lm_discriminator_scores_tokens_by_the_lms_features():
    lm = tied_lm()
    d = LMDiscriminator(lm, hidden=8)
    ids = torch.randint(VOCAB, (3, 7))
    token_logp, entropy = features_by_hand(lm, ids)
    scale = torch.log(torch.tensor(float(VOCAB), dtype=torch.float64))
    features = torch.stack([token_logp / scale, entropy / scale], -1).float()
    expected = d.head(features).squeeze(-1).sum(-1)
    got = discriminator_logit(d, d.get_input_embeddings()(ids), torch.ones_like(ids))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_context_features_add_the_hidden_state_before_each_token():
    lm = tied_lm()
    d = LMDiscriminator(lm, hidden=8, context_features=True)
    assert d.head[0].in_features == 2 + 16
    ids = torch.randint(VOCAB, (3, 7))
    token_logp, entropy = features_by_hand(lm, ids)
    scale = torch.log(torch.tensor(float(VOCAB), dtype=torch.float64))
    context = lm.model(input_ids=ids).last_hidden_state[:, :-1]
    features = torch.cat(
        [torch.stack([token_logp / scale, entropy / scale], -1).float(), context.float()], -1
    )
    expected = d.head(features).squeeze(-1).sum(-1)
    got = discriminator_logit(d, d.get_input_embeddings()(ids), torch.ones_like(ids))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    trainable = [n for n, p in d.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("head.") for n in trainable)


def test_bigram_feature_counts_the_tables_bigrams():
    table = torch.tensor([[1, 2, 3, 1, 2], [1, 2, 4, 4, 0]])  # (1, 2) three times, (4, 4) once
    lm = tied_lm()
    d = LMDiscriminator(lm, hidden=8, bigram_sequences=table)
    assert d.head[0].in_features == 3
    ids = torch.tensor([[1, 2, 4, 4, 5, 3]])
    expected = torch.tensor([[4.0, 2.0, 2.0, 1.0, 1.0]]).log()  # log(1 + count): 3, 1, 1, 0, 0
    torch.testing.assert_close(d.bigram_feature(ids), expected)
    # The logit: the head over the LM's two features and this one, summed over the tokens.
    token_logp, entropy = features_by_hand(lm, ids)
    scale = torch.log(torch.tensor(float(VOCAB), dtype=torch.float64))
    features = torch.stack([token_logp / scale, entropy / scale, expected.double() / scale], -1)
    want = d.head(features.float()).squeeze(-1).sum(-1)
    embeds = d.get_input_embeddings()(ids)
    assert embeds.shape == (1, 6, 17) and torch.equal(embeds[..., -1], ids.float())
    got = discriminator_logit(d, embeds, torch.ones_like(ids))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_token_ids_travel_through_the_soft_embedding_of_a_hard_token():
    # Gumbel mode with straight_through: the fused op's embedding of the hard one-hot carries the
    # sampled token's id in the last channel, so the bigram feature sees the generated tokens.
    d = LMDiscriminator(tied_lm(), hidden=8, bigram_sequences=torch.randint(VOCAB, (4, 6)))
    weight = d.get_input_embeddings().weight
    assert weight.shape == (VOCAB, 17)
    torch.testing.assert_close(weight[:, -1], torch.arange(VOCAB, dtype=torch.float32))
    logits = torch.randn(5, VOCAB, requires_grad=True)
    embeds, tokens = rlgaf_fast.gumbel_softmax_embedding(logits, weight, 0.7, True, seed=3)
    torch.testing.assert_close(embeds, d.get_input_embeddings()(tokens))
    # (token 0 is the LM's padding: its zero embedding would make h_0, the gradient, zero)
    soft = torch.cat(
        [d.get_input_embeddings()(torch.ones(5, 1, dtype=torch.int64)), embeds[:, None]], 1
    )
    discriminator_logit(d, soft, torch.ones(5, 2)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0  # through the LM features


def test_bigram_feature_refuses_soft_tokens():
    d = LMDiscriminator(tied_lm(), hidden=8, bigram_sequences=torch.randint(VOCAB, (4, 6)))
    probs = torch.softmax(torch.randn(3, 5, VOCAB), -1)  # relaxed, not straight-through
    with pytest.raises(ValueError, match="straight_through"):
        discriminator_logit(d, probs @ d.get_input_embeddings().weight, torch.ones(3, 5))


def test_token_id_embedding_needs_exact_ids():
    with pytest.raises(ValueError, match="float32"):
        TokenIdEmbedding(torch.nn.Embedding(VOCAB, 4).to(torch.bfloat16))


def test_lm_discriminator_masks_padding():
    d = LMDiscriminator(tied_lm(), hidden=8)
    ids = torch.randint(VOCAB, (2, 6))
    full = discriminator_logit(d, d.get_input_embeddings()(ids[:, :4]), torch.ones(2, 4))
    padded_ids = torch.cat([ids[:, :4], torch.randint(VOCAB, (2, 2))], 1)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]] * 2)
    padded = discriminator_logit(d, d.get_input_embeddings()(padded_ids), mask)
    torch.testing.assert_close(padded, full, rtol=1e-4, atol=1e-4)


def test_soft_tokens_score_as_the_mixture_of_log_probabilities():
    """A soft token (convex combination of embedding rows) gets the same combination of the
    tokens' log-probabilities: the Gumbel mode's gradient is that of an expectation."""
    lm = tied_lm()
    d = LMDiscriminator(lm, hidden=8)
    ids = torch.randint(VOCAB, (1, 5))
    weight = d.get_input_embeddings().weight
    probs = torch.softmax(torch.randn(VOCAB), -1).requires_grad_(True)
    embeds = weight[ids].detach().clone()
    embeds[0, -1] = probs @ weight
    d.head = torch.nn.Linear(2, 1)  # the score of a token is its log-probability / log V
    with torch.no_grad():
        d.head.weight.copy_(torch.tensor([[1.0, 0.0]]))
        d.head.bias.zero_()
    captured = {}
    d.head.register_forward_pre_hook(lambda module, args: captured.setdefault("f", args[0]))
    discriminator_logit(d, embeds, torch.ones(1, 5)).sum().backward()
    logp = torch.log_softmax(lm(input_ids=ids).logits[0, -2].double(), -1)
    scale = torch.log(torch.tensor(float(VOCAB)))
    expected = (probs.detach().double() @ logp).float() / scale
    torch.testing.assert_close(captured["f"][0, -1, 0], expected, rtol=1e-4, atol=1e-5)
    # On the simplex the gradient is log p / log V up to a constant (the logits).
    expected_grad = (logp / scale).float()
    torch.testing.assert_close(
        probs.grad - probs.grad.mean(), expected_grad - expected_grad.mean(), rtol=1e-4, atol=1e-5
    )


def test_lm_discriminator_trains_only_its_head_by_default():
    d = LMDiscriminator(tied_lm(), hidden=8)
    trainable = [n for n, p in d.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("head.") for n in trainable)
    assert all(p.requires_grad for p in LMDiscriminator(tied_lm(), train_lm=True).parameters())


def test_lm_discriminator_learns_to_separate_likely_from_unlikely_sequences():
    """Real = the LM's greedy sequence, fake = uniform tokens: a few head steps suffice, and the
    separation holds on fresh uniform sequences it never saw."""
    torch.manual_seed(1)
    lm = tied_lm(seed=1)
    with torch.no_grad():
        lm.get_input_embeddings().weight.mul_(8)  # a peaked LM, so likely sequences stand out
    d = LMDiscriminator(lm, hidden=8)

    def greedy():
        ids = torch.zeros(1, 1, dtype=torch.int64)
        for _ in range(6):
            logits = lm(input_ids=ids).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
        return ids

    def logit(ids):
        return discriminator_logit(d, d.get_input_embeddings()(ids), torch.ones_like(ids))

    opt = torch.optim.Adam(d.head.parameters(), lr=1e-2)
    labels = torch.cat([torch.ones(16), torch.zeros(16)])
    with torch.no_grad():
        real_pool = greedy()
    for _ in range(60):
        fake = torch.randint(VOCAB, (16, 7))
        loss = F.binary_cross_entropy_with_logits(
            logit(torch.cat([real_pool.expand(16, -1), fake])), labels
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert (logit(torch.randint(VOCAB, (64, 7))) < logit(real_pool)).float().mean() > 0.95


def test_lm_discriminator_needs_tied_embeddings():
    untied = build_causal_lm(VOCAB, hidden_size=16, num_layers=1, num_heads=2)
    with pytest.raises(ValueError, match="tie"):
        LMDiscriminator(untied)


@contextlib.contextmanager
def warnings_of(logger: logging.Logger):
    """The records ``logger`` emits at WARNING and above inside the block (transformers' loggers
    do not propagate to the root, so pytest's caplog does not see them)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_classifier_padding_warning_is_dropped_only_for_left_aligned_inputs():
    """transformers warns that a classifier given inputs_embeds reads the last position; the
    trainer's sequences are left-aligned, so that position is real and the warning is dropped
    there, and only there."""
    from transformers.utils import logging as transformers_logging

    from rlgaf_fast.rlgaf import build_transformer_discriminator

    transformers_logging.warning_once.cache_clear()  # its warn-once memory of earlier tests
    logger = logging.getLogger("transformers.modeling_layers")
    with warnings_of(logger) as records:
        discriminator = build_transformer_discriminator(16, hidden_size=16, num_layers=1)
        embeds, mask = torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.int64)
        with left_aligned_inputs():
            discriminator_logit(discriminator, embeds, mask)
            logger.warning("another warning")
        transformers_logging.warning_once.cache_clear()
        discriminator_logit(discriminator, embeds, mask)  # elsewhere the warning stays
    messages = [r.getMessage() for r in records]
    assert messages[0] == "another warning"
    assert len(messages) == 2 and "will not detect padding tokens" in messages[1]


def test_absolute_positions_do_not_depend_on_left_padding():
    """A GPT-2 classifier (learned absolute positions) scores a sequence the same alone and
    left-padded beside a longer one: positions count real tokens only."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from rlgaf_fast.rlgaf.models import DiscriminatorOnSequences
    from rlgaf_fast.rlgaf.rollout import pad_left_to

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=16,
        n_layer=1,
        n_head=2,
        n_positions=32,
        num_labels=1,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    discriminator = DiscriminatorOnSequences(GPT2ForSequenceClassification(config).eval())
    ids = torch.randint(1, VOCAB, (1, 5))
    alone = discriminator(ids, torch.ones_like(ids))
    padded = discriminator(*pad_left_to(ids, torch.ones_like(ids), 9))
    torch.testing.assert_close(padded, alone)
    # The positions matter: shifted ones (what left padding did before) score differently.
    embeds = discriminator.discriminator.get_input_embeddings()(ids)
    shifted = discriminator.discriminator(
        inputs_embeds=embeds, position_ids=torch.arange(4, 9)[None]
    ).logits
    assert not torch.allclose(shifted.reshape(1), alone)


def test_padding_warning_is_dropped_for_models_with_their_own_classifier_head():
    """GPT-2 warns from its own module's logger, not transformers.modeling_layers."""
    from transformers import GPT2Config, GPT2ForSequenceClassification
    from transformers.utils import logging as transformers_logging

    from rlgaf_fast.rlgaf.models import DiscriminatorOnSequences

    model = GPT2ForSequenceClassification(
        GPT2Config(
            vocab_size=16,
            n_embd=16,
            n_layer=1,
            n_head=2,
            n_positions=8,
            num_labels=1,
            pad_token_id=0,
        )
    )
    embeds, mask = torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.int64)
    with warnings_of(logging.getLogger(type(model).__module__)) as records:
        transformers_logging.warning_once.cache_clear()
        DiscriminatorOnSequences(model)(embeds, mask)
        assert not [r for r in records if "will not detect padding" in r.getMessage()]
        transformers_logging.warning_once.cache_clear()
        model(inputs_embeds=embeds, attention_mask=mask)  # elsewhere the warning stays
    assert any("will not detect padding" in r.getMessage() for r in records)
