"""Peer libraries beside rlgaf_fast in the benchmark suite (``rlgaf-fast bench --peers``): the
same inputs given to eager PyTorch, torch.compile, rlgaf_fast's fused ops and the fused LM-head
functions of TRL, Liger-Kernel and Cut Cross-Entropy, each result checked against
rlgaf_fast.reference before it is timed. Both cases start from hidden states ``[N, H]`` and an
LM head ``[V, H]`` and run forward and backward.

``fused_linear_logprobs``: per-token log-probabilities of the labels and entropies. The backward
starts from ``sum(g * log_probs + e * entropy)`` for fixed random ``g``, ``e`` (the problem's
``grad_log_probs`` and ``grad_entropy``). Providers: eager (reference.fused_linear_logprobs on
the full logits), compile (torch.compile of it), rlgaf_fast.fused_linear_logprobs on each fused
backend, matmuls (the floor), ``trl`` (TRL's ChunkedLogProbFunction, the fused LM head of its
GRPOTrainer, with the trainer's vocabulary chunk) and ``cce (log-probs only)`` (Cut
Cross-Entropy's linear_cross_entropy with reduction "none", which gives -log p of the labels and
no entropy: its backward starts from ``sum(g * log_probs)`` and it is checked against the
reference of that; its torch.compile implementation on a CPU, its Triton kernels on a GPU).

``fused_linear_ppo_loss`` with variant ``GRPO``: the GRPO loss of B sequences of T tokens
(N = B * T; B = 8 where N allows) with completion lengths between T/2 and T, one advantage per
sequence, ratio clip epsilon 0.2 on both sides, KL to reference log-probabilities with the k3
estimator and beta ``BETA``, no entropy term, and Liger's loss_type "grpo" (each sequence's mean
over its tokens, then the mean over sequences: reference loss_agg "seq-mean-token-mean").
Providers: eager and compile (reference.ppo_loss on the full logits), fused_linear_ppo_loss on
each fused backend, matmuls, and ``liger`` (LigerFusedLinearGRPOLoss with its defaults
otherwise: the loss arithmetic under torch.compile, one sequence per chunk). Outputs compared:
the loss, the mean KL and the gradients of hidden and weight.

A peer that cannot be imported becomes an "unavailable" row with the reason; the run goes on.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlgaf_fast import reference
from rlgaf_fast.bench.cases import (
    DTYPES,
    SEED,
    TOLERANCE,
    Case,
    Check,
    Problem,
    Provider,
    _compile,
    _matmuls,
    _old_logprobs,
    _public,
    _relative_error,
)
from rlgaf_fast.bench.presets import BASELINES, CCE, GRPO, LIGER, PEERS, TRL

LOGPROBS = "fused_linear_logprobs"
BETA = 0.04
CLIP_EPS = 0.2
SEQUENCES = 8
# reference.ppo_loss's options for the GRPO case (Liger's loss_type "grpo", beta, epsilon)
GRPO_OPTIONS = {
    "clip_eps": CLIP_EPS,
    "kl_coef": BETA,
    "kl_estimator": "k3",
    "loss_agg": "seq-mean-token-mean",
}
# Peers whose first call compiles (torch.compile inside them): warmed up once before the
# checked call, as the compile baseline is, so that compilation is neither timed nor measured.
COMPILES_ON_FIRST_CALL = (LIGER, CCE)


class Unavailable(RuntimeError):
    """A peer that cannot run here (not installed, or not on this device); the message is the
    row's reason, starting with "unavailable:"."""


def handles(case: Case) -> bool:
    """Whether ``case`` is one of the peer cases (made, run and checked here)."""
    return case.op == LOGPROBS or (case.op == "fused_linear_ppo_loss" and case.variant == GRPO)


def sequences(n: int) -> tuple[int, int]:
    """(B, T) of the GRPO case's N tokens: SEQUENCES sequences (a GRPO group) where N divides."""
    b = SEQUENCES if n % SEQUENCES == 0 else 1
    return b, n // b


# --- inputs -------------------------------------------------------------------------------------


def make_problem(case: Case, device: torch.device) -> Problem:
    """Random inputs of a peer case on ``device``, the same for every provider."""
    generator = torch.Generator(device=device).manual_seed(SEED)
    dtype = DTYPES[case.dtype]
    n, v, h = case.n, case.v, case.d

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, device=device, generator=generator)

    t = {
        "hidden": randn(n, h).to(dtype).requires_grad_(True),
        "weight": (randn(v, h) * h**-0.5).to(dtype).requires_grad_(True),
        "actions": torch.randint(0, v, (n,), device=device, generator=generator),
    }
    if case.op == LOGPROBS:
        t["grad_log_probs"] = randn(n)
        t["grad_entropy"] = randn(n)
        return Problem(t, ("hidden", "weight"))
    b, length = sequences(n)
    with torch.no_grad():
        logits = t["hidden"] @ t["weight"].T
    old = _old_logprobs(logits, t["actions"], generator)
    del logits
    lengths = torch.randint(length // 2, length + 1, (b,), device=device, generator=generator)
    lengths[0] = length  # the longest completion fills the batch's width
    positions = torch.arange(length, device=device)
    advantages = randn(b)
    t.update(
        actions=t["actions"].reshape(b, length),
        old_logprobs=old.reshape(b, length),
        ref_logprobs=(old + 0.1 * randn(n)).reshape(b, length),
        advantages=advantages,
        token_advantages=advantages[:, None].expand(b, length).contiguous(),
        mask=(positions[None, :] < lengths[:, None]).float(),
    )
    return Problem(t, ("hidden", "weight"))


# --- providers ----------------------------------------------------------------------------------


def _objective(p: Problem, log_probs: Tensor, entropy: Tensor | None) -> Tensor:
    """The scalar the backward starts from: sum(g * log_probs [+ e * entropy])."""
    t = p.tensors
    total = (t["grad_log_probs"] * log_probs.float()).sum()
    if entropy is not None:
        total = total + (t["grad_entropy"] * entropy.float()).sum()
    return total


def _logprobs_outputs(p: Problem, log_probs: Tensor, entropy: Tensor | None) -> tuple[Tensor, ...]:
    outputs = (_objective(p, log_probs, entropy), log_probs)
    return outputs if entropy is None else (*outputs, entropy)


def _unavailable(peer: str, error: BaseException) -> Provider:
    reason = f"unavailable: {peer} cannot be imported ({type(error).__name__}: {error})"

    def provider(p: Problem) -> tuple[Tensor, ...]:
        raise Unavailable(reason[:300])

    return provider


def trl_provider() -> Provider:
    """TRL's ChunkedLogProbFunction as its GRPOTrainer calls it: every token, the trainer's
    vocabulary chunk, log-probabilities and entropy only."""
    try:
        from trl.kernels import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE
    except Exception as error:  # noqa: BLE001 - any import failure makes the peer unavailable
        return _unavailable("trl", error)

    def provider(p: Problem) -> tuple[Tensor, ...]:
        t = p.tensors
        log_probs, entropy, *_ = ChunkedLogProbFunction.apply(
            t["hidden"],
            t["weight"],
            None,
            t["actions"],
            1.0,  # temperature
            _CHUNKED_LOGPROB_CHUNK_SIZE,
            None,  # no soft cap
            1.0,  # logit scale
            ("entropy",),
        )
        return _logprobs_outputs(p, log_probs, entropy)

    return provider


def cce_provider() -> Provider:
    """Cut Cross-Entropy's linear_cross_entropy per token (-log p of the labels): its Triton
    kernels on a GPU, its torch.compile implementation elsewhere (the kernels need a GPU)."""
    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception as error:  # noqa: BLE001 - any import failure makes the peer unavailable
        return _unavailable("cut_cross_entropy", error)

    def provider(p: Problem) -> tuple[Tensor, ...]:
        t = p.tensors
        impl = "cce" if t["hidden"].is_cuda else "torch_compile"
        nll = linear_cross_entropy(
            t["hidden"], t["weight"], t["actions"], reduction="none", impl=impl
        )
        return _logprobs_outputs(p, -nll, None)

    return provider


def _grpo_reference(hidden, weight, actions, old_logprobs, token_advantages, mask, ref_logprobs):
    """The eager GRPO loss: the full logits [B, T, V], then reference.ppo_loss."""
    b, length = actions.shape
    logits = (hidden @ weight.T).reshape(b, length, -1)
    return reference.ppo_loss(
        logits,
        actions,
        old_logprobs,
        token_advantages,
        mask,
        ref_logprobs=ref_logprobs,
        **GRPO_OPTIONS,
    )


def _grpo_args(p: Problem) -> tuple[Tensor, ...]:
    t = p.tensors
    names = ("hidden", "weight", "actions", "old_logprobs", "token_advantages", "mask")
    return (*(t[name] for name in names), t["ref_logprobs"])


def _grpo_outputs(out) -> tuple[Tensor, Tensor]:
    return out.loss, out.kl


def liger_provider(loss_type: str = "grpo", compiled: bool = True) -> Provider:
    """LigerFusedLinearGRPOLoss with the case's loss (``loss_type`` "grpo", beta, epsilon) and
    its other defaults; outputs the loss and its mean-KL metric."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except Exception as error:  # noqa: BLE001 - any import failure makes the peer unavailable
        return _unavailable("liger_kernel", error)
    loss_fn = LigerFusedLinearGRPOLoss(
        beta=BETA,
        epsilon_low=CLIP_EPS,
        epsilon_high=CLIP_EPS,
        loss_type=loss_type,
        use_ref_model=True,
        compiled=compiled,
    )

    def provider(p: Problem) -> tuple[Tensor, ...]:
        t = p.tensors
        b, length = t["actions"].shape
        loss, (kl, _clipped) = loss_fn(
            t["hidden"].view(b, length, -1),
            t["weight"],
            t["actions"],
            t["mask"],
            t["advantages"],
            ref_per_token_logps=t["ref_logprobs"],
            old_per_token_logps=t["old_logprobs"],
        )
        return loss, kl

    return provider


def providers(case: Case, fused_backends: list[str]) -> dict[str, Provider]:
    """Every provider of a peer case: eager, compile, each fused backend, matmuls, the peers."""
    found: dict[str, Provider] = {}
    if case.op == LOGPROBS:

        def ours(p: Problem, backend: str, save_logits: bool = False) -> tuple[Tensor, ...]:
            t = p.tensors
            out = _public(LOGPROBS)(
                t["hidden"], t["weight"], t["actions"], save_logits=save_logits, backend=backend
            )
            return _logprobs_outputs(p, out.log_probs, out.entropy)

        def args(p: Problem) -> tuple[Tensor, ...]:
            return p.tensors["hidden"], p.tensors["weight"], p.tensors["actions"]

        found["eager"] = lambda p: _logprobs_outputs(p, *reference.fused_linear_logprobs(*args(p)))
        compiled = _compile(LOGPROBS, reference.fused_linear_logprobs)
        found["compile"] = lambda p: _logprobs_outputs(p, *compiled(*args(p)))
        for b in fused_backends:
            found[b] = lambda p, b=b: ours(p, b)
            found[f"{b} (save_logits)"] = lambda p, b=b: ours(p, b, save_logits=True)
        found["matmuls"] = _matmuls
        found[TRL] = trl_provider()
        found[CCE] = cce_provider()
        return found

    def ours_grpo(p: Problem, backend: str) -> tuple[Tensor, ...]:
        hidden, weight, actions, old, adv, mask, ref = _grpo_args(p)
        b, length = actions.shape
        out = _public("fused_linear_ppo_loss")(
            hidden.view(b, length, -1),
            weight,
            actions,
            old,
            adv,
            mask,
            ref_logprobs=ref,
            **GRPO_OPTIONS,
            backend=backend,
        )
        return _grpo_outputs(out)

    found["eager"] = lambda p: _grpo_outputs(_grpo_reference(*_grpo_args(p)))
    compiled = _compile("grpo", _grpo_reference)
    found["compile"] = lambda p: _grpo_outputs(compiled(*_grpo_args(p)))
    for b in fused_backends:
        found[b] = lambda p, b=b: ours_grpo(p, b)
    found["matmuls"] = _matmuls
    found[LIGER] = liger_provider()
    return found


# --- checks -------------------------------------------------------------------------------------


def _leaves(problem: Problem) -> dict[str, Tensor]:
    """Detached copies of the inputs, the gradient inputs as fresh leaves."""
    out = {}
    for name, tensor in problem.tensors.items():
        leaf = tensor.detach().clone()
        out[name] = leaf.requires_grad_(True) if name in problem.grad_inputs else leaf
    return out


def _reference(case: Case, problem: Problem, entropy: bool) -> tuple[list[Tensor], dict]:
    """The reference's outputs and gradients (with ``entropy`` False, of the log-probs-only
    objective), computed once per problem."""
    key = ("peer reference", entropy)
    if key not in problem.extra:
        t = _leaves(problem)
        if case.op == LOGPROBS:
            log_probs, ent = reference.fused_linear_logprobs(t["hidden"], t["weight"], t["actions"])
            p = Problem(t, problem.grad_inputs)
            outputs = list(_logprobs_outputs(p, log_probs, ent if entropy else None))
        else:
            args = [t[name] for name in ("hidden", "weight", "actions", "old_logprobs")]
            args += [t["token_advantages"], t["mask"], t["ref_logprobs"]]
            outputs = list(_grpo_outputs(_grpo_reference(*args)))
        outputs[0].backward()
        grads = {name: t[name].grad for name in problem.grad_inputs}
        problem.extra[key] = ([o.detach() for o in outputs], grads)
    return problem.extra[key]


def check(case: Case, problem: Problem, name: str, outputs: tuple[Tensor, ...]) -> Check:
    """Compare the outputs of provider ``name`` (after the objective or loss, which is compared
    for the GRPO loss) and the gradients it left on hidden and weight with the reference;
    clears the gradients."""
    with_entropy = not (case.op == LOGPROBS and len(outputs) == 2)
    want, want_grads = _reference(case, problem, with_entropy)
    first = 1 if case.op == LOGPROBS else 0  # the objective sums outputs compared one by one
    errors = [
        _relative_error(got, ref) for got, ref in zip(outputs[first:], want[first:], strict=True)
    ]
    for gname, ref in want_grads.items():
        got = problem.tensors[gname].grad
        errors.append(float("inf") if got is None else _relative_error(got, ref))
    problem.clear_grads()
    worst = max(errors)
    if case.op == LOGPROBS:
        note = "log-probs + entropy" if with_entropy else "log-probs only (no entropy)"
        note += ", gradients of hidden and weight, all rows"
    else:
        note = "loss, mean KL, gradients of hidden and weight"
    return Check(worst <= TOLERANCE[case.dtype], worst, note)


# --- derived comparisons ----------------------------------------------------------------------


def computes(case: Case, provider: str) -> str:
    """What ``provider`` computes in a peer case, for the reports."""
    if provider == "matmuls":
        return "the three matrix products only (floor)"
    if case.op == LOGPROBS:
        return "log-probs only" if provider == CCE else "log-probs + entropy"
    return "GRPO loss + KL"


def _usable(row: dict) -> bool:
    return row["status"] == "ok" and row["check"] is True and row["median_ms"] is not None


def _case(row: dict) -> Case:
    return Case(**{k: row[k] for k in ("op", "mode", "n", "v", "d", "dtype", "variant", "goal")})


def derive(rows: list[dict]) -> None:
    """For the rows of peer cases: what each computes, its time over the fastest other
    provider's (eager, compile, peers; not the floor), its peak memory over the leanest peer's,
    and time and memory over rlgaf_fast's (the fused backend row)."""
    by_case: dict[str, list[dict]] = {}
    for row in rows:
        if handles(_case(row)):
            by_case.setdefault(row["case"], []).append(row)
    for members in by_case.values():
        usable = [r for r in members if _usable(r)]
        others = [r for r in usable if r["provider"] in (*BASELINES, *PEERS)]
        others = [r for r in others if r["provider"] != "matmuls"]
        peers = [r for r in usable if r["provider"] in PEERS and r["peak_bytes"] is not None]
        ours = next((r for r in usable if r["provider"] not in (*BASELINES, *PEERS)), None)
        for row in members:
            row["computes"] = computes(_case(row), row["provider"])
            rivals = [r for r in others if r is not row]
            fastest = min(rivals, key=lambda r: r["median_ms"], default=None)
            ok = fastest is not None and _usable(row)
            row["fastest_other"] = fastest["provider"] if fastest else None
            row["time_ratio_vs_fastest_other"] = (
                row["median_ms"] / fastest["median_ms"] if ok else None
            )
            leanest = min(
                (r for r in peers if r is not row), key=lambda r: r["peak_bytes"], default=None
            )
            mem_ok = leanest is not None and row["peak_bytes"] is not None and leanest["peak_bytes"]
            row["leanest_peer"] = leanest["provider"] if leanest else None
            row["mem_ratio_vs_leanest_peer"] = (
                row["peak_bytes"] / leanest["peak_bytes"] if mem_ok else None
            )
            ours_ok = ours is not None and _usable(row)
            row["time_ratio_vs_ours"] = row["median_ms"] / ours["median_ms"] if ours_ok else None
            row["mem_ratio_vs_ours"] = (
                row["peak_bytes"] / ours["peak_bytes"]
                if ours is not None and ours["peak_bytes"] and row["peak_bytes"] is not None
                else None
            )
