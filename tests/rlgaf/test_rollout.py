import torch

from rlgaf_fast.rlgaf.data import Batch, pad_left, pad_right, step_seed
from rlgaf_fast.rlgaf.models import build_causal_lm
from rlgaf_fast.rlgaf.rollout import generate, left_align, sample_categorical, sequence_inputs


def test_sample_categorical_matches_probabilities():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    generator = torch.Generator().manual_seed(0)
    n = 20000
    draws = sample_categorical(probs.expand(n, -1), generator)
    counts = torch.bincount(draws, minlength=5).double()
    expected = probs.double() * n
    assert counts[4] == 0
    chi2 = ((counts[:4] - expected[:4]) ** 2 / expected[:4]).sum().item()
    assert chi2 < 16.3  # 99.9% quantile of chi-square with 3 degrees of freedom


def test_sample_categorical_never_draws_a_zero_probability_token(monkeypatch):
    """At the ends of the uniform draw (exactly 0, the largest float below 1) and where it
    meets the cumulative sum exactly, next to zero-probability tokens."""
    probs = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.25, 0.75, 0.0], [0.5, 0.0, 0.5, 0.0]])
    expected = {0.0: [2, 1, 0], 0.5: [2, 2, 0], 1.0 - 2.0**-24: [2, 2, 2]}
    for u, tokens in expected.items():
        monkeypatch.setattr(torch, "rand", lambda *shape, u=u, **kw: torch.full(shape, u))
        assert sample_categorical(probs).tolist() == tokens, u


def test_generate_stops_after_eos_and_masks():
    torch.manual_seed(0)
    model = build_causal_lm(8, hidden_size=16, num_layers=1, num_heads=2)
    prompt_ids, prompt_mask = pad_left([[3], [4, 5, 6]], pad_id=0)

    def sampler(logits, t):  # sequence 0 ends at step 1, sequence 1 never
        return torch.tensor([7, 2]) if t != 1 else torch.tensor([1, 2])

    batch = generate(
        model, prompt_ids, prompt_mask, 4, eos_token_id=1, pad_token_id=0, token_sampler=sampler
    )
    assert batch.response_ids.tolist() == [[7, 1, 0, 0], [2, 2, 2, 2]]
    assert batch.response_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


def test_cached_generation_matches_full_forward():
    torch.manual_seed(0)
    model = build_causal_lm(16, hidden_size=16, num_layers=2, num_heads=2).eval()
    prompt_ids, prompt_mask = pad_left([[3], [4, 5, 6]], pad_id=0)
    recorded = []

    def sampler(logits, t):
        recorded.append(logits)
        return logits.argmax(-1)

    batch = generate(model, prompt_ids, prompt_mask, 5, token_sampler=sampler)
    input_ids, attention_mask, position_ids = sequence_inputs(batch)
    full = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
    ).logits[:, 2:-1]
    torch.testing.assert_close(torch.stack(recorded, 1), full.float(), atol=1e-4, rtol=1e-4)


def test_sequence_inputs_positions_skip_left_padding():
    prompt_ids, prompt_mask = pad_left([[3], [4, 5]], pad_id=0)
    response_ids, response_mask = pad_right([[7, 8], [9]], pad_id=0)
    _, mask, positions = sequence_inputs(
        Batch(prompt_ids, prompt_mask, response_ids, response_mask)
    )
    assert mask.tolist() == [[0, 1, 1, 1], [1, 1, 1, 0]]
    assert positions[0, 1:].tolist() == [0, 1, 2] and positions[1, :3].tolist() == [0, 1, 2]


def test_left_align_keeps_token_order():
    values = torch.tensor([[1, 2, 0, 0], [0, 3, 4, 5]])
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])
    aligned, aligned_mask = left_align(values, mask)
    assert aligned.tolist() == [[0, 0, 1, 2], [0, 3, 4, 5]]
    assert aligned_mask.tolist() == [[0, 0, 1, 1], [0, 1, 1, 1]]


def test_step_seed_differs_per_step_rank_stream_and_sub():
    seeds = {
        step_seed(0, s, r, k, u)
        for s in range(10)
        for r in range(2)
        for k in range(3)
        for u in range(4)
    }
    assert len(seeds) == 240 and all(0 <= s < 2**63 for s in seeds)
