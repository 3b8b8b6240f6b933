"""Tests of the benchmark machinery itself (not timings): plain ``pytest benchmarks/test_suite.py``
(``--benchmark-only`` skips them)."""

from __future__ import annotations

import json

import pytest
import torch

from rlgaf_fast.bench import cases, measure, presets, report, suite


def test_tiny_run_writes_reports_and_records_errors(tmp_path, monkeypatch):
    real = cases.providers

    def with_broken(case, fused):
        found = dict(real(case, fused))
        found["broken"] = lambda p: (_ for _ in ()).throw(RuntimeError("kernel exploded"))
        return found

    monkeypatch.setattr(cases, "providers", with_broken)
    doc = suite.run_suite("tiny", ops=["soft_embedding"], out_dir=str(tmp_path), progress=False,
                          compile_baseline=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["environment"]["torch"] == torch.__version__
    assert {"device", "date", "commit", "triton", "cuda"} <= set(saved["environment"])
    eager = [r for r in doc["rows"] if r["provider"] == "eager"]
    assert eager and all(r["check"] is True and r["median_ms"] > 0 for r in eager)
    assert all(r["peak_bytes"] is not None for r in eager)
    broken = [r for r in doc["rows"] if r["provider"] == "broken"]
    assert broken and all(r["status"] == "error" and "exploded" in r["error"] for r in broken)
    assert "soft_embedding" in (tmp_path / "results.md").read_text()


def test_check_catches_a_wrong_result():
    case = cases.Case("ppo_loss", "fwd+bwd", 8, 50, variant=presets.CLIP_ENTROPY)
    problem = cases.make_problem(case, torch.device("cpu"))

    def off_by_a_bit(p):
        loss, logprobs, entropy = cases.providers(case, [])["eager"](p)
        return loss * 1.01, logprobs, entropy

    outputs = cases.step(case, problem, off_by_a_bit)
    result = cases.check(case, problem, "wrong", outputs)
    assert result.passed is False and result.max_error > 1e-3


def test_cpu_peak_memory_counts_temporaries():
    x = torch.randn(1000, 1000)

    def two_temporaries():
        a = x * 2
        b = a + 1
        return b.sum()

    _, peak, method = measure.peak_memory(two_temporaries, torch.device("cpu"))
    assert 8_000_000 <= peak < 12_000_000, (peak, method)


def test_goals_are_judged_and_rendered():
    goal = presets.Goal("k", "cpp", "speedup_vs_eager", at_least=15, text="cpp >= 15x")
    rows = [{"case": "k", "provider": "cpp", "speedup_vs_eager": 20.0, "error": None,
             "check": True},
            {"case": "k", "provider": "eager", "speedup_vs_eager": 1.0, "error": None,
             "check": True}]
    (verdict,) = suite.evaluate_goals([goal], rows)
    assert verdict["met"] is True and verdict["value"] == 20.0
    rows[0]["speedup_vs_eager"] = 3.0
    assert suite.evaluate_goals([goal], rows)[0]["met"] is False
    lines = report.goals_table({"goals": suite.evaluate_goals([goal], rows)})
    assert any("**no**" in line for line in lines)


@pytest.mark.parametrize("preset", ["tiny", "quick", "full", "goals"])
def test_presets_select_known_ops(preset):
    for device in ("cpu", "cuda"):
        selected, goals = presets.select(preset, device, None)
        assert all(c.op in presets.OPS for c in selected)
        keys = {c.key for c in selected}
        assert all(g.case_key in keys for g in goals)
