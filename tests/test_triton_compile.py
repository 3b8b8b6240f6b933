"""The Triton kernels compile for an H100 (sm_90) with their GPU launch configurations, on a
machine without a GPU: the interpreter, which the other Triton tests use here, accepts code that
the compiler rejects. benchmarks/triton_compile_check.py patches triton's driver, so it runs in
a process of its own."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "triton_compile_check.py"


@pytest.mark.skipif(not os.environ.get("RLGAF_SLOW_TESTS"), reason="set RLGAF_SLOW_TESTS=1")
@pytest.mark.skipif(
    importlib.util.find_spec("triton") is None
    or importlib.util.find_spec("triton.backends.nvidia") is None,
    reason="triton with its NVIDIA backend is not installed",
)
def test_every_triton_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--arch", "90"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    lines = result.stdout.splitlines()
    assert lines[-1] == "0 failure(s)"
    compiled = [line for line in lines if line.startswith("ok ")]
    assert len(compiled) == 66, result.stdout  # every case of the script, each with a cubin
