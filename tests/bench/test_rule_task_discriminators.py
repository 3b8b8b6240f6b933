import dataclasses
import json

import pytest

from rlgaf_fast.bench.rule_task import RULE_PRESETS
from rlgaf_fast.cli import main
from rlgaf_fast.rlgaf.discriminator import RecurrentDiscriminator


@pytest.fixture
def tiny_smoke(monkeypatch):
    """The rule task's smoke preset at test sizes."""
    tiny = dataclasses.replace(
        RULE_PRESETS["smoke"],
        num_demos=200,
        num_test=100,
        num_eval=50,
        num_final=100,
        num_sweep=50,
        gen_hidden=16,
        sft_steps=5,
        sft_batch=16,
        adv_steps=2,
        eval_every=1,
        trainer={"batch_size": 8, "minibatch_size": 8},
    )
    monkeypatch.setitem(RULE_PRESETS, "smoke", tiny)


def test_a_recurrent_discriminator_and_its_pretraining_length_from_the_cli(tmp_path, tiny_smoke):
    """`--discriminator lstm --d-pretrain-steps 3`: the run records both in its preset and
    trains a RecurrentDiscriminator (its parameter count)."""
    command = ["oracle", "--task", "rule", "--preset", "smoke", "--threads", "1"]
    assert main([*command, "--mode", "sft", "--out", str(tmp_path / "sft")]) == 0
    out = tmp_path / "reinforce"
    extra = ["--discriminator", "lstm", "--d-pretrain-steps", "3"]
    args = [*command, "--mode", "reinforce", "--init", str(tmp_path / "sft"), *extra]
    assert main([*args, "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["preset"]["discriminator"] == "lstm"
    assert metrics["preset"]["d_pretrain_steps"] == 3
    expected = sum(t.numel() for t in RecurrentDiscriminator(25).parameters())
    assert metrics["discriminator_trainable_params"] == expected
    assert [h["step"] for h in metrics["history"]] == [0, 1, 2]


def test_a_negative_pretraining_length_is_refused(tmp_path, capsys):
    command = ["oracle", "--task", "rule", "--mode", "grpo", "--out", str(tmp_path / "x")]
    assert main([*command, "--d-pretrain-steps", "-1"]) == 2
    assert "--d-pretrain-steps must be >= 0, got -1" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_lm_features_from_a_wider_sft_run(tmp_path, tiny_smoke):
    """`--d-features DIR`: the lm discriminators read DIR's generator, of its own width, and
    the warm start keeps its own; lm-context's head has one input per feature-model channel."""
    from rlgaf_fast.bench.oracle import load_warm_start, run_oracle
    from rlgaf_fast.bench.rule_task import RuleTask

    command = ["oracle", "--task", "rule", "--preset", "smoke", "--threads", "1"]
    assert main([*command, "--mode", "sft", "--out", str(tmp_path / "sft")]) == 0
    wide = dataclasses.replace(RULE_PRESETS["smoke"], gen_hidden=24)
    run_oracle(RuleTask(), "sft", tmp_path / "wide", preset=wide)
    lm, _ = load_warm_start(tmp_path / "wide", RULE_PRESETS["smoke"], RuleTask())
    assert lm.config.hidden_size == 24  # the run's own width, not the preset's 16
    out = tmp_path / "grpo"
    extra = ["--discriminator", "lm-context", "--d-features", str(tmp_path / "wide")]
    args = [*command, "--mode", "grpo", "--init", str(tmp_path / "sft"), *extra]
    assert main([*args, "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["preset"]["d_features"] == str(tmp_path / "wide")
    head_width = 32  # LMDiscriminator's default hidden
    expected = (2 + 24) * head_width + head_width + head_width + 1
    assert metrics["discriminator_trainable_params"] == expected


def test_lm_features_need_an_lm_discriminator_and_a_finished_run(tmp_path, capsys):
    command = ["oracle", "--task", "rule", "--mode", "grpo", "--out", str(tmp_path / "x")]
    assert main([*command, "--d-features", str(tmp_path)]) == 2
    assert "d_features needs an lm discriminator (the transformer" in capsys.readouterr().err
    args = [*command, "--discriminator", "lm", "--d-features", str(tmp_path / "none")]
    assert main(args) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
