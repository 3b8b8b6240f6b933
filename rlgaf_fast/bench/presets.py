"""Which cases each preset runs, and the performance targets they measure.

tiny: seconds, for the pytest wrappers and dry runs. quick: a 2-core CPU machine in under
3 minutes: the CPU targets of Gumbel-Softmax and the PPO losses, and small sweeps over V and N
for the plots. full: the sizes of docs/design.md ("Benchmark protocol": vocabularies 32000,
128256, 151936; 1k to 16k tokens; fp32 and bf16), cut to what fits the device's memory. goals:
only the GPU targets (gpu_check.sh). peers: rlgaf_fast beside TRL, Liger-Kernel and Cut
Cross-Entropy (rlgaf_fast.bench.peers).
"""

from __future__ import annotations

from dataclasses import dataclass

from rlgaf_fast.bench.cases import Case

OPS = (
    "gumbel_softmax",
    "soft_embedding",
    "gumbel_softmax_embedding",
    "ppo_loss",
    "fused_linear_ppo_loss",
    "fused_linear_logprobs",
)
FUSED = "fused"  # a goal's provider: every fused backend present in the run
BASELINES = ("eager", "compile", "matmuls")
# Other libraries' providers of the --peers cases (rlgaf_fast.bench.peers)
TRL, LIGER, CCE = "trl", "liger", "cce (log-probs only)"
PEERS = (TRL, LIGER, CCE)
GRPO = "grpo,beta=0.04"  # the variant of fused_linear_ppo_loss that --peers compares with Liger


@dataclass(frozen=True)
class Goal:
    """A target: ``metric`` of ``provider`` on the case ``case_key``, compared with ``bound``."""

    case_key: str
    provider: str
    metric: str  # a field of a result row, e.g. "speedup_vs_eager"
    at_least: float | None = None
    at_most: float | None = None
    text: str = ""
    device: str = "any"  # "cpu", "cuda" or "any": where the target applies

    def met(self, value: float) -> bool:
        low = self.at_least is None or value >= self.at_least
        high = self.at_most is None or value <= self.at_most
        return low and high


CLIP_ENTROPY = "clip+entropy"


def _gumbel_cpu_target() -> tuple[list[Case], list[Goal]]:
    case = Case("gumbel_softmax", "fwd+bwd", 512, 32000, goal="cpp >= 15x eager and >= 5x compile")
    goals = [
        Goal(
            case.key,
            "cpp",
            "speedup_vs_eager",
            at_least=15,
            device="cpu",
            text="gumbel_softmax [512, 32000] fp32 fwd+bwd, cpp >= 15x eager",
        ),
        Goal(
            case.key,
            "cpp",
            "speedup_vs_compile",
            at_least=5,
            device="cpu",
            text="gumbel_softmax [512, 32000] fp32 fwd+bwd, cpp >= 5x compile",
        ),
    ]
    return [case], goals


def _ppo_cpu_target() -> tuple[list[Case], list[Goal]]:
    case = Case(
        "ppo_loss",
        "fwd+bwd",
        2048,
        32000,
        variant=CLIP_ENTROPY,
        goal="cpp >= 8x eager, >= 3x compile, memory <= logits + grad + O(N)",
    )
    logits_and_grad = 2 * 2048 * 32000 * 4
    goals = [
        Goal(
            case.key,
            "cpp",
            "speedup_vs_eager",
            at_least=8,
            device="cpu",
            text="ppo_loss [2048, 32000] fp32 fwd+bwd, cpp >= 8x eager",
        ),
        Goal(
            case.key,
            "cpp",
            "speedup_vs_compile",
            at_least=3,
            device="cpu",
            text="ppo_loss [2048, 32000] fp32 fwd+bwd, cpp >= 3x compile",
        ),
        # the logits are an input, not counted in the extra bytes: grad + O(N) remain
        Goal(
            case.key,
            "cpp",
            "peak_bytes",
            at_most=logits_and_grad / 2 + 2048 * 256,
            device="cpu",
            text="ppo_loss cpp extra peak memory <= the gradient + O(N)",
        ),
    ]
    return [case], goals


def _embedding_memory(n_values: tuple[int, ...], d: int) -> tuple[list[Case], list[Goal]]:
    cases = [
        Case(
            "gumbel_softmax_embedding",
            "fwd",
            n,
            128256,
            d,
            goal="extra memory grows with N*D, not N*V",
        )
        for n in n_values
    ]
    # out [N, D] + tokens + lse, with room for small per-thread buffers: far below N * V
    goals = [
        Goal(
            c.key,
            FUSED,
            "peak_bytes",
            at_most=c.n * c.d * 4 * 4 + (1 << 20),
            text=f"gumbel_softmax_embedding N={c.n}, V=128256: extra memory "
            f"O(N*D) (N*V*4 = {c.n * c.v * 4 / 2**20:.0f} MiB)",
        )
        for c in cases
    ]
    return cases, goals


def _fused_linear_target(
    n: int, h: int, v: int, dtype: str, device: str
) -> tuple[list[Case], list[Goal]]:
    case = Case("fused_linear_ppo_loss", "fwd+bwd", n, v, h, dtype, CLIP_ENTROPY)
    if device == "cpu":
        case = Case(**{**case.__dict__, "goal": "<= 1/4 eager memory at <= 1.2x time"})
        goals = [
            Goal(
                case.key,
                FUSED,
                "mem_ratio_vs_eager",
                at_most=0.25,
                device="cpu",
                text=f"fused_linear_ppo_loss N={n}, H={h}, V={v}: <= 1/4 of eager peak memory",
            ),
            Goal(
                case.key,
                FUSED,
                "time_ratio_vs_eager",
                at_most=1.2,
                device="cpu",
                text="... at <= 1.2x eager's time",
            ),
        ]
    else:
        case = Case(**{**case.__dict__, "goal": "<= 1.15x its matmuls, <= 1/5 eager memory"})
        goals = [
            Goal(
                case.key,
                FUSED,
                "time_ratio_vs_matmuls",
                at_most=1.15,
                device="cuda",
                text=f"fused_linear_ppo_loss N={n}, H={h}, V={v} {dtype}: <= "
                "1.15x the time of its three matrix products",
            ),
            Goal(
                case.key,
                FUSED,
                "mem_ratio_vs_eager",
                at_most=0.2,
                device="cuda",
                text="... with <= 1/5 of eager's peak memory",
            ),
        ]
    return [case], goals


def _gpu_targets() -> tuple[list[Case], list[Goal]]:
    gumbel = Case(
        "gumbel_softmax",
        "fwd+bwd",
        8192,
        128256,
        dtype="bfloat16",
        goal=">= 85% of copy bandwidth",
    )
    ppo = Case(
        "ppo_loss",
        "fwd+bwd",
        16384,
        128256,
        dtype="bfloat16",
        variant=CLIP_ENTROPY,
        goal=">= 85% of copy bandwidth",
    )
    goals = [
        Goal(
            gumbel.key,
            FUSED,
            "fraction_of_ceiling",
            at_least=0.85,
            device="cuda",
            text="gumbel_softmax [8192, 128256] bf16 fwd+bwd >= 85% of copy bandwidth",
        ),
        Goal(
            ppo.key,
            FUSED,
            "fraction_of_ceiling",
            at_least=0.85,
            device="cuda",
            text="ppo_loss [16384, 128256] bf16 fwd+bwd >= 85% of copy bandwidth",
        ),
    ]
    linear_cases, linear_goals = _fused_linear_target(8192, 4096, 128256, "bfloat16", "cuda")
    return [gumbel, ppo, *linear_cases], goals + linear_goals


def tiny() -> tuple[list[Case], list[Goal]]:
    cases = []
    for mode in ("fwd", "fwd+bwd"):
        cases += [
            Case("gumbel_softmax", mode, 64, 1000),
            Case("soft_embedding", mode, 32, 1000, 64),
            Case("gumbel_softmax_embedding", mode, 32, 1000, 64),
            Case("ppo_loss", mode, 64, 1000, variant=CLIP_ENTROPY),
            Case("fused_linear_ppo_loss", mode, 64, 1000, 64, variant=CLIP_ENTROPY),
        ]
    cases += [
        Case("gumbel_softmax", "fwd+bwd", 64, 500),
        Case("gumbel_softmax", "fwd+bwd", 32, 1000),
    ]
    return cases, []


def quick() -> tuple[list[Case], list[Goal]]:
    cases: list[Case] = []
    goals: list[Goal] = []
    for make in (_gumbel_cpu_target, _ppo_cpu_target):
        c, g = make()
        cases += c
        goals += g
    cases += [
        Case("gumbel_softmax", "fwd", 512, 32000),
        Case("gumbel_softmax", "fwd+bwd", 512, 8192),
        Case("gumbel_softmax", "fwd+bwd", 128, 32000),
        Case("ppo_loss", "fwd", 2048, 32000, variant=CLIP_ENTROPY),
        Case("ppo_loss", "fwd+bwd", 2048, 8192, variant=CLIP_ENTROPY),
        Case("ppo_loss", "fwd+bwd", 512, 32000, variant=CLIP_ENTROPY),
    ]
    c, g = _embedding_memory((16, 64), 256)
    cases += c
    goals += g
    cases += [
        Case("gumbel_softmax_embedding", "fwd+bwd", 64, 32000, 256),
        Case("soft_embedding", "fwd+bwd", 256, 32000, 256),
        Case("soft_embedding", "fwd", 256, 32000, 256, variant="top_k=32"),
        Case("fused_linear_ppo_loss", "fwd+bwd", 512, 32000, 256, variant=CLIP_ENTROPY),
    ]
    return cases, goals


def full(device: str) -> tuple[list[Case], list[Goal]]:
    """docs/design.md's sizes; on a CPU, the token counts stop at 4096 (the eager reference would
    need tens of GiB beyond; cases that still do not fit are skipped), the embedding ops use
    N=1024 and D=256 (a CPU matmul of D=1024 takes minutes), and bf16 is left out of the CPU
    sweeps except one size. On this 2-core machine it runs for an hour or more."""
    cases, goals = quick() if device == "cpu" else _gpu_targets()
    if device == "cpu":
        c, g = _fused_linear_target(4096, 1024, 32000, "float32", "cpu")
        cases += c
        goals += g
        tokens, dtypes, embed_tokens, width = (1024, 4096), ("float32",), (1024,), 256
    else:
        tokens, dtypes = (1024, 4096, 16384), ("float32", "bfloat16")
        embed_tokens, width = tokens, 1024
    for dtype in dtypes:
        for v in (32000, 128256, 151936):
            for n in tokens:
                cases += [
                    Case("gumbel_softmax", "fwd+bwd", n, v, dtype=dtype),
                    Case("ppo_loss", "fwd+bwd", n, v, dtype=dtype, variant=CLIP_ENTROPY),
                ]
        for n in embed_tokens:
            cases += [
                Case("gumbel_softmax_embedding", "fwd+bwd", n, 128256, width, dtype),
                Case("soft_embedding", "fwd+bwd", n, 32000, width, dtype),
            ]
    if device == "cpu":
        cases += [
            Case("gumbel_softmax", "fwd+bwd", 1024, 32000, dtype="bfloat16"),
            Case("ppo_loss", "fwd+bwd", 1024, 32000, dtype="bfloat16", variant=CLIP_ENTROPY),
        ]
    return _unique(cases), goals


def goals_only(device: str) -> tuple[list[Case], list[Goal]]:
    """The target cases; on a GPU also a short sweep around two of them, for one plot each,
    and the fused Gumbel-Softmax embedding at two sizes."""
    if device == "cpu":
        cases, goals = [], []
        for make in (_gumbel_cpu_target, _ppo_cpu_target):
            c, g = make()
            cases += c
            goals += g
        c, g = _fused_linear_target(4096, 1024, 32000, "float32", "cpu")
        return cases + c, goals + g
    cases, goals = _gpu_targets()
    cases += [Case("gumbel_softmax", "fwd+bwd", 8192, v, dtype="bfloat16") for v in (32000, 151936)]
    cases += [
        Case("ppo_loss", "fwd+bwd", n, 128256, dtype="bfloat16", variant=CLIP_ENTROPY)
        for n in (4096,)
    ]
    # no target, but watched: on an H200 the Triton fused op's first design took 117 ms at
    # N = 4096 against eager's 14.6 ms (benchmarks/results/h200-2026-11-27); N = 64 is the
    # trainer's call, one token per sequence of a batch
    cases += [
        Case("gumbel_softmax_embedding", "fwd+bwd", n, 128256, 2048, "bfloat16") for n in (4096, 64)
    ]
    return cases, goals


PEER_SHAPES = {"cpu": ((4096, 1024, 32000), "float32"), "cuda": ((8192, 4096, 128256), "bfloat16")}


def peers(
    device: str, shape: tuple[int, int, int] | None = None, dtype: str | None = None
) -> tuple[list[Case], list[Goal]]:
    """The two peer cases, fwd+bwd from hidden states: per-token log-probs and entropy, and the
    GRPO loss; at ``shape`` (N, H, V) and ``dtype``, by default N=4096, H=1024, V=32000 fp32
    on a CPU and N=8192, H=4096, V=128256 bf16 on a GPU. The CPU targets compare rlgaf_fast with
    the other providers of the log-probs case, at any size."""
    default_shape, default_dtype = PEER_SHAPES[device]
    n, h, v = shape or default_shape
    dtype = dtype or default_dtype
    logprobs = Case(
        "fused_linear_logprobs",
        "fwd+bwd",
        n,
        v,
        h,
        dtype,
        goal="faster than every peer, eager and compile; peak <= the leanest peer's",
    )
    grpo = Case("fused_linear_ppo_loss", "fwd+bwd", n, v, h, dtype, GRPO)
    size = f"N={n}, H={h}, V={v} {dtype}"
    goals = [
        Goal(
            logprobs.key,
            FUSED,
            "time_ratio_vs_fastest_other",
            at_most=1.0,
            device="cpu",
            text=f"fused_linear_logprobs {size} fwd+bwd: faster than every peer, eager and compile",
        ),
        Goal(
            logprobs.key,
            FUSED,
            "mem_ratio_vs_leanest_peer",
            at_most=1.0,
            device="cpu",
            text="... at no more peak memory than the leanest peer",
        ),
    ]
    return [logprobs, grpo], goals


def _unique(cases: list[Case]) -> list[Case]:
    seen: dict[tuple, Case] = {}
    for case in cases:
        seen.setdefault(
            (case.op, case.mode, case.n, case.v, case.d, case.dtype, case.variant), case
        )
    return list(seen.values())


def select(
    preset: str,
    device: str,
    ops: list[str] | None,
    shape: tuple[int, int, int] | None = None,
    dtype: str | None = None,
) -> tuple[list[Case], list[Goal]]:
    """The cases and goals of ``preset`` on ``device`` ("cpu" or "cuda"), restricted to ``ops``;
    ``shape`` (N, H, V) and ``dtype`` for the peers preset only."""
    if (shape or dtype) and preset != "peers":
        raise ValueError(f"shape and dtype are options of the peers preset, not of {preset!r}")
    if preset == "peers":
        cases, goals = peers(device, shape, dtype)
    elif preset == "tiny":
        cases, goals = tiny()
    elif preset == "quick":
        cases, goals = quick()
    elif preset == "full":
        cases, goals = full(device)
    elif preset == "goals":
        cases, goals = goals_only(device)
    else:
        raise ValueError(f"preset must be tiny, quick, full, goals or peers, got {preset!r}")
    if ops:
        unknown = set(ops) - set(OPS)
        if unknown:
            raise ValueError(f"--ops: unknown op(s) {sorted(unknown)}; choose from {OPS}")
        cases = [c for c in cases if c.op in ops]
    keys = {c.key for c in cases}
    goals = [g for g in goals if g.case_key in keys and g.device in ("any", device)]
    return cases, goals
