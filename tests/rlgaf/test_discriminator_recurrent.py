import pytest
import torch
import torch.nn.functional as F

from rlgaf_fast.rlgaf.discriminator import RecurrentDiscriminator, discriminator_logit
from rlgaf_fast.rlgaf.rollout import pad_left_to

VOCAB = 12


def logit_by_hand(d: RecurrentDiscriminator, ids: torch.Tensor) -> torch.Tensor:
    """The recurrent network run on one unpadded row ``ids [L]``: its last state and its outputs
    max-pooled over time, through the output layer."""
    outputs, state = d.rnn(d.embedding(ids)[None])
    last = (state[0] if isinstance(state, tuple) else state)[-1]
    return d.out(torch.cat([last, outputs.amax(1)], -1)).reshape(())


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_recurrent_discriminator_reads_the_real_tokens_in_order(cell):
    """Rows of different lengths, left-padded with arbitrary ids, score as each row alone."""
    torch.manual_seed(0)
    d = RecurrentDiscriminator(VOCAB, embed_dim=8, hidden_size=16, cell=cell).eval()
    rows = [torch.randint(VOCAB, (n,)) for n in (7, 3, 5)]
    ids, mask = [], []
    for row in rows:
        padded, m = pad_left_to(row[None], torch.ones(1, len(row), dtype=torch.int64), 7)
        padded[m == 0] = torch.randint(VOCAB, (int((m == 0).sum()),))
        ids.append(padded)
        mask.append(m)
    ids, mask = torch.cat(ids), torch.cat(mask)
    with torch.no_grad():
        got = discriminator_logit(d, d.embedding(ids), mask)
        expected = torch.stack([logit_by_hand(d, row) for row in rows])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # The order matters: the same tokens reversed score differently.
    with torch.no_grad():
        reversed_row = logit_by_hand(d, rows[0].flip(0))
    assert not torch.allclose(reversed_row, expected[0])


def test_soft_embeddings_score_as_token_ids_and_carry_gradient():
    """Gumbel mode feeds embeddings: a one-hot mixture of the embedding rows scores as the token
    ids, and the logit is differentiable in the mixture weights."""
    torch.manual_seed(0)
    d = RecurrentDiscriminator(VOCAB, embed_dim=8, hidden_size=16)
    ids = torch.randint(VOCAB, (2, 6))
    weights = F.one_hot(ids, VOCAB).float().requires_grad_()
    soft = discriminator_logit(d, weights @ d.embedding.weight, torch.ones_like(ids))
    hard = d(input_ids=ids).logits.reshape(2)
    torch.testing.assert_close(soft, hard)
    soft.sum().backward()
    assert weights.grad.abs().sum() > 0


def separate(d: torch.nn.Module, steps: int) -> float:
    """Train ``d`` ``steps`` steps on matched (real) against mismatched (fake) pairs of brackets
    5 fillers apart; its accuracy on fresh sequences."""
    generator = torch.Generator().manual_seed(0)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        opening = torch.randint(1, 3, (n, 1), generator=generator)  # types 1, 2; closes 3, 4
        fillers = torch.randint(5, VOCAB, (n, 5), generator=generator)
        real = torch.cat([opening, fillers, opening + 2], 1)
        return real, torch.cat([opening, fillers, 5 - opening], 1)  # the other type

    opt = torch.optim.Adam(d.parameters(), lr=1e-2)
    labels = torch.cat([torch.ones(32), torch.zeros(32)])
    for _ in range(steps):
        real, fake = draw(32)
        loss = F.binary_cross_entropy_with_logits(
            d(input_ids=torch.cat([real, fake])).logits.reshape(-1), labels
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    real, fake = draw(256)
    with torch.no_grad():
        logit = d.eval()(input_ids=torch.cat([real, fake])).logits.reshape(-1)
    return (
        ((logit > 0).float() == torch.cat([torch.ones(256), torch.zeros(256)]))
        .float()
        .mean()
        .item()
    )


def test_recurrent_discriminator_learns_to_match_distant_brackets():
    """A closing bracket must match the opening one 6 tokens before it: at chance untrained,
    the LSTM tells matched from mismatched pairs after 150 steps."""
    torch.manual_seed(0)
    assert separate(RecurrentDiscriminator(VOCAB, embed_dim=8, hidden_size=16), steps=0) < 0.6
    torch.manual_seed(0)
    assert separate(RecurrentDiscriminator(VOCAB, embed_dim=8, hidden_size=16), steps=150) > 0.95


def test_recurrent_discriminator_names_a_bad_cell():
    with pytest.raises(ValueError, match="cell must be lstm or gru, got 'rnn'"):
        RecurrentDiscriminator(VOCAB, cell="rnn")
