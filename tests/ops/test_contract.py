"""Property-based tests: one contract on every backend, searched over shapes, layouts, dtypes,
extreme values and options (docs/design.md, "Special values").

Each example is compared with the float64 reference (rlgaf_fast.reference on the input upcast to
float64) within a tolerance that follows the dtype and the conditioning of the example: a
relative error eps in a logit of size |x| moves softmax((x + g) / tau) by about eps * |x| / tau,
so the tolerance grows with |x| / tau, and where it reaches the size of the outputs only the
invariants are checked (finite, in [0, 1], rows summing to one). Non-finite values must match
the reference in kind: NaN where it has NaN, the same infinity where it has one.

The fixed-seed profile runs in CI; ``RLGAF_HYPOTHESIS_PROFILE=long`` searches much longer.
Every counterexample found becomes a regular test at the end of this file.
"""

from __future__ import annotations

import os

import pytest
import torch

# hypothesis comes with the test extra; an image that cannot install it (a GPU machine without
# network) skips this file instead of failing to collect it
pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import rlgaf_fast  # noqa: E402
from rlgaf_fast import reference  # noqa: E402
from rlgaf_fast.ops.registry import has_kernel  # noqa: E402
from tests.conftest import fused_backends  # noqa: E402

settings.register_profile(
    "ci",
    max_examples=25,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "long",
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile(os.environ.get("RLGAF_HYPOTHESIS_PROFILE", "ci"))

BACKENDS = ["torch", *fused_backends()]
PPO_BACKENDS = ["torch", *[b for b in fused_backends() if has_kernel("ppo_loss", b)]]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
EPS = {
    torch.float64: 2.0**-52,
    torch.float32: 2.0**-23,
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
}
GUMBEL_MAX = 20.0  # the largest |g| the 24-bit uniform can give is about 17.3


def _compute_eps(dtype: torch.dtype) -> float:
    """Machine epsilon of the arithmetic: float32 for the 16-bit types."""
    return EPS[torch.float64] if dtype == torch.float64 else EPS[torch.float32]


def _interpreted(backend: str) -> bool:
    return backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"


def _device(backend: str) -> str:
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``x`` ([N, V]) in another memory layout."""
    if layout == "transposed":
        return x.t().contiguous().t()
    if layout == "strided":
        wide = torch.zeros(x.shape[0], 2 * x.shape[1], dtype=x.dtype, device=x.device)
        wide[:, ::2] = x
        return wide[:, ::2]
    if layout == "expanded" and x.shape[0] > 0:
        return x[:1].expand_as(x)
    return x


@st.composite
def logits_case(draw, max_rows: int = 6, max_vocab: int = 70) -> dict:
    """Logits [N, V] (float64 values) with optional -inf columns, and how to lay them out."""
    rows = draw(st.integers(0, max_rows))
    vocab = draw(st.sampled_from([1, 2, 3, 5, 7, 13, 33, max_vocab - 3]))
    scale = draw(st.sampled_from([1.0, 30.0, 1e4]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=gen, dtype=torch.float64) * scale
    if vocab > 1 and draw(st.booleans()):
        # Masked vocabulary: some columns at -inf in every row, never all of them.
        dead = torch.rand(vocab, generator=gen) < 0.3
        dead[draw(st.integers(0, vocab - 1))] = False
        x[:, dead] = float("-inf")
    return {
        "x": x,
        "layout": draw(st.sampled_from(["contiguous", "transposed", "strided", "expanded"])),
        "dtype": draw(st.sampled_from(DTYPES)),
        "seed": seed,
    }


def _inputs(case: dict, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The backend's input in the case's dtype and layout, and the same values in float64 for the
    reference (``case["x"]`` is replaced by those values)."""
    x = _layout(case["x"].to(case["dtype"]).to(device), case["layout"])
    case["x"] = x.detach().cpu().double()
    return x.requires_grad_(), case["x"].clone().requires_grad_()


def _assert_matches(
    got: torch.Tensor, want: torch.Tensor, atol: float, what: str, rtol: float = 0.0
) -> None:
    """``got`` equals ``want`` within atol + rtol * |want| where ``want`` is finite, and has the
    same non-finite values (NaN where NaN, the same infinity) elsewhere."""
    got = got.detach().double().cpu()
    want = want.detach().double().cpu()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    finite = torch.isfinite(want)
    nan_where = torch.isnan(want)
    if not torch.equal(torch.isnan(got), nan_where):
        raise AssertionError(
            f"{what}: NaN at {torch.isnan(got).nonzero().tolist()}, "
            f"the reference at {nan_where.nonzero().tolist()}"
        )
    inf = ~finite & ~nan_where
    assert torch.equal(got[inf], want[inf]), f"{what}: infinities differ from the reference"
    err = (got[finite] - want[finite]).abs()
    bound = atol + rtol * want[finite].abs()
    if err.numel():
        worst = int((err - bound).argmax())
        assert (err <= bound).all(), (
            f"{what}: error {err[worst]:.3g} > tolerance {bound[worst]:.3g} "
            f"(got {got[finite][worst]:.6g}, reference {want[finite][worst]:.6g})"
        )


# --- Gumbel-Softmax --------------------------------------------------------------------------


def _gumbel_tolerance(case: dict, tau: float) -> float:
    """Absolute tolerance on the probabilities: output rounding plus the arithmetic's error in
    (x + g) / tau amplified by the softmax."""
    finite = case["x"][torch.isfinite(case["x"])]
    size = finite.abs().max().item() if finite.numel() else 0.0
    # The noise is drawn in float32 on every backend, also for float64 logits.
    condition = 8 * (_compute_eps(case["dtype"]) * size + EPS[torch.float32] * GUMBEL_MAX) / tau
    return 2 * EPS[case["dtype"]] + condition


def _ambiguous_argmax(case: dict, tau: float, seed: int) -> torch.Tensor:
    """Rows whose two largest perturbed logits are closer than the arithmetic can resolve."""
    x = case["x"]
    if x.shape[-1] < 2 or x.shape[0] == 0:
        return torch.zeros(x.shape[0], dtype=torch.bool)
    z = x + reference.gumbel_noise(seed, *x.shape).double()
    top = z.topk(2, dim=-1).values
    size = z.abs().nan_to_num(0, 0, 0).amax(-1) + GUMBEL_MAX
    return (top[:, 0] - top[:, 1]) <= 16 * EPS[torch.float32] * size


@pytest.mark.parametrize("backend", BACKENDS)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    case=logits_case(),
    tau=st.floats(1e-3, 1e3).map(lambda t: float(f"{t:.3g}")),
    hard=st.booleans(),
    seed=st.integers(0, 2**63 - 1),
)
def test_gumbel_softmax_contract(backend, case, tau, hard, seed):
    device = _device(backend)
    x, x64 = _inputs(case, device)
    y = rlgaf_fast.gumbel_softmax(x, tau=tau, hard=hard, seed=seed, backend=backend)
    ref = reference.gumbel_softmax(x64, tau=tau, hard=hard, seed=seed)
    assert y.dtype == x.dtype and y.shape == x.shape
    grad_out = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    if y.numel():
        (grad,) = torch.autograd.grad(y, x, grad_out.to(y.dtype).to(device))
        (ref_grad,) = torch.autograd.grad(ref, x64, grad_out)
    atol = _gumbel_tolerance(case, tau)
    if hard:
        ambiguous = _ambiguous_argmax(case, tau, seed)
        clear = ~ambiguous
        _assert_matches(y.cpu()[clear], ref[clear], 0.0, "hard sample")
        # An ambiguous row still holds a valid one-hot.
        if ambiguous.any():
            rows = y.detach().cpu()[ambiguous].double()
            assert torch.equal(rows.sum(-1), torch.ones(rows.shape[0], dtype=torch.float64))
    elif atol < 0.5:
        _assert_matches(y, ref, atol, "probabilities")
    else:  # the example is beyond the arithmetic's resolution: invariants only
        rows = y.detach().double().cpu()
        good = torch.isfinite(ref).all(-1)
        assert ((rows[good] >= 0) & (rows[good] <= 1)).all()
        sums = rows[good].sum(-1)
        assert torch.allclose(sums, torch.ones_like(sums), atol=0.02, rtol=0)
    if y.numel():
        ref_size = ref_grad.abs().nan_to_num(0, 0, 0).max().item()
        grad_atol = 4 * atol / tau * grad_out.abs().max().item() + 2 * EPS[case["dtype"]] * ref_size
        if atol < 0.5:
            _assert_matches(grad, ref_grad, grad_atol, "gradient")
        else:
            finite_rows = torch.isfinite(ref_grad).all(-1)
            assert torch.isfinite(grad.cpu()[finite_rows]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    case=logits_case(max_vocab=40),
    width=st.sampled_from([1, 3, 8]),
    weight_dtype=st.sampled_from(DTYPES),
    tau=st.sampled_from([1e-3, 0.1, 1.0, 10.0, 1e3]),
    hard=st.booleans(),
    seed=st.integers(0, 2**63 - 1),
)
def test_gumbel_softmax_embedding_contract(backend, case, width, weight_dtype, tau, hard, seed):
    # triton's interpreter computes tl.dot of bfloat16 operands wrongly (a two-line kernel shows
    # it), so that pairing is checked on GPUs only.
    assume(not (_interpreted(backend) and weight_dtype == torch.bfloat16))
    device = _device(backend)
    x, x64 = _inputs(case, device)
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    w64 = torch.randn(x.shape[-1], width, generator=gen, dtype=torch.float64)
    w64 = w64.to(weight_dtype).double().requires_grad_()
    w = w64.detach().to(weight_dtype).to(device).requires_grad_()
    out, tokens = rlgaf_fast.gumbel_softmax_embedding(
        x, w, tau=tau, hard=hard, seed=seed, backend=backend
    )
    ref, ref_tokens = reference.gumbel_softmax_embedding(x64, w64, tau=tau, hard=hard, seed=seed)
    assert out.dtype == weight_dtype and out.shape == (*x.shape[:-1], width)
    assert tokens.dtype == torch.int64 and tokens.shape == x.shape[:-1]
    p_atol = _gumbel_tolerance(case, tau)
    ambiguous = _ambiguous_argmax(case, tau, seed)
    if p_atol >= 0.5 or (hard and ambiguous.any()):
        return  # beyond the arithmetic's resolution; the probabilities' test checks invariants
    w_size = w64.abs().max().item()
    atol = (p_atol * x.shape[-1] + 4 * EPS[weight_dtype]) * w_size + 1e-12
    _assert_matches(out, ref, atol, "embedding")
    clear = ~ambiguous
    assert torch.equal(tokens.cpu()[clear], ref_tokens[clear]), "tokens differ"
    if out.numel():
        grad_out = torch.randn(out.shape, dtype=torch.float64, generator=gen)
        grads = torch.autograd.grad(out, (x, w), grad_out.to(out.dtype).to(device))
        ref_grads = torch.autograd.grad(ref, (x64, w64), grad_out)
        g_size = grad_out.abs().max().item()
        x_atol = 4 * atol / tau * g_size * x.shape[-1] + 1e-12
        _assert_matches(grads[0], ref_grads[0], x_atol, "logits gradient")
        w_atol = (p_atol + 4 * EPS[weight_dtype]) * g_size * max(x.shape[0], 1) + 1e-12
        _assert_matches(grads[1], ref_grads[1], w_atol, "weight gradient")


@pytest.mark.parametrize("backend", BACKENDS)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    case=logits_case(max_vocab=40),
    width=st.sampled_from([1, 4]),
    top_k=st.one_of(st.none(), st.integers(1, 40)),
)
def test_soft_embedding_contract(backend, case, width, top_k):
    device = _device(backend)
    probs = torch.softmax(case["x"], dim=-1).nan_to_num(0.0)  # rows of probabilities
    case = {**case, "x": probs}
    p, p64 = _inputs(case, device)
    top_k = None if top_k is None else min(top_k, p.shape[-1])
    gen = torch.Generator().manual_seed(case["seed"])
    w64 = torch.randn(p.shape[-1], width, generator=gen, dtype=torch.float64)
    w64 = w64.to(case["dtype"]).double().requires_grad_()
    w = w64.detach().to(case["dtype"]).to(device).requires_grad_()
    out = rlgaf_fast.soft_embedding(p, w, top_k=top_k, backend=backend)
    ref = reference.soft_embedding(p64, w64, top_k=top_k)
    if top_k is not None and top_k < p.shape[-1] and p.shape[0]:
        # Ties at the k-th largest probability may be broken either way.
        kth = p64.detach().topk(min(top_k + 1, p.shape[-1]), dim=-1).values
        if (kth[:, -1] >= kth[:, -2] - 4 * EPS[case["dtype"]]).any():
            return
    atol = 8 * EPS[case["dtype"]] * p.shape[-1] * w64.abs().max().item() + 1e-12
    _assert_matches(out, ref, atol, "soft embedding")


# --- PPO losses ------------------------------------------------------------------------------

PPO_OPTIONS = st.fixed_dictionaries(
    {
        "clip_eps": st.sampled_from([0.1, 0.2]),
        "clip_eps_high": st.sampled_from([None, 0.28]),
        "dual_clip": st.sampled_from([None, 3.0]),
        "kl_coef": st.sampled_from([0.0, 0.1]),
        "kl_estimator": st.sampled_from(["k1", "k2", "k3"]),
        "entropy_coef": st.sampled_from([0.0, 0.01]),
        "temperature": st.sampled_from([0.1, 0.7, 1.0, 3.0]),
        "loss_agg": st.sampled_from(["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]),
    }
)


@st.composite
def ppo_case(draw) -> dict:
    """Logits [B, T, V] and the per-token tensors of a PPO step, with special values."""
    batch, steps = draw(st.integers(0, 3)), draw(st.integers(1, 4))
    logits = draw(logits_case(max_rows=1, max_vocab=40))
    vocab = logits["x"].shape[-1]
    gen = torch.Generator().manual_seed(logits["seed"])
    x = torch.randn(batch * steps, vocab, generator=gen, dtype=torch.float64)
    x = x * draw(st.sampled_from([1.0, 30.0, 1e4]))
    finite_cols = torch.ones(vocab, dtype=torch.bool)
    if vocab > 1 and draw(st.booleans()):
        finite_cols = torch.rand(vocab, generator=gen) > 0.3
        finite_cols[draw(st.integers(0, vocab - 1))] = True
        x[:, ~finite_cols] = float("-inf")
    live = finite_cols.nonzero()[:, 0]
    actions = live[torch.randint(0, live.numel(), (batch * steps,), generator=gen)]
    mask = (torch.rand(batch * steps, generator=gen) > 0.2).double()
    special = draw(st.sampled_from(["none", "impossible action", "dead row"]))
    if batch * steps and special == "impossible action" and not finite_cols.all():
        actions[0] = (~finite_cols).nonzero()[0, 0]
    if batch * steps and special == "dead row":
        x[0] = float("-inf")  # a row with no finite logit (padding), masked or not
        mask[0] = float(draw(st.booleans()))
    shape = (batch, steps)
    # old and reference log-probabilities lie around the policy's (set in _ppo_inputs, once the
    # logits have their layout), so that ratios spread around 1 and clipping happens
    old = 0.4 * torch.randn(batch * steps, generator=gen, dtype=torch.float64)
    ref = 0.4 * torch.randn(batch * steps, generator=gen, dtype=torch.float64)
    return {
        "x": x,
        "shape": shape,
        "layout": logits["layout"],
        "dtype": logits["dtype"],
        "seed": logits["seed"],
        "token_dtype": draw(st.sampled_from([torch.float32, torch.float64])),
        "actions": actions.reshape(shape),
        "old": old.reshape(shape),
        "ref": ref.reshape(shape),
        "adv": torch.randn(batch * steps, generator=gen, dtype=torch.float64).reshape(shape),
        "mask": mask.reshape(shape),
        "options": draw(PPO_OPTIONS),
    }


def _ppo_tolerance(case: dict, ref_out, scale: float) -> float:
    """Absolute tolerance from the arithmetic's error in a log-probability, |x| / temperature
    times its epsilon, times the size of what it multiplies."""
    finite = case["x"][torch.isfinite(case["x"])]
    size = finite.abs().max().item() if finite.numel() else 0.0
    delta = 16 * (_compute_eps(case["dtype"]) * (size / case["options"]["temperature"] + 30))
    return delta * scale + 1e-12


def _near_a_kink(case: dict, ref_out) -> torch.Tensor:
    """Tokens whose ratio is within reach of a clip boundary, where the gradient jumps."""
    o = case["options"]
    ratio = torch.exp(ref_out.logprobs - case["old"]).nan_to_num(0, 0, 0)
    eps_high = o["clip_eps"] if o["clip_eps_high"] is None else o["clip_eps_high"]
    bounds = [1 - o["clip_eps"], 1 + eps_high] + ([o["dual_clip"]] if o["dual_clip"] else [])
    reach = 1e-2 if case["dtype"] in (torch.bfloat16, torch.float16) else 1e-4
    return torch.stack([(ratio - b).abs() < reach * max(b, 1) for b in bounds]).any(0)


def _ppo_inputs(case: dict, device: str):
    flat = {**case, "x": case["x"]}
    x, x64 = _inputs(flat, device)
    case["x"] = flat["x"]
    shape = (*case["shape"], x.shape[-1])
    x, x64 = x.reshape(shape), x64.detach().reshape(shape).requires_grad_()
    temperature = case["options"]["temperature"]
    logp = torch.log_softmax(x64.detach() / temperature, -1).gather(-1, case["actions"][..., None])[
        ..., 0
    ]
    logp = logp.nan_to_num(0.0, 0.0, 0.0)
    case["old"], case["ref"] = case["old"] + logp, case["ref"] + logp
    tok = {k: case[k].to(case["token_dtype"]).to(device) for k in ("old", "ref", "adv", "mask")}
    return x, x64, tok


def _ppo_kwargs(case: dict, tokens: dict) -> dict:
    o = dict(case["options"])
    ref = tokens["ref"] if o["kl_coef"] else None
    return {**o, "ref_logprobs": ref}


@pytest.mark.parametrize("backend", PPO_BACKENDS)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=ppo_case())
def test_ppo_loss_contract(backend, case):
    device = _device(backend)
    x, x64, tok = _ppo_inputs(case, device)
    actions = case["actions"].to(device)
    out = rlgaf_fast.ppo_loss(
        x,
        actions,
        tok["old"],
        tok["adv"],
        tok["mask"],
        backend=backend,
        **_ppo_kwargs(case, tok),
    )
    tok64 = {k: v.double().cpu() for k, v in tok.items()}
    ref = reference.ppo_loss(
        x64, case["actions"], tok64["old"], tok64["adv"], tok64["mask"], **_ppo_kwargs(case, tok64)
    )
    adv = case["adv"].abs().max().item() if case["adv"].numel() else 0.0
    scale = 4 * (adv + 1) * (1 + (case["options"]["dual_clip"] or 1.0))
    atol = _ppo_tolerance(case, ref, scale)
    if atol > 0.1:
        return  # beyond the arithmetic's resolution at this |x| / temperature
    live = case["mask"] > 0
    if not torch.isfinite(ref.loss):
        # An unmasked dead row or an impossible action under a KL term: the loss is not finite
        # on every backend, though NaN and inf may differ with the order of operations.
        assert not torch.isfinite(out.loss), f"loss {out.loss.item()}, reference {ref.loss.item()}"
        return
    _assert_matches(out.loss, ref.loss, atol, "loss", rtol=atol)
    _assert_matches(out.logprobs[live], ref.logprobs[live], atol, "log-probabilities")
    _assert_matches(out.entropy[live], ref.entropy[live], atol, "entropy", rtol=atol)
    kinks = _near_a_kink(case, ref)
    for name in ("approx_kl", "ratio_mean", "kl"):
        got, want = getattr(out, name), getattr(ref, name)
        assert (got is None) == (want is None), name
        if want is not None:
            _assert_matches(got, want, atol, name, rtol=atol)
    slack = kinks.double().sum().item() / max(live.sum().item(), 1)
    _assert_matches(out.clipfrac, ref.clipfrac, slack + 1e-6, "clipfrac")
    if x.numel() and ref.loss.requires_grad:
        (grad,) = torch.autograd.grad(out.loss, x)
        (ref_grad,) = torch.autograd.grad(ref.loss, x64)
        smooth = ~kinks
        g_size = ref_grad.abs().nan_to_num(0, 0, 0).max().item()
        g_atol = _ppo_tolerance(case, ref, scale) * (g_size + 1) / case["options"]["temperature"]
        _assert_matches(
            grad.cpu()[smooth], ref_grad[smooth], g_atol, "gradient", rtol=atol + 2 * EPS[x.dtype]
        )


@pytest.mark.parametrize("backend", PPO_BACKENDS)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=ppo_case())
def test_token_logprobs_contract(backend, case):
    device = _device(backend)
    x, x64, _ = _ppo_inputs(case, device)
    temperature = case["options"]["temperature"]
    actions = case["actions"].to(device)
    got = rlgaf_fast.token_logprobs(x, actions, temperature=temperature, backend=backend)
    want = reference.token_logprobs(x64, case["actions"], temperature=temperature)
    assert got.dtype == torch.float32 and got.shape == actions.shape
    atol = _ppo_tolerance(case, None, 4.0)
    if atol > 0.1:
        return
    _assert_matches(got, want, atol, "log-probabilities", rtol=atol)
    if got.numel() and torch.isfinite(want).all():
        grad_out = torch.randn(got.shape, dtype=torch.float64)
        (grad,) = torch.autograd.grad(got, x, grad_out.float().to(device))
        (ref_grad,) = torch.autograd.grad(want, x64, grad_out.float())
        g_atol = atol * (grad_out.abs().max().item() + 1) / temperature
        _assert_matches(grad, ref_grad, g_atol, "gradient", rtol=atol + 2 * EPS[x.dtype])


@pytest.mark.parametrize("backend", PPO_BACKENDS)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    case=ppo_case(),
    width=st.sampled_from([1, 3, 16]),
    chunk_size=st.sampled_from([None, 1, 3]),
)
def test_fused_linear_ppo_loss_contract(backend, case, width, chunk_size):
    device = _device(backend)
    rows, vocab = case["x"].shape
    gen = torch.Generator().manual_seed(case["seed"] + 2)
    dtype = case["dtype"] if case["dtype"] != torch.float16 else torch.float32
    h64 = torch.randn(rows, width, generator=gen, dtype=torch.float64).to(dtype).double()
    w64 = torch.randn(vocab, width, generator=gen, dtype=torch.float64).to(dtype).double()
    case["x"] = h64 @ w64.T  # no -inf columns: the head's logits are finite
    case["layout"], case["dtype"] = "contiguous", dtype
    _, x64, tok = _ppo_inputs(case, "cpu")
    tok = {k: v.to(device) for k, v in tok.items()}
    hidden = h64.to(dtype).to(device).requires_grad_()
    weight = w64.to(dtype).to(device).requires_grad_()
    h64.requires_grad_()
    w64.requires_grad_()
    shape = case["shape"]
    out = rlgaf_fast.fused_linear_ppo_loss(
        hidden,
        weight,
        case["actions"].reshape(-1).to(device),
        tok["old"].reshape(-1),
        tok["adv"].reshape(-1),
        tok["mask"].reshape(-1),
        chunk_size=chunk_size,
        backend=backend,
        **_ppo_kwargs(case, {k: v.reshape(-1) for k, v in tok.items()}),
    )
    tok64 = {k: v.double().cpu().reshape(-1) for k, v in tok.items()}
    ref = reference.ppo_loss(
        (h64 @ w64.T).reshape(*shape, vocab).reshape(-1, vocab),
        case["actions"].reshape(-1),
        tok64["old"],
        tok64["adv"],
        tok64["mask"],
        **_ppo_kwargs(case, tok64),
    )
    size = (h64.abs().max().item() if h64.numel() else 0.0) * w64.abs().max().item() * width
    # logits formed in the hidden states' dtype, as an LM head forms them
    delta = 8 * (EPS[dtype] * size + _compute_eps(dtype) * (size + 30))
    adv = case["adv"].abs().max().item() if case["adv"].numel() else 0.0
    atol = delta / case["options"]["temperature"] * 8 * (adv + 1)
    if atol > 0.1 or not torch.isfinite(ref.loss):
        return
    _assert_matches(out.loss, ref.loss, atol, "loss", rtol=atol)
    if out.loss.requires_grad and rows:
        grads = torch.autograd.grad(out.loss, (hidden, weight))
        ref_grads = torch.autograd.grad(ref.loss, (h64, w64))
        if _near_a_kink(case, ref._replace(logprobs=ref.logprobs.reshape(shape))).any():
            return  # a ratio on a clip boundary: the gradient may take either side
        for got, want, name in zip(grads, ref_grads, ("hidden", "weight"), strict=True):
            g_atol = atol * (want.abs().max().item() + 1) * vocab
            _assert_matches(got, want, g_atol, f"{name} gradient", rtol=atol)


# --- regressions: each example the search (or a user) found, as a plain test ----------------


def _masked_vocabulary_batch(device: str):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 10, generator=gen)
    logits[..., -3:] = float("-inf")  # the vocabulary's padding columns
    actions = torch.randint(0, 7, (2, 3), generator=gen)
    old = torch.randn(2, 3, generator=gen) - 2.0
    adv = torch.randn(2, 3, generator=gen)
    return [t.to(device) for t in (logits, actions, old, adv)]


@pytest.mark.parametrize("backend", PPO_BACKENDS)
def test_masked_vocabulary_is_finite_and_equal_on_every_backend(backend):
    logits, actions, old, adv = _masked_vocabulary_batch(_device(backend))
    x = logits.clone().requires_grad_()
    out = rlgaf_fast.ppo_loss(x, actions, old, adv, entropy_coef=0.01, backend=backend)
    (grad,) = torch.autograd.grad(out.loss, x)
    assert torch.isfinite(out.loss) and torch.isfinite(out.entropy).all()
    assert torch.isfinite(grad).all() and (grad[..., -3:] == 0).all()
    x64 = logits.cpu().double().requires_grad_()
    ref = reference.ppo_loss(x64, actions.cpu(), old.cpu(), adv.cpu(), entropy_coef=0.01)
    (ref_grad,) = torch.autograd.grad(ref.loss, x64)
    torch.testing.assert_close(out.loss.cpu().double(), ref.loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.entropy.cpu().double(), ref.entropy, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad.cpu().double(), ref_grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", PPO_BACKENDS)
def test_impossible_action_has_logprob_minus_inf_and_no_gradient(backend):
    logits, actions, old, adv = _masked_vocabulary_batch(_device(backend))
    actions[0, 0] = 8  # a -inf column
    x = logits.clone().requires_grad_()
    out = rlgaf_fast.ppo_loss(x, actions, old, adv, backend=backend)
    (grad,) = torch.autograd.grad(out.loss, x)
    assert out.logprobs[0, 0] == float("-inf")
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
    # ratio 0: the token's clipped objective is constant, so its row gets no gradient
    assert (grad[0, 0] == 0).all()


@pytest.mark.parametrize("backend", PPO_BACKENDS)
def test_masked_out_dead_row_adds_nothing(backend):
    logits, actions, old, adv = _masked_vocabulary_batch(_device(backend))
    mask = torch.ones_like(old)
    for bad in (float("-inf"), float("nan")):
        x = logits.clone()
        x[1, 2] = bad  # a padding position with no finite logit
        mask[1, 2] = 0
        x.requires_grad_()
        out = rlgaf_fast.ppo_loss(x, actions, old, adv, mask, entropy_coef=0.01, backend=backend)
        (grad,) = torch.autograd.grad(out.loss, x)
        assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
        assert (grad[1, 2] == 0).all()
        assert torch.isnan(out.logprobs[1, 2]) and torch.isnan(out.entropy[1, 2])
        kept = rlgaf_fast.ppo_loss(
            logits.clone(), actions, old, adv, mask, entropy_coef=0.01, backend=backend
        )
        torch.testing.assert_close(out.loss, kept.loss)


@pytest.mark.parametrize("backend", PPO_BACKENDS)
def test_unmasked_dead_row_is_nan(backend):
    logits, actions, old, adv = _masked_vocabulary_batch(_device(backend))
    logits[1, 2] = float("-inf")
    out = rlgaf_fast.ppo_loss(logits, actions, old, adv, backend=backend)
    assert torch.isnan(out.loss) and torch.isnan(out.logprobs[1, 2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gumbel_dead_row_is_nan_and_token_zero(backend):
    device = _device(backend)
    x = torch.randn(3, 10, device=device)
    x[:, -3:] = float("-inf")
    x[1] = float("-inf")
    y = rlgaf_fast.gumbel_softmax(x, tau=0.5, seed=1, backend=backend)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()
    assert (y[[0, 2], -3:] == 0).all()
    emb, tokens = rlgaf_fast.gumbel_softmax_embedding(
        x, torch.randn(10, 4, device=device), tau=0.5, seed=1, backend=backend
    )
    assert torch.isnan(emb[1]).all() and tokens[1] == 0 and (tokens[[0, 2]] < 7).all()
