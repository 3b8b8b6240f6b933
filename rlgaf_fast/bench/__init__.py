"""The benchmark suite: every op x backend against eager PyTorch and torch.compile.

``rlgaf-fast bench [--quick | --full | --goals] [--ops ...] [--out DIR]`` runs it
(``python -m rlgaf_fast.bench`` too); ``pytest benchmarks/ --benchmark-only`` runs the same cases
through pytest-benchmark. See :func:`rlgaf_fast.bench.suite.run_suite`.
"""

from rlgaf_fast.bench.cases import Case
from rlgaf_fast.bench.suite import run_suite

__all__ = ["Case", "run_suite"]
