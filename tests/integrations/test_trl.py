"""rlgaf_fast.integrations.trl: a GRPOTrainer trains the same with enable() as with TRL's own path.

A tiny Llama built from its config and a word-level tokenizer built in memory (nothing is
downloaded) train for 10 GRPO steps on the CPU with a rule-based reward, once with TRL's method
and once enabled, from the same seed; the logged losses, rewards, entropies and gradient norms
must agree. Both runs sample from the same weights as long as the updates agree, so the rewards
match exactly and the rest within float32 rounding of a differently ordered reduction.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL is not installed (pip install 'rlgaf_fast[trl]')")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

import rlgaf_fast  # noqa: E402
from rlgaf_fast.bench.trl_grpo import (  # noqa: E402
    ATOL,
    METRICS,
    RTOL,
    curves,
    even_words,
    llama,
    word_prompts,
    word_tokenizer,
)
from rlgaf_fast.integrations import trl as rlgaf_trl  # noqa: E402

VOCAB = 64


class _StandInOutput(NamedTuple):
    log_probs: torch.Tensor
    entropy: torch.Tensor | None


def _stand_in_fused_linear_logprobs(
    hidden,
    weight,
    labels,
    *,
    bias=None,
    temperature=1.0,
    logit_scale=1.0,
    softcap=None,
    outputs=("log_probs", "entropy"),
    backend="auto",
):
    """Test double with the signature of rlgaf_fast.fused_linear_logprobs, for builds without it.

    hidden [N, H] and weight [V, H] floating, labels int64 [N]; returns float32 [N] log-probs of
    the labels and entropies (None unless asked for) of softmax(cap(scale * logits) / T).
    """
    log_probs, entropies = [], []
    for rows, targets in zip(hidden.split(16), labels.split(16), strict=True):
        logits = torch.nn.functional.linear(rows, weight, bias).float() * logit_scale
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        logp = (logits / temperature).log_softmax(-1)
        log_probs.append(logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1))
        entropies.append(-(logp.exp() * logp).sum(-1))
    empty = hidden.new_zeros(0, dtype=torch.float32)
    log_probs = torch.cat(log_probs) if log_probs else empty
    entropy = (torch.cat(entropies) if entropies else empty) if "entropy" in outputs else None
    return _StandInOutput(log_probs, entropy)


@pytest.fixture(autouse=True)
def fused_op(monkeypatch):
    """The real op where this build has it, else the test double."""
    if not hasattr(rlgaf_fast, "fused_linear_logprobs"):
        monkeypatch.setattr(
            rlgaf_fast, "fused_linear_logprobs", _stand_in_fused_linear_logprobs, raising=False
        )


@pytest.fixture(autouse=True)
def one_thread():
    # The model is so small that two threads on two shared cores mostly wait on each other
    # (about 8x slower here).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model():
    return llama(
        VOCAB, 32, 64, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64
    )


def _trainer(tmp_path, *, enabled: bool, model=None, **overrides):
    settings = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=6,
        max_steps=10,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        seed=0,
        save_strategy="no",
        disable_tqdm=True,
        # TRL defaults to bfloat16 autocast; float32 lets the two paths agree to float32
        # rounding (test_method_matches_trl covers bfloat16).
        bf16=False,
    )
    settings.update(overrides)
    trainer = trl.GRPOTrainer(
        model=_model() if model is None else model,
        reward_funcs=even_words,
        args=trl.GRPOConfig(**settings),
        train_dataset=word_prompts(16, 3, VOCAB),
        processing_class=word_tokenizer(VOCAB),
    )
    return rlgaf_trl.enable(trainer) if enabled else trainer


# Every loss type TRL 1.16's GRPO has in common with rlgaf_fast's PPO variants, each with token and
# sequence importance sampling; one config each also covers the temperature, the reference model
# (beta > 0) and several iterations per generation (the old policy's log-probabilities).
CONFIGS = [
    dict(loss_type="grpo", importance_sampling_level="token"),
    dict(loss_type="grpo", importance_sampling_level="sequence", temperature=0.7),
    dict(loss_type="dapo", importance_sampling_level="token", beta=0.04),
    dict(loss_type="dapo", importance_sampling_level="sequence"),
    dict(loss_type="dr_grpo", importance_sampling_level="token", num_iterations=2),
    dict(loss_type="dr_grpo", importance_sampling_level="sequence"),
    dict(loss_type="cispo", importance_sampling_level="token", temperature=1.3),
    dict(loss_type="cispo", importance_sampling_level="sequence", num_iterations=2),
]


def test_training_matches_trl(tmp_path):
    # From a folder, since TRL loads the reference model (beta > 0) by the policy's name.
    saved = tmp_path / "tiny-llama"
    _model().save_pretrained(saved)
    worst = {k: 0.0 for k in METRICS}
    for config in CONFIGS:
        histories = []
        for enabled in (False, True):
            trainer = _trainer(tmp_path, enabled=enabled, model=str(saved), **config)
            trainer.train()
            histories.append(curves(trainer))
        theirs, ours = histories
        assert len(theirs["loss"]) == 10, config
        assert any(g > 0 for g in theirs["grad_norm"]), f"no update to compare: {config}"
        assert ours["reward"] == theirs["reward"], config
        for key in METRICS:
            for step, (a, b) in enumerate(zip(theirs[key], ours[key], strict=True)):
                if a is None and b is None:
                    continue
                assert math.isclose(a, b, rel_tol=RTOL, abs_tol=ATOL), (config, key, step, a, b)
                worst[key] = max(worst[key], abs(a - b) / max(abs(a), ATOL))
    print("largest relative differences:", worst)


def _batch(tokenizer, logits_to_keep):
    torch.manual_seed(1)
    ids = torch.randint(4, VOCAB, (5, 9))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding of the prompt
    mask[3, -3:] = 0  # a completion that ended early
    mask[4, -logits_to_keep:] = 0  # nothing to score in this row
    ids = ids.masked_fill(mask == 0, tokenizer.pad_token_id)
    return ids, mask


# Per call, float32: rounding only. bfloat16 autocast: both paths project in bfloat16 and agree on
# the log-probabilities, but TRL keeps the hidden states' gradient in float32 where the op returns
# it in bfloat16, so the parameters' gradients differ by about bfloat16's resolution (2^-8).
GRAD_RTOL = {False: 1e-5, True: 2e-2}


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("compute_entropy", [False, True])
def test_method_matches_trl(tmp_path, compute_entropy, bf16):
    """Per call: log-probs, entropies and their gradients, with chunking, logits_to_keep and T."""
    trainer = _trainer(tmp_path, enabled=False, temperature=0.8, max_steps=1, bf16=bf16)
    ids, mask = _batch(trainer.processing_class, logits_to_keep=4)
    results = []
    for enabled in (False, True):
        if enabled:
            rlgaf_trl.enable(trainer)
        trainer.model.zero_grad()
        logps, entropy, aux = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, mask, 4, batch_size=2, compute_entropy=compute_entropy
        )
        assert aux is None
        assert logps.shape == (5, 4)
        loss = logps.sum() + (entropy.sum() if compute_entropy else 0)
        loss.backward()
        grads = [p.grad.clone() for p in trainer.model.parameters()]
        results.append((logps.detach(), None if entropy is None else entropy.detach(), grads))
    (ref_logps, ref_entropy, ref_grads), (logps, entropy, grads) = results
    torch.testing.assert_close(logps, ref_logps, rtol=1e-5, atol=1e-6)
    assert (logps[4] == 0).all()
    if compute_entropy:
        torch.testing.assert_close(entropy, ref_entropy, rtol=1e-5, atol=1e-6)
    else:
        assert entropy is None and ref_entropy is None
    for g, ref in zip(grads, ref_grads, strict=True):
        assert (g - ref).norm() <= GRAD_RTOL[bf16] * ref.norm()


def test_enable_is_per_instance_and_disable_restores(tmp_path):
    ours = _trainer(tmp_path, enabled=True, max_steps=1)
    theirs = _trainer(tmp_path, enabled=False, max_steps=1)
    method = type(theirs)._get_per_token_logps_and_entropies
    assert rlgaf_trl.is_enabled(ours) and not rlgaf_trl.is_enabled(theirs)
    assert theirs._get_per_token_logps_and_entropies.__func__ is method
    assert rlgaf_trl.enable(ours) is ours  # twice is once
    assert rlgaf_trl.disable(ours) is ours
    assert not rlgaf_trl.is_enabled(ours)
    assert ours._get_per_token_logps_and_entropies.__func__ is method


def test_unsupported_head_is_refused(tmp_path):
    model = _model()
    model.lm_head = torch.nn.Sequential(model.lm_head)
    trainer = _trainer(tmp_path, enabled=False, model=model, max_steps=1)
    with pytest.raises(rlgaf_trl.UnsupportedError, match="plain torch.nn.Linear.*Sequential"):
        rlgaf_trl.enable(trainer)
    assert not rlgaf_trl.is_enabled(trainer)


def test_old_trl_is_refused(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, enabled=False, max_steps=1)
    monkeypatch.setattr(trl, "__version__", "1.15.2")
    with pytest.raises(rlgaf_trl.UnsupportedError, match="TRL >= 1.16; TRL 1.15.2"):
        rlgaf_trl.enable(trainer)


def test_not_a_grpo_trainer_is_refused():
    with pytest.raises(rlgaf_trl.UnsupportedError, match="trl.GRPOTrainer"):
        rlgaf_trl.enable(object())
