"""rlgaf_fast.reference against closed forms and values computed by hand, never against itself:
every kernel is tested against the reference, so a mistake here would pass everywhere else."""

import math

import pytest
import torch

from rlgaf_fast import reference

F64 = torch.float64


def _t(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


# --- KL estimators ----------------------------------------------------------------------------

# d = logprobs - ref_logprobs at 0.5, -1 and 2. Values: k1 = d, k2 = d^2 / 2,
# k3 = exp(-d) + d - 1 (exp(-0.5) - 0.5, e - 2, exp(-2) + 1); k3+ has k3's value.
# Gradients with respect to logprobs: 1, d, 1 - exp(-d); k3+ has k2's.
KL_DELTAS = (0.5, -1.0, 2.0)
K3 = (0.10653065971263342, 0.7182818284590451, 1.1353352832366128)
KL_VALUES = {"k1": (0.5, -1.0, 2.0), "k2": (0.125, 0.5, 2.0), "k3": K3, "k3+": K3}
KL_GRADIENTS = {
    "k1": (1.0, 1.0, 1.0),
    "k2": KL_DELTAS,
    "k3": (0.3934693402873666, -1.718281828459045, 0.8646647167633873),
    "k3+": KL_DELTAS,
}


def test_every_kl_estimator_has_hand_computed_values():
    assert set(KL_VALUES) == set(reference.KL_ESTIMATORS) == set(KL_GRADIENTS)


@pytest.mark.parametrize("estimator", reference.KL_ESTIMATORS)
def test_kl_estimate_values_and_gradients_at_known_log_ratios(estimator):
    ref = _t(-1.5, -0.25, -3.0).requires_grad_()
    logprobs = (ref.detach() + _t(*KL_DELTAS)).requires_grad_()
    kl = reference.kl_estimate(logprobs, ref, estimator)
    torch.testing.assert_close(kl, _t(*KL_VALUES[estimator]), rtol=1e-12, atol=1e-12)
    grad_logprobs, grad_ref = torch.autograd.grad(kl.sum(), (logprobs, ref))
    torch.testing.assert_close(grad_logprobs, _t(*KL_GRADIENTS[estimator]), rtol=1e-12, atol=1e-12)
    # every estimator is a function of the difference only
    torch.testing.assert_close(grad_ref, -grad_logprobs, rtol=0, atol=0)


@pytest.mark.parametrize("estimator", reference.KL_ESTIMATORS)
def test_kl_estimate_is_zero_where_the_policies_agree(estimator):
    logprobs = torch.randn(50, dtype=F64) - 2
    kl = reference.kl_estimate(logprobs, logprobs.clone(), estimator)
    assert torch.equal(kl, torch.zeros_like(kl))


@pytest.mark.parametrize("estimator", ["k2", "k3", "k3+"])
def test_kl_estimate_k2_and_k3_are_non_negative(estimator):
    torch.manual_seed(0)
    logprobs, ref = torch.randn(2, 10_000, dtype=F64) * 3
    kl = reference.kl_estimate(logprobs, ref, estimator)
    assert bool((kl >= 0).all())
    # and positive wherever the log-probabilities differ
    assert bool((kl[(logprobs - ref).abs() > 1e-3] > 0).all())


def test_kl_estimate_rejects_an_unknown_estimator():
    with pytest.raises(ValueError, match="kl_estimator must be one of"):
        reference.kl_estimate(_t(0.0), _t(0.0), "k4")


# --- loss aggregation -------------------------------------------------------------------------

# Three sequences of four tokens: the first keeps 2 tokens (sum 1 + 2 = 3), the second all 4
# (sum 5 + 6 + 7 + 8 = 26), the third none. The masked-out entries hold NaN and inf: they must
# add exactly nothing.
AGG_LOSS = [[1.0, 2.0, math.nan, math.inf], [5.0, 6.0, 7.0, 8.0], [math.nan, 10.0, 11.0, 12.0]]
AGG_MASK = [[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]
AGG_EXPECTED = {
    "token-mean": 29 / 6,  # (3 + 26) / 6 tokens
    "seq-mean-token-mean": (3 / 2 + 26 / 4) / 2,  # the empty sequence does not count
    "seq-mean-token-sum": (3 + 26) / 2,
    "seq-mean-token-sum-norm": 29 / (3 * 4),  # a constant divisor: B * T, empty rows included
}


def test_every_loss_agg_mode_has_a_hand_computed_value():
    assert set(AGG_EXPECTED) == set(reference.LOSS_AGGS)


@pytest.mark.parametrize("loss_agg", reference.LOSS_AGGS)
def test_aggregate_loss_of_a_hand_made_batch(loss_agg):
    loss = reference.aggregate_loss(_t(*AGG_LOSS), _t(*AGG_MASK), loss_agg)
    assert loss.item() == pytest.approx(AGG_EXPECTED[loss_agg], rel=1e-14)


def test_aggregate_loss_normalisers():
    token_loss, mask = _t(*AGG_LOSS), _t(*AGG_MASK)
    # DAPO: the sum over unmasked tokens divided by the given token count
    loss = reference.aggregate_loss(token_loss, mask, "token-mean", num_items_in_batch=10)
    assert loss.item() == pytest.approx(29 / 10, rel=1e-14)
    # Dr. GRPO with a given norm: B * loss_agg_norm
    loss = reference.aggregate_loss(token_loss, mask, "seq-mean-token-sum-norm", loss_agg_norm=2)
    assert loss.item() == pytest.approx(29 / (3 * 2), rel=1e-14)


@pytest.mark.parametrize(
    ("loss_agg", "expected"),
    [
        ("token-mean", 4 / 2),
        ("seq-mean-token-mean", 4 / 2),
        ("seq-mean-token-sum", 4.0),
        ("seq-mean-token-sum-norm", 4 / 3),
    ],
)
def test_aggregate_loss_of_one_sequence(loss_agg, expected):
    loss = reference.aggregate_loss(_t(1.0, 2.0, 3.0), _t(1, 0, 1), loss_agg)
    assert loss.item() == pytest.approx(expected, rel=1e-14)


@pytest.mark.parametrize("loss_agg", reference.LOSS_AGGS)
def test_aggregate_loss_without_unmasked_tokens_is_zero(loss_agg):
    loss = reference.aggregate_loss(
        torch.full((2, 3), math.nan, dtype=F64), torch.zeros(2, 3), loss_agg
    )
    assert loss.item() == 0.0


def test_aggregate_loss_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="loss_agg must be one of"):
        reference.aggregate_loss(_t(1.0), _t(1.0), "sum")


# --- PPO clipped objective --------------------------------------------------------------------


def _ppo(advantage: float, ratio: float, vocab: int = 2, logits=None, **options):
    """ppo_loss of one token whose ratio to the old policy is ``ratio``: uniform logits over
    ``vocab`` categories give logp = -log(vocab), and old_logprobs = logp - log(ratio)."""
    logits = torch.zeros(1, vocab, dtype=F64) if logits is None else logits
    old = _t(-math.log(vocab) - math.log(ratio))
    return reference.ppo_loss(
        logits, torch.zeros(1, dtype=torch.long), old, _t(advantage), **options
    )


# (advantage, ratio, loss, clipped) with clip_eps 0.2: loss = max(-A r, -A clip(r, 0.8, 1.2)).
PPO_CASES = [
    (1.0, 1.1, -1.1, False),  # inside the range: -A r
    (1.0, 1.5, -1.2, True),  # A > 0 above 1 + eps: the gain stops at 1.2
    (1.0, 0.5, -0.5, False),  # A > 0 below 1 - eps: not clipped (pessimistic side)
    (2.0, 1.5, -2.4, True),
    (-1.0, 0.9, 0.9, False),
    (-1.0, 0.5, 0.8, True),  # A < 0 below 1 - eps: the gain stops at 0.8
    (-1.0, 1.5, 1.5, False),  # A < 0 above 1 + eps: not clipped
    (-0.5, 3.0, 1.5, False),
]


@pytest.mark.parametrize(("advantage", "ratio", "expected", "clipped"), PPO_CASES)
def test_ppo_loss_clipped_objective_by_hand(advantage, ratio, expected, clipped):
    logits = torch.zeros(1, 2, dtype=F64, requires_grad=True)
    out = _ppo(advantage, ratio, logits=logits, clip_eps=0.2)
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    assert out.ratio_mean.item() == pytest.approx(ratio, rel=1e-12)
    assert out.clipfrac.item() == float(clipped)
    # d loss / d logp is -A r where unclipped and 0 where clipped; d logp / d logits is
    # onehot(action) - softmax = (0.5, -0.5)
    (grad,) = torch.autograd.grad(out.loss, logits)
    slope = 0.0 if clipped else -advantage * ratio
    torch.testing.assert_close(grad, _t(0.5 * slope, -0.5 * slope).reshape(1, 2))


def test_ppo_loss_token_mean_over_the_hand_cases():
    n = len(PPO_CASES)
    advantages = _t(*[c[0] for c in PPO_CASES])
    old = _t(*[-math.log(2) - math.log(c[1]) for c in PPO_CASES])
    out = reference.ppo_loss(
        torch.zeros(n, 2, dtype=F64), torch.zeros(n, dtype=torch.long), old, advantages
    )
    assert out.loss.item() == pytest.approx(sum(c[2] for c in PPO_CASES) / n, rel=1e-12)
    assert out.clipfrac.item() == pytest.approx(sum(c[3] for c in PPO_CASES) / n, rel=1e-12)


def test_ppo_loss_asymmetric_and_dual_clip_by_hand():
    # clip_eps_high 0.28: A > 0 gains up to 1.28
    assert _ppo(1.0, 1.5, clip_eps_high=0.28).loss.item() == pytest.approx(-1.28, rel=1e-12)
    # the lower bound stays 1 - clip_eps
    assert _ppo(-1.0, 0.5, clip_eps_high=0.28).loss.item() == pytest.approx(0.8, rel=1e-12)
    # dual clip 3: a negative advantage's loss is at most -3 A (here max(5, 1.2) = 5 -> 3)
    assert _ppo(-1.0, 5.0, dual_clip=3.0).loss.item() == pytest.approx(3.0, rel=1e-12)
    # ... and a positive advantage's is untouched
    assert _ppo(1.0, 5.0, dual_clip=3.0).loss.item() == pytest.approx(-1.2, rel=1e-12)


def test_ppo_loss_entropy_bonus_lowers_the_loss():
    # Uniform logits over 4 categories: entropy log 4 > 0, so the loss is pg - c log 4.
    base = _ppo(1.0, 1.0, vocab=4).loss.item()
    with_bonus = _ppo(1.0, 1.0, vocab=4, entropy_coef=0.1).loss.item()
    assert base == pytest.approx(-1.0, rel=1e-12)
    assert with_bonus == pytest.approx(-1.0 - 0.1 * math.log(4), rel=1e-12)
    assert with_bonus < base


def test_ppo_loss_entropy_bonus_gradient_raises_the_entropy():
    # With no advantage the entropy term alone moves the logits: a descent step on the loss
    # makes the policy less peaked.
    logits = _t(2.0, 0.0, -1.0).reshape(1, 3).requires_grad_()
    out = reference.ppo_loss(
        logits, torch.zeros(1, dtype=torch.long), _t(-0.5), _t(0.0), entropy_coef=1.0
    )
    (grad,) = torch.autograd.grad(out.loss, logits)
    _, entropy_before = reference.logprobs_and_entropy(
        logits.detach(), torch.zeros(1, dtype=torch.long)
    )
    _, entropy_after = reference.logprobs_and_entropy(
        logits.detach() - 0.1 * grad, torch.zeros(1, dtype=torch.long)
    )
    assert entropy_after.item() > entropy_before.item()


def test_ppo_loss_kl_penalty_by_hand():
    # logp = -log 2, ref = logp - 0.5: k3 = exp(-0.5) - 0.5, times kl_coef 0.5
    ref = _t(-math.log(2) - 0.5)
    out = _ppo(1.0, 1.0, ref_logprobs=ref, kl_coef=0.5)
    assert out.loss.item() == pytest.approx(-1.0 + 0.5 * K3[0], rel=1e-12)
    assert out.kl.item() == pytest.approx(K3[0], rel=1e-12)


# rho = exp(old - rollout) at log-ratios log 0.5, log 1.5, log 3 with cap 2: truncate gives
# min(rho, 2) = (0.5, 1.5, 2), mask gives 1 where rho <= 2 = (1, 1, 0).
@pytest.mark.parametrize(
    ("correction", "expected"), [("truncate", (0.5, 1.5, 2.0)), ("mask", (1.0, 1.0, 0.0))]
)
def test_rollout_weight_by_hand(correction, expected):
    old = torch.zeros(3, dtype=torch.float64)
    rollout = -torch.log(torch.tensor([0.5, 1.5, 3.0], dtype=torch.float64))
    weight = reference.rollout_weight(old, rollout, correction, cap=2.0)
    assert weight.tolist() == pytest.approx(expected, rel=1e-12)


def test_ppo_loss_with_rollout_correction_weights_each_token():
    # Three tokens with advantage 1 at ratio 1 (token loss -1 each), rho = (0.5, 1.5, 3):
    # truncated weights (0.5, 1.5, 2) give a token-mean loss of -(0.5 + 1.5 + 2) / 3.
    logits = torch.zeros(3, 4, dtype=torch.float64)
    logp = torch.full((3,), -math.log(4), dtype=torch.float64)
    rollout = logp - torch.log(torch.tensor([0.5, 1.5, 3.0], dtype=torch.float64))
    out = reference.ppo_loss(
        logits,
        torch.zeros(3, dtype=torch.long),
        logp,
        torch.ones(3, dtype=torch.float64),
        rollout_logprobs=rollout,
        rollout_correction="truncate",
        rollout_cap=2.0,
    )
    assert out.loss.item() == pytest.approx(-4.0 / 3.0, rel=1e-12)


# --- GAE --------------------------------------------------------------------------------------

# rewards [1, 0, 2], values [0.5, 1, 1.5], gamma 0.9, lam 0.8 (gamma * lam = 0.72):
#   t=2: delta = 2 - 1.5 = 0.5;              A = 0.5
#   t=1: delta = 0 + 0.9 * 1.5 - 1 = 0.35;   A = 0.35 + 0.72 * 0.5 = 0.71
#   t=0: delta = 1 + 0.9 * 1 - 0.5 = 1.4;    A = 1.4 + 0.72 * 0.71 = 1.9112
# With the middle token masked it is skipped: t=0 sees V_next = 1.5 and A_next = 0.5,
#   delta = 1 + 0.9 * 1.5 - 0.5 = 1.85, A = 1.85 + 0.72 * 0.5 = 2.21.
# With the last token masked (padding): t=1 is the end, delta = -1, A = -1;
#   t=0: delta = 1.4, A = 1.4 - 0.72 = 0.68.
GAE_CASES = [
    ((1, 1, 1), (1.9112, 0.71, 0.5), (2.4112, 1.71, 2.0)),
    ((1, 0, 1), (2.21, 0.0, 0.5), (2.71, 0.0, 2.0)),
    ((1, 1, 0), (0.68, -1.0, 0.0), (1.18, 0.0, 0.0)),
]


@pytest.mark.parametrize(("mask", "advantages", "returns"), GAE_CASES)
def test_gae_by_hand(mask, advantages, returns):
    rewards, values = _t(1.0, 0.0, 2.0).reshape(1, 3), _t(0.5, 1.0, 1.5).reshape(1, 3)
    adv, ret = reference.gae(rewards, values, _t(*mask).reshape(1, 3), gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, _t(*advantages).reshape(1, 3), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ret, _t(*returns).reshape(1, 3), rtol=1e-12, atol=1e-12)


# --- noise: uniform and Gumbel from the Philox words ------------------------------------------

# Philox4x32-10 of counter 0 under key 0 is 6627e8d5 e169c58d bc57ac4c 9b00dbd8 (Random123's
# known answer): the words of columns 0..3 of row 0 for seed 0. u = (2 * (word >> 9) + 1) * 2^-24
# and g = -log(-log(u)), worked out in float64.
UNIFORM_ZERO = tuple(n * 2.0**-24 for n in (6694889, 14772677, 12343213, 10158299))
GUMBEL_ZERO = (0.0848202781038536, 2.0616609605912424, 1.1811830803752559, 0.6896916206891326)


def test_uniform_noise_of_known_philox_words():
    assert reference.uniform_noise(0, 1, 4)[0].double().tolist() == list(UNIFORM_ZERO)


def test_gumbel_noise_of_known_philox_words():
    g = reference.gumbel_noise(0, 1, 4)[0].double()
    # two float32 logarithms: an absolute error of about 1e-7 (-log(u) is near 1 for g near 0)
    torch.testing.assert_close(g, _t(*GUMBEL_ZERO), rtol=1e-6, atol=1e-7)


def test_gumbel_noise_is_minus_log_minus_log_of_the_uniform():
    seed, first_row = 2**40 + 77, 2**32 - 2  # a key using both words, rows crossing 2^32
    u = reference.uniform_noise(seed, 4, 37, first_row=first_row)
    g = reference.gumbel_noise(seed, 4, 37, first_row=first_row)
    assert torch.equal(g, -torch.log(-torch.log(u)))


def test_uniform_noise_layout_of_the_randomness_contract():
    # Element (r, c): counter (c // 4, r mod 2^32, r // 2^32, 0), output word c % 4, key from
    # the seed's two 32-bit halves.
    seed, first_row, cols = 2**33 + 5, 2**32 - 1, 10
    u = reference.uniform_noise(seed, 2, cols, first_row=first_row)
    for i, r in enumerate((first_row, first_row + 1)):
        for c in range(cols):
            words = reference.philox4x32(
                *(torch.tensor([v]) for v in (c // 4, r % 2**32, r // 2**32, 0)), seed
            )
            word = int(words[c % 4])
            assert u[i, c].item() == ((word >> 9) * 2 + 1) * 2.0**-24, (r, c)
