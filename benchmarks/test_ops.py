"""The benchmark suite's cases under pytest-benchmark:

    pytest benchmarks/ --benchmark-only                      # tiny sizes (seconds per case)
    RLGAF_BENCH_PRESET=quick pytest benchmarks/ --benchmark-only
    RLGAF_BENCH_OPS=ppo_loss,gumbel_softmax RLGAF_BENCH_PROVIDERS=eager,cpp pytest benchmarks/ ...

Each case is checked against the reference before it is timed (a wrong result fails the test);
a provider that cannot run here (a backend not built, an op not in this version, an operator
missing from a stale build of the extension) is skipped.
The peak memory of one call is attached to the benchmark's extra_info.
"""

from __future__ import annotations

import os

import pytest
import torch

import rlgaf_fast
from rlgaf_fast.bench import cases, measure, presets

PRESET = os.environ.get("RLGAF_BENCH_PRESET", "tiny")
DEVICE = torch.device(
    os.environ.get("RLGAF_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
)
OPS = [op for op in os.environ.get("RLGAF_BENCH_OPS", "").split(",") if op] or None
ONLY = {p for p in os.environ.get("RLGAF_BENCH_PROVIDERS", "").split(",") if p}
FUSED = [
    b
    for b in rlgaf_fast.available_backends()
    if b != "torch" and (b == "cpp") == (DEVICE.type == "cpu")
]


def _params():
    selected, _ = presets.select(PRESET, DEVICE.type, OPS)
    for case in selected:
        for name in cases.providers(case, FUSED):
            if not ONLY or name in ONLY:
                yield pytest.param(case, name, id=f"{case.key}-{name}".replace(" ", "-"))


_problems: dict[cases.Case, cases.Problem] = {}


def _problem(case: cases.Case) -> cases.Problem:
    if case not in _problems:
        _problems.clear()  # one case's inputs alive at a time
        _problems[case] = cases.make_problem(case, DEVICE)
    return _problems[case]


@pytest.mark.parametrize(("case", "provider_name"), list(_params()))
def test_op(benchmark, case: cases.Case, provider_name: str) -> None:
    problem = _problem(case)
    provider = cases.providers(case, FUSED)[provider_name]
    problem.clear_grads()
    try:
        outputs = cases.step(case, problem, provider)
    except (RuntimeError, NotImplementedError, AttributeError) as error:
        # a backend or op this build lacks (an operator missing from a stale extension shows as
        # an AttributeError of torch.ops) is not this benchmark's failure
        if any(s in str(error) for s in ("not available", "not built", "has no attribute")):
            pytest.skip(f"{provider_name}: {error}")
        raise
    result = cases.check(case, problem, provider_name, outputs)
    del outputs
    assert result.passed is not False, (
        f"{case.key} {provider_name}: max relative error {result.max_error} ({result.note})"
    )

    def run():
        cases.step(case, problem, provider)
        measure.synchronize(DEVICE)

    benchmark.group = case.key
    benchmark.pedantic(run, setup=problem.clear_grads, rounds=5, iterations=1, warmup_rounds=1)
    _, peak, method = measure.peak_memory(run, DEVICE)
    problem.clear_grads()
    benchmark.extra_info.update(
        peak_bytes=peak, memory_method=method, max_error=result.max_error, check=result.note
    )
