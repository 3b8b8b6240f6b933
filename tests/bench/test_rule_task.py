import dataclasses
import itertools
import json
import math

import pytest
import torch

from rlgaf_fast.bench.rule_task import RULE_PRESETS, RuleTask

# Tokens with 4 bracket types and 8 fillers: opens 1..4, closes 5..8, fillers 9..16.
OPEN_A, OPEN_B, CLOSE_A, CLOSE_B, FILL = 1, 2, 5, 6, 9


def test_samples_all_obey_the_rule_and_have_finite_likelihood():
    task = RuleTask()
    samples = task.sample(2000, seed=0)
    assert samples.shape == (2000, 32) and samples.dtype == torch.int64
    assert samples.min() >= 1 and samples.max() < task.vocab_size  # never the start token
    assert task.validity(samples).all()
    assert torch.isfinite(task.log_likelihood(samples)).all()
    assert torch.equal(task.sample(50, seed=3), task.sample(50, seed=3))
    # the rule is not vacuous: samples nest brackets and close them
    k = task.num_types
    depth = ((samples >= 1) & (samples <= k)).long() - ((samples > k) & (samples <= 2 * k)).long()
    assert depth.cumsum(1).max() >= 4 and (depth.cumsum(1)[:, -1] == 0).all()


def test_validity_on_hand_made_sequences():
    task = RuleTask(seq_len=6, num_types=4)
    valid = [
        [OPEN_A, OPEN_B, CLOSE_B, CLOSE_A, FILL, FILL],
        [FILL, OPEN_A, CLOSE_A, OPEN_B, FILL, CLOSE_B],
        [FILL] * 6,
    ]
    invalid = [
        [OPEN_A, OPEN_B, CLOSE_A, CLOSE_B, FILL, FILL],  # crossed types
        [OPEN_A, FILL, FILL, FILL, FILL, FILL],  # left open
        [CLOSE_A, OPEN_A, FILL, FILL, FILL, FILL],  # closed before opened
        [0, FILL, FILL, FILL, FILL, FILL],  # the start token
        [FILL, FILL, task.vocab_size + 3, FILL, FILL, FILL],  # out of the vocabulary
    ]
    assert task.validity(torch.tensor(valid)).tolist() == [True] * 3
    assert task.validity(torch.tensor(invalid)).tolist() == [False] * 5
    ll = task.log_likelihood(torch.tensor(valid + invalid)).sum(1)
    assert torch.isfinite(ll).tolist() == [True] * 3 + [False] * 5


def test_exact_likelihood_sums_to_one_over_every_sequence():
    task = RuleTask(seq_len=5, num_types=2, num_fillers=2)  # vocabulary 7: 7**5 sequences
    every = torch.tensor(list(itertools.product(range(task.vocab_size), repeat=5)))
    log_p = task.log_likelihood(every).sum(1)
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-12)
    assert torch.equal(torch.isfinite(log_p), task.validity(every))


def test_first_steps_by_hand():
    # At depth 0 with 20 steps left, open (0.4 of 4 types) or a filler (0.3, by the chain's
    # first row) are allowed, not a close: open 0.4 / 0.7 / 4 = 1/7 per type.
    task = RuleTask(seq_len=20, num_types=4)
    seq = torch.tensor([[OPEN_A, CLOSE_A] + [FILL] * 18])
    ll = task.log_likelihood(seq)[0]
    assert ll[0].item() == pytest.approx(math.log(1 / 7))
    # then at depth 1: open 0.4, close 0.3, filler 0.3, so close A is 0.3
    assert ll[1].item() == pytest.approx(math.log(0.3))
    assert ll[2].item() == pytest.approx(math.log(0.3 / 0.7) + task.log_chain[8, 0].item())


def test_monte_carlo_frequencies_match_the_likelihood():
    task = RuleTask(seq_len=4, num_types=1, num_fillers=2)
    samples = task.sample(20_000, seed=1)
    rows, counts = samples.unique(dim=0, return_counts=True)
    expected = task.log_likelihood(rows).sum(1).exp()
    assert expected.sum().item() > 0.999  # the rows drawn are nearly all the mass
    freq = counts.double() / counts.sum()
    assert (freq - expected).abs().max().item() < 0.01


def test_nll_skips_invalid_rows_and_score_reports_validity():
    task = RuleTask(seq_len=4, num_types=4)
    good = task.sample(3, seed=0)
    bad = torch.tensor([[OPEN_A, FILL, FILL, FILL]])
    mixed = torch.cat([good, bad])
    assert task.nll(mixed) == pytest.approx(task.nll(good))
    assert -task.log_likelihood(good).sum().item() / 12 == pytest.approx(task.nll(good))
    assert task.score(mixed)["validity"] == pytest.approx(0.75)
    assert task.reward(mixed).tolist() == [1.0, 1.0, 1.0, 0.0]
    assert math.isnan(task.nll(bad))
    assert task.score(bad) == {"validity": 0.0, "nll_true_valid": None}


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="p_open, p_close and p_filler must be > 0"):
        RuleTask(p_close=0)
    with pytest.raises(ValueError, match=r"tokens must be \[B, 32\]"):
        RuleTask().log_likelihood(torch.zeros(2, 5, dtype=torch.int64))


def test_rule_task_through_the_cli(tmp_path, monkeypatch):
    """The smoke pipeline at test sizes: an sft warm start, then gumbel against the transformer
    discriminator, through `rlgaf-fast oracle --task rule`."""
    from rlgaf_fast.cli import main

    tiny = dataclasses.replace(
        RULE_PRESETS["smoke"],
        num_demos=200,
        num_test=100,
        num_eval=50,
        num_final=200,
        num_sweep=50,
        gen_hidden=16,
        sft_steps=5,
        sft_batch=16,
        adv_steps=2,
        d_pretrain_steps=2,
        eval_every=1,
        trainer={"batch_size": 8, "minibatch_size": 8},
    )
    monkeypatch.setitem(RULE_PRESETS, "smoke", tiny)
    command = ["oracle", "--task", "rule", "--preset", "smoke", "--threads", "1"]
    assert main([*command, "--mode", "sft", "--out", str(tmp_path / "sft")]) == 0
    sft = json.loads((tmp_path / "sft" / "metrics.json").read_text())
    assert sft["task"] == "rule"
    sweep = sft["temperature_sweep"]
    assert [row["temperature"] for row in sweep] == [0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3]
    assert all(0 <= row["validity"] <= 1 for row in sweep)
    out = tmp_path / "gumbel"
    init = ["--init", str(tmp_path / "sft")]
    assert main([*command, "--mode", "gumbel", "--out", str(out), *init]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"validity", "nll_true_valid", "nll_test", "distinct", "copied"} <= set(metrics["final"])
    assert metrics["warm_start"] == sft["final"]
    assert [h["step"] for h in metrics["history"]] == [0, 1, 2]
    assert metrics["preset"]["discriminator"] == "transformer"
    rows = [
        [int(t) for t in line.split()]
        for line in (out / "samples.txt").read_text().split("\n")[:-1]
    ]
    assert len(rows) == 200 and all(len(row) == 32 for row in rows)
    # the metrics are those of the written samples
    samples = torch.tensor(rows)
    task = RuleTask()
    assert metrics["final"]["validity"] == task.validity(samples).float().mean().item()
    # 5 MLE steps from scratch are far from the rule: few samples are valid
    assert metrics["final"]["validity"] < 0.5
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_checks_which_task_needs_the_oracle_file(tmp_path, capsys):
    from rlgaf_fast.cli import main

    command = ["oracle", "--mode", "sft", "--out", str(tmp_path / "x")]
    assert main([*command, "--task", "rule", "--oracle", "params.pkl"]) == 2
    assert "--task rule needs no file" in capsys.readouterr().err
    assert main(command) == 2
    assert "--task seqgan needs --oracle" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_seqgan_warm_start_is_refused_for_the_rule_task(tmp_path):
    from rlgaf_fast.bench.oracle import load_warm_start

    (tmp_path / "metrics.json").write_text(json.dumps({"seed": 0, "final": {}}))
    (tmp_path / "generator.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="trained on task 'seqgan', not 'rule'"):
        load_warm_start(tmp_path, task=RuleTask())
