"""``rlgaf-fast bench --trl`` (rlgaf_fast.bench.trl_grpo): the curve comparison and the reward by
hand, and the benchmark end to end at its tiny size: both paths train, the curves agree, the
report files are written, and a wrong log-probability on our path is caught."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rlgaf_fast.bench import report, trl_grpo
from rlgaf_fast.bench.cli import main

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _curves(**changes):
    base = {
        "loss": [0.5, -0.25, 0.0],
        "reward": [0.5, 0.625, None],
        "grad_norm": [1.0, 2.0, 3.0],
        "entropy": [10.0, 9.5, 9.0],
    }
    return {**base, **changes}


def test_identical_curves_compare_equal():
    result = trl_grpo.compare_curves(_curves(), _curves())
    assert result == {
        "identical": True,
        "max_rel_diff": {k: 0.0 for k in trl_grpo.METRICS},
        "first_mismatch": None,
    }


def test_curves_within_the_tolerance_agree_and_report_their_largest_difference():
    ours = _curves(grad_norm=[1.0, 2.0 * (1 + 5e-5), 3.0], loss=[0.5, -0.25, 5e-7])
    result = trl_grpo.compare_curves(_curves(), ours)
    assert result["identical"] is True
    assert result["max_rel_diff"]["grad_norm"] == pytest.approx(5e-5)
    # against 0 the relative difference is taken over ATOL (1e-6): 5e-7 / 1e-6
    assert result["max_rel_diff"]["loss"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "changes, mismatch",
    [
        ({"entropy": [10.0, 9.5 * (1 + 2e-4), 9.0]}, "entropy at step 1"),
        ({"loss": [0.5, -0.25, 2e-6]}, "loss at step 2"),
        # rewards must be equal: the same samples, not nearly the same
        ({"reward": [0.5, 0.625 * (1 + 1e-6), None]}, "reward at step 1"),
        ({"reward": [0.5, 0.625, 0.5]}, "reward at step 2: None against 0.5"),
        ({"grad_norm": [1.0, 2.0]}, "grad_norm: 3 steps against 2"),
    ],
)
def test_curves_that_differ_are_not_identical(changes, mismatch):
    result = trl_grpo.compare_curves(_curves(), _curves(**changes))
    assert result["identical"] is False
    assert result["first_mismatch"].startswith(mismatch)
    key = mismatch.split()[0].rstrip(":")
    assert result["max_rel_diff"][key] > (0.0 if key == "reward" else trl_grpo.RTOL)


def test_even_words_is_the_fraction_of_even_indexed_words():
    completions = ["w0 w1 w2 w3", "w2", "", "<unk> w4 w7 w10"]
    assert trl_grpo.even_words(completions) == [0.5, 1.0, 0.0, 0.5]


def test_word_tokenizer_numbers_the_words_after_the_special_tokens():
    tokenizer = trl_grpo.word_tokenizer(16)
    assert len(tokenizer) == 16
    assert tokenizer("w0 w11 w12")["input_ids"] == [4, 15, 1]  # w12 is past the vocabulary
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 3
    with pytest.raises(ValueError, match="vocab_size must be > 4, got 4"):
        trl_grpo.word_tokenizer(4)


def test_paths_alternate_so_each_runs_first_as_often():
    trl, ours = trl_grpo.TRL_PATH, trl_grpo.OURS_PATH
    assert trl_grpo._order(1) == [trl, ours]
    assert trl_grpo._order(2) == [trl, ours, ours, trl]


def test_tiny_benchmark_end_to_end(tmp_path, monkeypatch):
    pytest.importorskip("trl", reason="TRL is not installed (pip install 'rlgaf_fast[trl]')")
    import rlgaf_fast

    calls = []
    op = rlgaf_fast.fused_linear_logprobs

    def counted(*args, **kwargs):
        calls.append(args[0].shape[0])
        return op(*args, **kwargs)

    monkeypatch.setattr(rlgaf_fast, "fused_linear_logprobs", counted)
    assert main(["--trl", "--tiny", "--out", str(tmp_path), "--train-steps", "2"]) == 0
    doc = json.loads((tmp_path / "trl_grpo.json").read_text())
    assert doc["curves_identical"] is True
    assert all(c["identical"] for c in doc["curve_comparisons"].values())
    assert max(doc["curves_max_rel_diff"].values()) <= trl_grpo.RTOL
    shape = trl_grpo.SHAPES["tiny"]
    steps = trl_grpo.WARMUP_STEPS + 2 + 1
    for path in (trl_grpo.TRL_PATH, trl_grpo.OURS_PATH):
        curves = doc["curves"][path]
        assert len(curves["loss"]) == steps
        assert any(g > 0 for g in curves["grad_norm"]), "no update to compare"
        (run,) = doc["runs"][path]
        assert len(run["step_times_s"]) == len(run["generate_times_s"]) == 2
        assert all(
            s > g > 0 for s, g in zip(run["step_times_s"], run["generate_times_s"], strict=True)
        )
        assert run["peak_bytes"] > 0
    theirs, ours = doc["rows"]
    assert (theirs["path"], theirs["enabled"]) == (trl_grpo.TRL_PATH, False)
    assert (ours["path"], ours["enabled"]) == (trl_grpo.OURS_PATH, True)
    # one loss forward per step on our path, of the completion tokens only (at most all of them)
    per_step = shape["prompts_per_step"] * shape["num_generations"]
    assert len(calls) == steps
    assert all(0 < n <= per_step * shape["max_completion_length"] for n in calls)
    assert doc["ratios"]["step_time_ours_over_trl"] == pytest.approx(
        ours["step_s"] / theirs["step_s"]
    )
    assert set(doc["goals"]) == {"at_least_as_fast", "no_more_memory", "identical_curves"}
    assert doc["goals"]["identical_curves"] is True
    text = (tmp_path / "trl_grpo.md").read_text()
    assert "Training curves identical" in text
    assert text.count("\n| ") == 1 + 2 + 1 + steps  # a header, 2 paths, a header, the steps
    # the benchmarks page picks the run up
    page = report.benchmarks_page(tmp_path, tmp_path / "docs" / "benchmarks.md")
    assert "## GRPO training step through TRL" in page and "Training curves identical" in page


def test_a_wrong_log_probability_on_our_path_breaks_the_curves(monkeypatch):
    """Our path's log-probs scaled by 1.001 (an error far above float32 rounding): the gradients
    grow by 0.1%, and the benchmark says the curves are not identical."""
    pytest.importorskip("trl", reason="TRL is not installed (pip install 'rlgaf_fast[trl]')")
    import rlgaf_fast

    op = rlgaf_fast.fused_linear_logprobs

    def wrong(*args, **kwargs):
        result = op(*args, **kwargs)
        return result._replace(log_probs=result.log_probs * 1.001)

    monkeypatch.setattr(rlgaf_fast, "fused_linear_logprobs", wrong)
    torch.set_num_threads(1)
    doc = trl_grpo.run_benchmark(dict(trl_grpo.SHAPES["tiny"]), steps=1, rounds=1, device=CPU)
    assert doc["curves_identical"] is False and doc["goal_met"] is False
    (comparison,) = doc["curve_comparisons"].values()
    assert comparison["first_mismatch"] is not None
    assert max(doc["curves_max_rel_diff"].values()) > trl_grpo.RTOL
    assert not math.isinf(doc["curves_max_rel_diff"]["loss"])
