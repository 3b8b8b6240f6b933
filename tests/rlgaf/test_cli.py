import json

import yaml

from rlgaf_fast.cli import SUBCOMMANDS, main


def test_subcommands_registered():
    assert {"train", "oracle"} <= set(SUBCOMMANDS)


def test_train_tiny_preset_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(["train", "--preset", "tiny", "--steps", "3", "--out", str(out), "--threads", "1"])
        == 0
    )
    lines = (out / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    assert (out / "final" / "generator.safetensors").exists()
    assert (
        main(
            [
                "train",
                "--preset",
                "tiny",
                "--steps",
                "5",
                "--out",
                str(out),
                "--resume",
                str(out / "final"),
            ]
        )
        == 0
    )
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def test_train_from_yaml_with_jsonl_data(tmp_path):
    data = tmp_path / "demos.jsonl"
    rows = [{"prompt_ids": [2 + i % 5], "response_ids": [3, 4, 5, 1]} for i in range(20)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    model = {
        "model_type": "gpt2",
        "vocab_size": 16,
        "n_embd": 16,
        "n_layer": 1,
        "n_head": 2,
        "n_positions": 32,
    }
    config = {
        "generator": {"config": model},
        "discriminator": {"config": model},
        "data": {"demonstrations": str(data)},
        "pad_token_id": 0,
        "eos_token_id": 1,
        "trainer": {
            "mode": "gumbel",
            "total_steps": 2,
            "batch_size": 4,
            "minibatch_size": 2,
            "max_new_tokens": 5,
            "straight_through": True,
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "out")]) == 0
    logs = [json.loads(x) for x in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert len(logs) == 2 and "d_acc_real" in logs[-1]


def test_rlhf_reward_model_needs_no_pad_token():
    """A reward model loaded without a pad token id (as from_pretrained gives GPT-2) scores a
    batch of responses of different lengths, each as it scores alone."""
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from rlgaf_fast.cli import _reward_model_fn
    from rlgaf_fast.rlgaf.rollout import Batch

    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(
        GPT2Config(
            vocab_size=16,
            n_embd=16,
            n_layer=1,
            n_head=2,
            n_positions=32,
            num_labels=1,
            bos_token_id=None,
            eos_token_id=None,
        )
    )
    assert model.config.pad_token_id is None
    reward = _reward_model_fn(model)
    prompt = torch.tensor([[0, 3], [4, 5]])  # the first prompt is left-padded
    prompt_mask = torch.tensor([[0, 1], [1, 1]])
    response = torch.tensor([[6, 7, 1], [8, 1, 0]])  # the second response is right-padded
    response_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    both = reward(Batch(prompt, prompt_mask, response, response_mask))
    for row in range(2):
        alone = reward(
            Batch(
                prompt[row : row + 1],
                prompt_mask[row : row + 1],
                response[row : row + 1],
                response_mask[row : row + 1],
            )
        )
        torch.testing.assert_close(both[row : row + 1], alone)


def test_train_flags_override_the_config_and_bad_sections_are_named(tmp_path):
    import copy

    import pytest

    from rlgaf_fast.cli import TINY_PRESET, build_from_config

    path = tmp_path / "config.yaml"
    for text, match in (
        ("trainer:\n", "needs a generator section"),
        ("trainer: [1, 2]\n", "trainer section must be a mapping, got list"),
    ):
        path.write_text(text)
        with pytest.raises(ValueError, match=match):
            main(["train", "--config", str(path), "--mode", "ppo", "--steps", "2"])
    spec = copy.deepcopy(TINY_PRESET)
    trainer = build_from_config(
        spec, None, {"mode": "sft", "total_steps": 7, "use_fused_kernels": True}
    )
    config = trainer.config
    assert (config.mode, config.total_steps, config.use_fused_kernels) == ("sft", 7, True)
    assert config.batch_size == TINY_PRESET["trainer"]["batch_size"]  # the rest kept
    assert spec == TINY_PRESET  # the caller's mapping is not changed
    trainer.close()
