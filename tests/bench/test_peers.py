"""The --peers cases of the benchmark suite (rlgaf_fast.bench.peers): every provider against the
reference on a tiny case, the GRPO loss definition by hand, the derived comparisons, and a run
end to end. The other libraries are optional: their tests skip where they are not installed."""

from __future__ import annotations

import builtins
import json

import pytest
import torch

from rlgaf_fast import reference
from rlgaf_fast.bench import cases, peers, presets, report, suite
from rlgaf_fast.bench.cli import main

N, H, V = 16, 32, 64
CPU = torch.device("cpu")
# the runs below need some ceiling to derive from, not a measured one (seconds each)
CEILINGS = {"bytes_per_s": 1e10, "bytes_method": "fixed", "flops_per_s": 1e11, "flops_method": "-"}
MODULES = {presets.TRL: "trl", presets.LIGER: "liger_kernel", presets.CCE: "cut_cross_entropy"}


def _case(op: str) -> cases.Case:
    selected, _ = presets.select("peers", "cpu", [op], shape=(N, H, V))
    (case,) = selected
    return case


LOGPROBS = _case("fused_linear_logprobs")
GRPO = _case("fused_linear_ppo_loss")


def _providers_of(case: cases.Case) -> list[str]:
    return list(cases.providers(case, ["cpp"]))


def _run(case: cases.Case, name: str, problem: cases.Problem | None = None):
    problem = problem or cases.make_problem(case, CPU)
    provider = cases.providers(case, ["cpp"])[name]
    outputs = cases.step(case, problem, provider)
    return problem, outputs


@pytest.mark.parametrize(
    "case, name",
    [(LOGPROBS, name) for name in _providers_of(LOGPROBS) if name != "matmuls"]
    + [(GRPO, name) for name in _providers_of(GRPO) if name != "matmuls"],
    ids=lambda x: x.op if isinstance(x, cases.Case) else x,
)
def test_every_provider_matches_the_reference_forward_and_backward(case, name):
    if name in MODULES:
        pytest.importorskip(MODULES[name])
    problem, outputs = _run(case, name)
    result = cases.check(case, problem, name, outputs)
    assert result.passed is True, (name, result)
    assert result.max_error < 1e-4
    if name == presets.CCE:
        assert len(outputs) == 2 and "log-probs only" in result.note


def test_the_check_compares_entropy_and_gradients():
    problem, (objective, log_probs, entropy) = _run(LOGPROBS, "cpp")
    assert cases.check(LOGPROBS, problem, "cpp", (objective, log_probs, entropy)).passed
    wrong_entropy = cases.check(LOGPROBS, problem, "x", (objective, log_probs, entropy * 1.01))
    assert wrong_entropy.passed is False  # check() cleared the gradients: they are missing too
    problem, outputs = _run(LOGPROBS, "cpp", problem)
    problem.tensors["weight"].grad.mul_(1.01)
    assert cases.check(LOGPROBS, problem, "x", outputs).passed is False


def test_a_log_probs_only_peer_is_checked_without_the_entropy_term():
    """A provider that leaves the entropy out of its backward passes as log-probs only, and fails
    where it claims the entropy (its gradient then lacks that term)."""
    problem = cases.make_problem(LOGPROBS, CPU)

    def reference_of(p):
        t = p.tensors
        return reference.fused_linear_logprobs(t["hidden"], t["weight"], t["actions"])

    def log_probs_only(p):
        return peers._logprobs_outputs(p, reference_of(p)[0], None)

    outputs = cases.step(LOGPROBS, problem, log_probs_only)
    assert cases.check(LOGPROBS, problem, "x", outputs).passed is True
    outputs = cases.step(LOGPROBS, problem, log_probs_only)
    entropy = reference_of(problem)[1].detach()
    assert cases.check(LOGPROBS, problem, "x", (*outputs, entropy)).passed is False


def test_grpo_case_is_liger_loss_type_grpo_by_hand():
    """The eager GRPO loss equals, token by token: -min(r A, clip(r, 0.8, 1.2) A) + 0.04 *
    (exp(ref - logp) - (ref - logp) - 1), each sequence's mean over its unmasked tokens, then the
    mean over the 8 sequences; masked tokens change nothing."""
    problem = cases.make_problem(GRPO, CPU)
    t = problem.tensors
    b, length = peers.sequences(N)
    assert (b, length) == (8, 2) and t["mask"].shape == (8, 2)
    assert 0 < t["mask"].sum() < N  # some completions are shorter than the longest
    with torch.no_grad():
        logp = torch.log_softmax(t["hidden"] @ t["weight"].T, -1)
        logp = logp.gather(-1, t["actions"].reshape(-1, 1)).reshape(b, length)
        ratio = torch.exp(logp - t["old_logprobs"])
        adv = t["advantages"][:, None]
        pg = -torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
        d = t["ref_logprobs"] - logp
        token = pg + 0.04 * (torch.exp(d) - d - 1)
        want = ((token * t["mask"]).sum(-1) / t["mask"].sum(-1)).mean()
        loss, kl = cases.providers(GRPO, [])["eager"](problem)
        want_kl = ((torch.exp(d) - d - 1) * t["mask"]).sum() / t["mask"].sum()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert kl.item() == pytest.approx(want_kl.item(), rel=1e-5)


def test_liger_with_another_loss_type_fails_the_check():
    """The check tells the aggregations apart: Liger's "dapo" (a mean over all tokens) is not
    the case's "grpo" (a mean over sequences of their means) on completions of unequal length."""
    pytest.importorskip("liger_kernel")
    # compiled=False: the aggregation is what differs, and a new compile would take seconds
    dapo = peers.liger_provider(loss_type="dapo", compiled=False)

    problem = cases.make_problem(GRPO, CPU)
    outputs = cases.step(GRPO, problem, dapo)
    result = cases.check(GRPO, problem, "liger", outputs)
    assert result.passed is False and result.max_error > 1e-3


def _row(provider, median_ms, peak, check=True, status="ok"):
    return {
        **LOGPROBS.__dict__,
        "case": LOGPROBS.key,
        "provider": provider,
        "status": status,
        "check": check,
        "median_ms": median_ms,
        "peak_bytes": peak,
        "error": None if status == "ok" else "unavailable: x",
    }


def test_derived_comparisons_and_goals_name_the_fastest_and_the_leanest():
    rows = [
        _row("eager", 12.0, 1000),
        _row("compile", 8.0, 900),
        _row("cpp", 10.0, 100),
        _row("matmuls", 5.0, 60, check=None),  # the floor is no rival
        _row(presets.TRL, 9.0, 50),
        _row(presets.CCE, 4.0, 20, check=False),  # a failed check is no rival either
        _row(presets.LIGER, None, None, check=None, status="unavailable"),
    ]
    peers.derive(rows)
    ours = rows[2]
    assert ours["fastest_other"] == "compile" and ours["time_ratio_vs_fastest_other"] == 1.25
    assert ours["leanest_peer"] == presets.TRL and ours["mem_ratio_vs_leanest_peer"] == 2.0
    assert rows[4]["time_ratio_vs_ours"] == 0.9 and rows[4]["mem_ratio_vs_ours"] == 0.5
    assert rows[0]["computes"] == "log-probs + entropy"
    assert rows[5]["computes"] == "log-probs only"
    _, goals = presets.select("peers", "cpu", None, shape=(N, H, V))
    verdicts = suite.evaluate_goals(goals, rows)
    assert [v["provider_row"] for v in verdicts] == ["cpp", "cpp"]  # peers are not "fused"
    assert [v["met"] for v in verdicts] == [False, False]
    ours.update(median_ms=7.0, peak_bytes=50)
    peers.derive(rows)
    assert [v["met"] for v in suite.evaluate_goals(goals, rows)] == [True, True]


def test_peer_sizes_by_device_and_shape_only_for_peers():
    (logprobs, grpo), goals = presets.select("peers", "cpu", None)
    assert (logprobs.n, logprobs.d, logprobs.v, logprobs.dtype) == (4096, 1024, 32000, "float32")
    assert grpo.variant == presets.GRPO and len(goals) == 2
    (logprobs, _), goals = presets.select("peers", "cuda", None)
    assert (logprobs.n, logprobs.d, logprobs.v, logprobs.dtype) == (8192, 4096, 128256, "bfloat16")
    assert goals == []  # the targets are the CPU's
    with pytest.raises(ValueError, match="peers preset"):
        presets.select("quick", "cpu", None, shape=(N, H, V))


def test_a_peer_that_cannot_be_imported_is_unavailable_and_the_run_goes_on(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_liger(name, *args, **kwargs):
        if name.startswith("liger_kernel"):
            raise ImportError("no liger here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_liger)
    monkeypatch.setattr(suite, "ceilings", lambda device, preset: CEILINGS)
    monkeypatch.setitem(suite.TIMING, "peers", {"min_repeats": 1, "max_repeats": 1, "budget_s": 0})
    doc = suite.run_suite(
        "peers",
        ops=["fused_linear_ppo_loss"],
        out_dir=str(tmp_path),
        progress=False,
        compile_baseline=False,
        plots=False,
        shape=(N, H, V),
    )
    (liger,) = [r for r in doc["rows"] if r["provider"] == presets.LIGER]
    assert liger["status"] == "unavailable"
    assert liger["error"].startswith("unavailable: liger_kernel cannot be imported")
    assert "no liger here" in liger["error"]
    cpp = next(r for r in doc["rows"] if r["provider"] == "cpp")
    assert cpp["check"] is True and cpp["median_ms"] > 0


def test_bench_peers_runs_end_to_end_and_writes_reports(tmp_path, monkeypatch):
    monkeypatch.setattr(suite, "ceilings", lambda device, preset: CEILINGS)
    monkeypatch.setitem(suite.TIMING, "peers", {"min_repeats": 2, "max_repeats": 2, "budget_s": 0})
    args = ["--peers", "--shape", str(N), str(H), str(V), "--out", str(tmp_path)]
    args += ["--no-progress", "--no-compile", "--threads", "1", "--note", "a test run"]
    threads = torch.get_num_threads()
    try:
        assert main(args) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["preset"] == "peers" and doc["note"] == "a test run"
    by_provider = {(r["op"], r["provider"]): r for r in doc["rows"]}
    expected = {
        ("fused_linear_logprobs", name) for name in ("eager", "cpp", "matmuls", presets.TRL)
    } | {("fused_linear_ppo_loss", name) for name in ("eager", "cpp", "matmuls", presets.LIGER)}
    expected |= {("fused_linear_logprobs", name) for name in (presets.CCE, "cpp (save_logits)")}
    assert expected == set(by_provider)
    for row in doc["rows"]:
        if row["provider"] in peers.PEERS and row["status"] == "unavailable":
            continue  # a peer not installed here
        assert row["status"] == "ok" and row["check"] in (True, None), row
        assert row["median_ms"] > 0 and row["peak_bytes"] is not None
    ours = by_provider[("fused_linear_logprobs", "cpp")]
    assert ours["time_ratio_vs_ours"] == 1.0 and ours["computes"] == "log-probs + entropy"
    assert [g["provider_row"] for g in doc["goals"]] == ["cpp", "cpp (save_logits)"] * 2
    saved = by_provider[("fused_linear_logprobs", "cpp (save_logits)")]
    assert saved["computes"] == "log-probs + entropy" and saved["check"] is True
    text = (tmp_path / "results.md").read_text()
    assert "## Peers" in text and "| log-probs only |" in text
    assert "peers.png" in doc["plots"] and (tmp_path / "peers.png").stat().st_size > 0
    page = report.benchmarks_page(tmp_path, tmp_path / "docs" / "benchmarks.md")
    assert "## Peers" in page and "#### Peers" in page and "a test run" in page
