"""What the suite measures: the ops, their inputs, the providers that compute them, and how a
provider's result is checked against rlgaf_fast.reference before it is timed.

Providers. ``eager``: the PyTorch code a user would write without this library
(``torch.nn.functional.gumbel_softmax``, then ``@ weight`` for the embedding; reference.py for
the others; logits-then-loss for the fused linear loss). ``compile``: ``torch.compile`` of that
same code. For the Gumbel ops that is torch's own Gumbel-Softmax, not reference.py's: the
reference's Philox (ten rounds of 32-bit products written as int64 tensor arithmetic) sends
Inductor's lowering into an exponentially re-expanded expression tree (seen with torch 2.13: no
compiled graph after 7 minutes), and its eager form takes about 50 s for [512, 32000] on two
cores, so it serves only as the correctness reference, on a few rows.
``cpp``, ``triton``: rlgaf_fast's fused backends, those that have a kernel of the op
(rlgaf_fast.ops.registry). The fused linear loss adds
``matmuls`` (only the matrix products that any implementation must do: the floor for its time).
The cases of ``--peers`` (per-token log-probs, the GRPO loss) are made, run and checked in
rlgaf_fast.bench.peers, beside other libraries' providers.

Checks. Each provider's output (and in fwd+bwd its gradients) is compared with the reference
on the same inputs; for the row-wise ops on large problems only the first ``CHECK_ROWS`` rows,
since the reference's Philox in int64 tensors is slow. The eager and compile Gumbel providers
draw torch's own noise, so for them only sanity is checked (finite, rows sum to one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from rlgaf_fast import reference
from rlgaf_fast.ops.registry import has_kernel

SEED = 1234
TAU = 1.0
CHECK_ROWS = 8
FULL_CHECK_ELEMENTS = 1 << 22  # problems up to N * V of this size are checked on every row
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOLERANCE = {"float32": 2e-3, "bfloat16": 4e-2, "float16": 1e-2}
PPO_OPTIONS = {"clip_eps": 0.2, "entropy_coef": 0.01}


@dataclass(frozen=True)
class Case:
    """One problem: an op, forward or forward+backward, its sizes and dtype.

    n: tokens (rows). v: vocabulary. d: embedding width D (embedding ops) or hidden size H (the
    fused linear loss), 0 where unused. variant: "" or e.g. "hard", "top_k=32".
    goal: the target this case measures, quoted in the report.
    """

    op: str
    mode: str
    n: int
    v: int
    d: int = 0
    dtype: str = "float32"
    variant: str = ""
    goal: str = ""

    @property
    def key(self) -> str:
        sizes = f"N={self.n},V={self.v}" + (f",{self.dim_name}={self.d}" if self.d else "")
        variant = f",{self.variant}" if self.variant else ""
        return f"{self.op}[{sizes}{variant}] {self.dtype} {self.mode}"

    @property
    def dim_name(self) -> str:
        return "H" if self.op.startswith("fused_linear") else "D"

    @property
    def backward(self) -> bool:
        return self.mode == "fwd+bwd"


@dataclass
class Problem:
    """Inputs of a case. ``grad_inputs`` name the tensors whose gradients are compared."""

    tensors: dict[str, Tensor]
    grad_inputs: tuple[str, ...]
    extra: dict[str, object] = field(default_factory=dict)

    def clear_grads(self) -> None:
        for name in self.grad_inputs:
            self.tensors[name].grad = None


# A provider maps a Problem to its outputs; outputs[0] is what backward starts from.
Provider = Callable[[Problem], tuple[Tensor, ...]]


def _tokens(case: Case, device: torch.device, generator: torch.Generator) -> dict[str, Tensor]:
    n, v = case.n, case.v
    return {
        "actions": torch.randint(0, v, (n,), device=device, generator=generator),
        "advantages": torch.randn(n, device=device, generator=generator),
    }


def _old_logprobs(logits: Tensor, actions: Tensor, generator: torch.Generator) -> Tensor:
    """Log-probs near the current policy's, so that some ratios clip and some do not."""
    parts = []
    for start in range(0, logits.shape[0], 1024):  # chunks keep the float32 copy small
        chunk = torch.log_softmax(logits[start : start + 1024].float(), dim=-1)
        parts.append(chunk.gather(-1, actions[start : start + 1024, None]).squeeze(-1))
    logp = torch.cat(parts) if parts else logits.new_zeros(0, dtype=torch.float32)
    noise = torch.randn(logp.shape, device=logp.device, generator=generator)
    return logp + 0.2 * noise


def make_problem(case: Case, device: torch.device) -> Problem:
    """Random inputs for ``case`` on ``device``, the same for every provider."""
    from rlgaf_fast.bench import peers

    if peers.handles(case):
        return peers.make_problem(case, device)
    generator = torch.Generator(device=device).manual_seed(SEED)
    dtype = DTYPES[case.dtype]
    grad = case.backward
    n, v, d = case.n, case.v, case.d

    def randn(*shape: int, scale: float = 1.0, requires_grad: bool = False) -> Tensor:
        t = torch.randn(*shape, device=device, generator=generator) * scale
        return t.to(dtype).requires_grad_(requires_grad)

    if case.op == "gumbel_softmax":
        t = {"logits": randn(n, v, scale=2.0, requires_grad=grad), "grad_out": randn(n, v)}
        return Problem(t, ("logits",) if grad else ())
    if case.op == "soft_embedding":
        probs = torch.softmax(torch.randn(n, v, device=device, generator=generator) * 3, dim=-1)
        t = {
            "probs": probs.to(dtype).requires_grad_(grad),
            "weight": randn(v, d, scale=0.02, requires_grad=grad),
            "grad_out": randn(n, d),
        }
        return Problem(t, ("probs", "weight") if grad else ())
    if case.op == "gumbel_softmax_embedding":
        t = {
            "logits": randn(n, v, scale=2.0, requires_grad=grad),
            "weight": randn(v, d, scale=0.02, requires_grad=grad),
            "grad_out": randn(n, d),
        }
        return Problem(t, ("logits", "weight") if grad else ())
    if case.op == "ppo_loss":
        t = {
            "logits": randn(n, v, scale=2.0, requires_grad=grad),
            **_tokens(case, device, generator),
        }
        t["old_logprobs"] = _old_logprobs(t["logits"].detach(), t["actions"], generator)
        return Problem(t, ("logits",) if grad else ())
    if case.op == "fused_linear_ppo_loss":
        t = {
            "hidden": randn(n, d, requires_grad=grad),
            "weight": randn(v, d, scale=d**-0.5, requires_grad=grad),
            **_tokens(case, device, generator),
        }
        with torch.no_grad():
            logits = t["hidden"] @ t["weight"].T
        t["old_logprobs"] = _old_logprobs(logits, t["actions"], generator)
        del logits
        return Problem(t, ("hidden", "weight") if grad else ())
    raise ValueError(f"unknown op {case.op!r}")


# --- providers ----------------------------------------------------------------------------------

_compiled: dict[str, Callable] = {}


def _compile(name: str, fn: Callable) -> Callable:
    """One torch.compile wrapper per reference function, shared by all cases of the process.

    Static shapes (dynamic=False): each case gets a graph specialised to its sizes, as a user
    compiling for one training shape would, instead of the dynamic-shape graph torch builds on
    the second shape it sees. The recompile limit is raised so that no case falls back to eager
    (Dynamo keeps one limit per function, and a preset has more shapes than its default 8)."""
    if name not in _compiled:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
        _compiled[name] = torch.compile(fn, dynamic=False)
    return _compiled[name]


def _top_k(case: Case) -> int | None:
    return int(case.variant.split("=")[1]) if case.variant.startswith("top_k=") else None


def _unfused_embedding(logits: Tensor, weight: Tensor, hard: bool) -> tuple[Tensor, Tensor]:
    y = F.gumbel_softmax(logits, TAU, hard)
    return y.to(weight.dtype) @ weight, y.argmax(-1)


def _linear_logits_loss(hidden, weight, actions, old_logprobs, advantages):
    return reference.ppo_loss(hidden @ weight.T, actions, old_logprobs, advantages, **PPO_OPTIONS)


def _public(name: str) -> Callable:
    """rlgaf_fast's public op ``name``; a clear error while it does not exist yet."""
    import rlgaf_fast

    op = getattr(rlgaf_fast, name, None)
    if op is None:
        raise RuntimeError(f"rlgaf_fast.{name} is not available in this version")
    return op


def providers(case: Case, fused_backends: list[str]) -> dict[str, Provider]:
    """Every provider of ``case``: eager, compile, then each fused backend (and for the peer
    cases the floor and the other libraries)."""
    from rlgaf_fast.bench import peers

    hard = case.variant == "hard"
    top_k = _top_k(case)
    found: dict[str, Provider] = {}
    fused_backends = [b for b in fused_backends if has_kernel(case.op, b)]
    if peers.handles(case):
        return peers.providers(case, fused_backends)
    if case.op == "gumbel_softmax":
        found["eager"] = lambda p: (F.gumbel_softmax(p.tensors["logits"], TAU, hard),)
        compiled = _compile("gumbel_softmax", F.gumbel_softmax)
        found["compile"] = lambda p: (compiled(p.tensors["logits"], TAU, hard),)
        for b in fused_backends:
            found[b] = lambda p, b=b: (
                _public("gumbel_softmax")(p.tensors["logits"], TAU, hard, seed=SEED, backend=b),
            )
    elif case.op == "soft_embedding":
        found["eager"] = lambda p: (
            reference.soft_embedding(p.tensors["probs"], p.tensors["weight"], top_k=top_k),
        )
        compiled = _compile("soft_embedding", reference.soft_embedding)
        found["compile"] = lambda p: (
            compiled(p.tensors["probs"], p.tensors["weight"], top_k=top_k),
        )
        for b in fused_backends:
            found[b] = lambda p, b=b: (
                _public("soft_embedding")(
                    p.tensors["probs"], p.tensors["weight"], top_k=top_k, backend=b
                ),
            )
    elif case.op == "gumbel_softmax_embedding":
        found["eager"] = lambda p: _unfused_embedding(
            p.tensors["logits"], p.tensors["weight"], hard
        )
        compiled = _compile("gumbel_softmax_embedding", _unfused_embedding)
        found["compile"] = lambda p: compiled(p.tensors["logits"], p.tensors["weight"], hard)
        for b in fused_backends:
            found[b] = lambda p, b=b: _public("gumbel_softmax_embedding")(
                p.tensors["logits"], p.tensors["weight"], TAU, hard, seed=SEED, backend=b
            )
    elif case.op == "ppo_loss":

        def args(p: Problem) -> tuple[Tensor, ...]:
            t = p.tensors
            return t["logits"], t["actions"], t["old_logprobs"], t["advantages"]

        found["eager"] = lambda p: _loss_outputs(reference.ppo_loss(*args(p), **PPO_OPTIONS))
        compiled = _compile("ppo_loss", reference.ppo_loss)
        found["compile"] = lambda p: _loss_outputs(compiled(*args(p), **PPO_OPTIONS))
        for b in fused_backends:
            found[b] = lambda p, b=b: _loss_outputs(
                _public("ppo_loss")(*args(p), **PPO_OPTIONS, backend=b)
            )
    elif case.op == "fused_linear_ppo_loss":

        def args(p: Problem) -> tuple[Tensor, ...]:
            t = p.tensors
            return t["hidden"], t["weight"], t["actions"], t["old_logprobs"], t["advantages"]

        found["eager"] = lambda p: _loss_outputs(_linear_logits_loss(*args(p)))
        compiled = _compile("fused_linear_ppo_loss", _linear_logits_loss)
        found["compile"] = lambda p: _loss_outputs(compiled(*args(p)))
        for b in fused_backends:  # its torch backend is the eager path itself
            found[b] = lambda p, b=b: _loss_outputs(
                _public("fused_linear_ppo_loss")(*args(p), **PPO_OPTIONS, backend=b)
            )
        found["matmuls"] = _matmuls
    else:
        raise ValueError(f"unknown op {case.op!r}")
    return found


def _loss_outputs(out) -> tuple[Tensor, ...]:
    return out.loss, out.logprobs, out.entropy


class _MatmulsOnly(torch.autograd.Function):
    """logits = hidden @ weight.T forward; backward the two products that give the gradients
    (with the logits standing in for their gradient): the three matmuls of the fused loss."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor) -> Tensor:
        logits = hidden @ weight.T
        ctx.save_for_backward(hidden, weight, logits)
        return logits.sum()  # a scalar: the [N, V] logits are freed at the end like a chunk's

    @staticmethod
    def backward(ctx, grad: Tensor):
        hidden, weight, logits = ctx.saved_tensors
        return logits @ weight, logits.T @ hidden


def _matmuls(p: Problem) -> tuple[Tensor, ...]:
    return (_MatmulsOnly.apply(p.tensors["hidden"], p.tensors["weight"]),)


# --- running a provider ---------------------------------------------------------------------------


def step(case: Case, problem: Problem, provider: Provider) -> tuple[Tensor, ...]:
    """One timed unit: the forward, and in fwd+bwd the backward from outputs[0]."""
    if not case.backward:
        with torch.no_grad():
            return provider(problem)
    outputs = provider(problem)
    grad_out = problem.tensors.get("grad_out")
    if outputs[0].dim() == 0:
        outputs[0].backward()
    else:
        outputs[0].backward(grad_out.to(outputs[0].dtype))
    return outputs


# --- checks against the reference ------------------------------------------------------------


@dataclass
class Check:
    passed: bool | None  # None: nothing to compare (e.g. the matmuls floor)
    max_error: float | None  # largest |got - want| / max |want| over the compared tensors
    note: str = ""


def _relative_error(got: Tensor, want: Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    if got.shape != want.shape:
        raise ValueError(f"shape {list(got.shape)} where the reference has {list(want.shape)}")
    if want.numel() == 0:
        return 0.0
    scale = want.abs().max().clamp(min=1e-12)
    err = (got - want).abs().max() / scale
    return float("inf") if not torch.isfinite(got).all() else float(err)


def _reference_outputs(case: Case, problem: Problem, rows: int) -> tuple[list[Tensor], dict]:
    """The reference's outputs on the first ``rows`` rows, and its gradients of those rows'
    inputs (for token-mean losses scaled as if all N rows were there)."""
    hard = case.variant == "hard"
    t = problem.tensors
    subset: dict[str, Tensor] = {}
    for name, tensor in t.items():
        sliced = tensor if name == "weight" else tensor[:rows]
        leaf = sliced.detach().clone()
        if name in problem.grad_inputs:
            leaf.requires_grad_(True)
        subset[name] = leaf
    if case.op == "gumbel_softmax":
        outputs = [reference.gumbel_softmax(subset["logits"], TAU, hard, seed=SEED)]
    elif case.op == "soft_embedding":
        outputs = [reference.soft_embedding(subset["probs"], subset["weight"], top_k=_top_k(case))]
    elif case.op == "gumbel_softmax_embedding":
        outputs = list(
            reference.gumbel_softmax_embedding(
                subset["logits"], subset["weight"], TAU, hard, seed=SEED
            )
        )
    elif case.op == "ppo_loss":
        outputs = list(
            _loss_outputs(
                reference.ppo_loss(
                    subset["logits"],
                    subset["actions"],
                    subset["old_logprobs"],
                    subset["advantages"],
                    **PPO_OPTIONS,
                )
            )
        )
    else:
        outputs = list(
            _loss_outputs(
                _linear_logits_loss(
                    subset["hidden"],
                    subset["weight"],
                    subset["actions"],
                    subset["old_logprobs"],
                    subset["advantages"],
                )
            )
        )
    grads: dict[str, Tensor] = {}
    if case.backward:
        if outputs[0].dim() == 0:
            outputs[0].backward()
        else:
            outputs[0].backward(subset["grad_out"].to(outputs[0].dtype))
        scale = rows / case.n if case.op in ("ppo_loss", "fused_linear_ppo_loss") else 1.0
        grads = {name: subset[name].grad * scale for name in problem.grad_inputs}
    return outputs, grads


def _sanity(outputs: tuple[Tensor, ...], problem: Problem, case: Case) -> Check:
    y = outputs[0].detach().float()
    finite = bool(torch.isfinite(y).all())
    grads_finite = all(torch.isfinite(problem.tensors[n].grad).all() for n in problem.grad_inputs)
    if case.op == "gumbel_softmax":
        sums = y.sum(-1)
        err = float((sums - 1).abs().max()) if sums.numel() else 0.0
        ok = finite and grads_finite and err <= TOLERANCE[case.dtype] * 10
        return Check(ok, err, "sanity only (torch's own noise): finite, rows sum to 1")
    return Check(finite and grads_finite, None, "sanity only (torch's own noise): finite")


def check(case: Case, problem: Problem, name: str, outputs: tuple[Tensor, ...]) -> Check:
    """Compare the ``outputs`` of one ``step`` of provider ``name`` (and the gradients it left
    on the problem's inputs) with the reference; clears the gradients."""
    from rlgaf_fast.bench import peers

    if name == "matmuls":
        problem.clear_grads()
        return Check(None, None, "floor: the matrix products only, nothing to compare")
    if peers.handles(case):
        return peers.check(case, problem, name, outputs)
    if name in ("eager", "compile") and case.op in ("gumbel_softmax", "gumbel_softmax_embedding"):
        result = _sanity(outputs, problem, case)
        problem.clear_grads()
        return result
    full = case.n * case.v <= FULL_CHECK_ELEMENTS or case.op in (
        "soft_embedding",
        "fused_linear_ppo_loss",
    )
    rows = case.n if full else min(case.n, CHECK_ROWS)
    if "reference" not in problem.extra:  # computed once per problem, shared by its providers
        problem.extra["reference"] = _reference_outputs(case, problem, rows)
    want, want_grads = problem.extra["reference"]
    errors = []
    first = 0 if full else 1  # a loss over a subset of rows is not the loss over all rows
    if outputs[0].dim() != 0:
        first = 0
    for got, ref in list(zip(outputs, want, strict=False))[first:]:
        if got.dtype in (torch.int64, torch.int32):
            errors.append(0.0 if torch.equal(got[:rows], ref) else float("inf"))
        else:
            errors.append(_relative_error(got[:rows] if got.dim() else got, ref))
    for gname, ref in want_grads.items():
        if gname == "weight" and not full:
            continue  # the weight's gradient sums over all rows: not checkable on a subset
        got = problem.tensors[gname].grad
        if got is None:
            errors.append(float("inf"))
            continue
        errors.append(_relative_error(got if gname == "weight" else got[:rows], ref))
    problem.clear_grads()
    worst = max(errors) if errors else 0.0
    note = "all rows" if full else f"first {rows} rows"
    return Check(worst <= TOLERANCE[case.dtype], worst, note)


# --- work: bytes and FLOPs that bound each case -----------------------------------------------


def work(case: Case) -> dict[str, float]:
    """The bytes one call must move and the FLOPs it must do, at the least: ``{"bytes": ...,
    "flops": ...}``. Its time cannot be below either amount over the device's ceiling for it
    (the roofline), whichever takes longer.

    Bytes count the traffic a fused kernel cannot avoid: Gumbel-Softmax reads the logits and
    writes y forward, and reads grad_y and y and writes grad backward; the PPO loss reads the
    logits and, with a gradient, writes it; the embedding ops read the [N, V] probabilities or
    logits and the [V, D] weight and write the [N, D] output forward, and backward read them
    again with the output gradient and write both input gradients; the top-k embedding reads the
    probabilities and gathers k rows; the fused linear loss reads the hidden states and the LM
    head, and backward writes their gradients (so do fused_linear_logprobs and the GRPO loss).
    FLOPs are those of the matrix products.
    """
    element = torch.finfo(DTYPES[case.dtype]).bits // 8
    n, v, d, backward = case.n, case.v, case.d, case.backward
    if case.op == "gumbel_softmax":
        return {"bytes": float((2 + 3 * backward) * n * v * element), "flops": 0.0}
    if case.op == "ppo_loss":
        return {"bytes": float((1 + backward) * n * v * element), "flops": 0.0}
    top_k = _top_k(case) if case.op == "soft_embedding" else None
    if top_k is not None:
        return {"bytes": float((n * v + n * top_k * d + n * d) * element), "flops": 0.0}
    flops = float(2 * n * v * d * (3 if backward else 1))
    if case.op.startswith("fused_linear"):
        return {"bytes": float((1 + 2 * backward) * (n * d + v * d) * element), "flops": flops}
    forward = n * v + v * d + n * d
    return {
        "bytes": float((forward + backward * (2 * n * v + 2 * v * d + 2 * n * d)) * element),
        "flops": flops,
    }
