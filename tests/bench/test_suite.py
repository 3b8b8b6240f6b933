"""Tests of the benchmark machinery itself (rlgaf_fast.bench), not of timings."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from rlgaf_fast.bench import cases, measure, presets, report, suite
from rlgaf_fast.ops import registry

_REAL_PROVIDERS = cases.providers


def _with_raising(provider: str):
    """cases.providers with one more provider, or one replaced, that raises."""

    def providers(case, fused):
        found = dict(_REAL_PROVIDERS(case, fused))
        found[provider] = lambda p: (_ for _ in ()).throw(RuntimeError("kernel exploded"))
        return found

    return providers


def test_tiny_run_writes_reports_and_records_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(cases, "providers", _with_raising("broken"))
    doc = suite.run_suite(
        "tiny",
        ops=["soft_embedding"],
        out_dir=str(tmp_path),
        progress=False,
        compile_baseline=False,
    )
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
    rows = [
        {"case": "k", "provider": "cpp", "speedup_vs_eager": 20.0, "error": None, "check": True},
        {"case": "k", "provider": "eager", "speedup_vs_eager": 1.0, "error": None, "check": True},
    ]
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


def test_peak_memory_without_profiler_events_runs_once_and_says_unknown(monkeypatch):
    calls = []
    monkeypatch.delenv("RLGAF_BENCH_CPU_MEMORY", raising=False)
    monkeypatch.setattr(measure, "_profiled_peak_bytes", lambda fn: (fn(), None))
    result, peak, method = measure.peak_memory(lambda: calls.append(1) or 7, torch.device("cpu"))
    assert (result, peak, method, calls) == (7, None, measure.CPU_MEMORY_METHOD, [1])


def test_memory_method_of_the_run_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("RLGAF_BENCH_CPU_MEMORY", "rss")
    doc = suite.run_suite(
        "tiny",
        ops=["gumbel_softmax"],
        out_dir=str(tmp_path),
        progress=False,
        compile_baseline=False,
        plots=False,
    )
    assert doc["memory_method"] == measure.RSS_MEMORY_METHOD
    assert {r["memory_method"] for r in doc["rows"] if r["status"] == "ok"} == {
        measure.RSS_MEMORY_METHOD
    }


def test_a_fused_backend_without_the_ops_kernel_is_not_a_provider(monkeypatch):
    case = next(c for c in presets.select("quick", "cuda", ["ppo_loss"])[0])
    assert {"eager", "compile", "triton"} <= set(cases.providers(case, ["triton"]))
    assert "cpp" not in cases.providers(case, ["triton"])
    monkeypatch.setitem(registry.OPS, "ppo_loss", registry.OpSpec(("cpp",), "ppo_loss"))
    assert "triton" not in cases.providers(case, ["triton"])
    case = next(c for c in presets.select("quick", "cuda", ["gumbel_softmax"])[0])
    assert "triton" in cases.providers(case, ["triton"])


def test_fraction_of_ceiling_is_the_roofline_bound():
    """An embedding with few rows is bound by reading its [V, D] weight, not by its FLOPs; a
    wide one with many rows by its FLOPs (2 D FLOPs per probability read); a float32 case is
    held to the float32 matmul ceiling."""
    ceiling = {"bytes_per_s": 1e12, "flops_per_s": 1e15, "flops_float32_per_s": 1e14}

    def derived(case, median_ms):
        row = {
            **dataclasses.asdict(case),
            "case": case.key,
            "provider": "triton",
            "median_ms": median_ms,
            "peak_bytes": None,
        }
        suite.derive([row], ceiling)
        return row

    few = cases.Case("soft_embedding", "fwd", 4, 128256, 256, "bfloat16")
    row = derived(few, 1.0)
    weight_bytes = 128256 * 256 * 2
    assert row["bound"] == "bytes" and cases.work(few)["bytes"] > weight_bytes
    assert row["fraction_of_ceiling"] == pytest.approx(cases.work(few)["bytes"] / 1e12 / 1e-3)
    many = cases.Case("soft_embedding", "fwd", 8192, 32000, 4096, "bfloat16")
    flops = 2 * 8192 * 32000 * 4096
    assert derived(many, 10.0)["bound"] == "flops"
    assert derived(many, 10.0)["fraction_of_ceiling"] == pytest.approx(flops / 1e15 / 1e-2)
    fp32 = dataclasses.replace(many, dtype="float32")
    assert derived(fp32, 100.0)["fraction_of_ceiling"] == pytest.approx(flops / 1e14 / 1e-1)
    gumbel = cases.Case("gumbel_softmax", "fwd+bwd", 512, 32000)
    assert cases.work(gumbel) == {"bytes": 5 * 512 * 32000 * 4, "flops": 0.0}


def test_bench_command_fails_on_a_fused_error_but_not_on_a_baseline_error(tmp_path, monkeypatch):
    from rlgaf_fast.bench.cli import main

    args = [
        "--tiny",
        "--ops",
        "gumbel_softmax",
        "--out",
        str(tmp_path),
        "--no-plots",
        "--no-progress",
        "--no-compile",
    ]
    monkeypatch.setattr(cases, "providers", _with_raising("cpp"))
    assert main(args) == 1
    monkeypatch.setattr(cases, "providers", _with_raising("eager"))
    assert main(args) == 0


def test_commit_can_be_given_where_the_tree_has_no_git(monkeypatch):
    monkeypatch.setenv("RLGAF_BENCH_COMMIT", "0123abc")
    assert suite.environment(torch.device("cpu"))["commit"] == "0123abc"
