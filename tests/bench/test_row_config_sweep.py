"""benchmarks/row_config_sweep.py, as gpu_check.sh's CPU dry run calls it: it times eager and
the candidates, writes its table, and leaves the launch configuration as it found it."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
SCRIPT = ROOT / "benchmarks" / "row_config_sweep.py"


def test_sweep_dry_run_writes_every_candidate(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path), "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    doc = json.loads((tmp_path / "row_config_sweep.json").read_text())
    configs = [row["config"] for row in doc["rows"]]
    assert configs[0] == "eager" and len(configs) == 3
    assert all(row["ms"] > 0 for row in doc["rows"])
    assert [row.get("default") for row in doc["rows"][1:]] == [True, False]
    table = (tmp_path / "row_config_sweep.md").read_text()
    assert "(4096, 8, 2) (default)" in table and "| eager |" in table


def test_sweep_restores_the_default_configuration(monkeypatch, tmp_path):
    import importlib.util

    from rlgaf_fast.kernels import gumbel_softmax as row_kernels

    spec = importlib.util.spec_from_file_location("row_config_sweep", SCRIPT)
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    before = dict(row_kernels.GPU_ROW_CONFIG)
    argv = ["row_config_sweep.py", "--out", str(tmp_path), "--device", "cpu"]
    monkeypatch.setattr(sys, "argv", argv)
    assert sweep.main() == 0
    assert row_kernels.GPU_ROW_CONFIG == before
