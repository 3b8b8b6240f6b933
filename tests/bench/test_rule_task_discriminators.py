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
