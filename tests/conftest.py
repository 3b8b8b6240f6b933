import os

import pytest
import torch

# Triton kernels run on the CPU through the interpreter when no GPU is present; the variable must
# be set before Triton decorates any kernel.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import rlgaf_fast  # noqa: E402


def fused_backends() -> list[str]:
    """Fused backends this machine can run, for parametrising cross-backend tests."""
    return [b for b in rlgaf_fast.available_backends() if b != "torch"]


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
