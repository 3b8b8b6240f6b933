import json
import os
import subprocess
import sys

import pytest
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


def test_train_flags_override_the_config_and_bad_sections_are_named(tmp_path, capsys):
    import copy

    from rlgaf_fast.cli import TINY_PRESET, build_from_config

    path = tmp_path / "config.yaml"
    for text, match in (
        ("trainer:\n", "needs a generator section"),
        ("trainer: [1, 2]\n", "trainer section must be a mapping, got list"),
    ):
        path.write_text(text)
        assert main(["train", "--config", str(path), "--mode", "ppo", "--steps", "2"]) == 2
        assert match in capsys.readouterr().err
    spec = copy.deepcopy(TINY_PRESET)
    trainer = build_from_config(
        spec, None, {"mode": "sft", "total_steps": 7, "use_fused_kernels": True}
    )
    config = trainer.config
    assert (config.mode, config.total_steps, config.use_fused_kernels) == ("sft", 7, True)
    assert config.batch_size == TINY_PRESET["trainer"]["batch_size"]  # the rest kept
    assert spec == TINY_PRESET  # the caller's mapping is not changed
    trainer.close()


# ---------------------------------------------------------------------- errors: one line each


@pytest.fixture
def no_models(monkeypatch):
    """Fails a test that builds a model: these errors must come first, in seconds."""
    import rlgaf_fast.cli as cli

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the error was found")

    monkeypatch.setattr(cli, "_build_model", refuse)


def one_line_error(capsys, argv, *words):
    """Runs the command; asserts exit status 2 and one stderr line naming ``words``."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith(f"rlgaf-fast {argv[0]}: error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in err, (word, err)
    return err


def write(path, text):
    path.write_text(text)
    return str(path)


def test_train_needs_a_config_or_a_preset(capsys):
    one_line_error(capsys, ["train"], "--config", "--preset tiny")


def test_a_missing_config_file_is_named(tmp_path, capsys):
    missing = str(tmp_path / "missing.yaml")
    one_line_error(capsys, ["train", "--config", missing], missing, "does not exist")


def test_an_unknown_trainer_key_is_named_with_the_closest_one(tmp_path, capsys, no_models):
    cfg = write(tmp_path / "cfg.yaml", "trainer:\n  kl_coeff: 0.1\n")
    err = one_line_error(capsys, ["train", "--preset", "tiny", "--config", cfg])
    assert f"unknown trainer key 'kl_coeff' in {cfg}; did you mean 'kl_coef'?" in err


@pytest.mark.parametrize(
    "text,words",
    [
        ("trainr:\n  kl_coef: 0.1\n", ["top-level key 'trainr'", "'trainer'"]),
        ("data:\n  demonstration: x.jsonl\n", ["data key 'demonstration'", "'demonstrations'"]),
        ("data:\n  synthetic: {num_example: 8}\n", ["'num_example'", "'num_examples'"]),
        ("generator:\n  name_or_pth: gpt2\n", ["generator key 'name_or_pth'", "'name_or_path'"]),
        ("trainer:\n  zzz: 1\n", ["trainer key 'zzz'", "valid keys: mode, seed"]),
        (
            "trainer:\n  kl_coeff: 0.1\n  batchsize: 4\n",
            ["'kl_coeff' (did you mean 'kl_coef'?)", "'batchsize' (did you mean 'batch_size'?)"],
        ),
    ],
)
def test_unknown_keys_of_every_section_are_named(tmp_path, capsys, no_models, text, words):
    cfg = write(tmp_path / "cfg.yaml", text)
    one_line_error(capsys, ["train", "--preset", "tiny", "--config", cfg], cfg, *words)


@pytest.mark.parametrize(
    "text,words",
    [
        ("trainer:\n  kl_coef: -1\n", ["kl_coef must be >= 0, got -1"]),
        ("trainer:\n  batch_size: '1e3'\n", ["batch_size must be int, got '1e3'"]),
        ("trainer:\n  batch_size: 6\n  minibatch_size: 4\n", ["minibatch_size (4)"]),
        ("trainer:\n  kl_coef: [\n", ["line 3", "invalid YAML"]),
        ("- a list\n", ["expected a YAML mapping"]),
    ],
)
def test_invalid_values_and_yaml_are_one_line(tmp_path, capsys, no_models, text, words):
    cfg = write(tmp_path / "cfg.yaml", text)
    one_line_error(capsys, ["train", "--preset", "tiny", "--config", cfg], *words)


def test_invalid_flags_are_one_line(capsys, no_models):
    one_line_error(capsys, ["train", "--preset", "tiny", "--steps", "-1"], "total_steps")


@pytest.mark.parametrize("section", ["demonstrations", "prompts"])
def test_a_missing_data_file_is_named(tmp_path, capsys, no_models, section):
    missing = str(tmp_path / "missing.jsonl")
    cfg = write(tmp_path / "cfg.yaml", f"data:\n  synthetic: {{}}\n  {section}: {missing}\n")
    one_line_error(
        capsys, ["train", "--preset", "tiny", "--config", cfg], f"data.{section}", missing
    )


def test_a_malformed_record_is_named_by_file_and_line(tmp_path, capsys, no_models):
    good = json.dumps({"prompt_ids": [2], "response_ids": [3, 1]})
    data = write(tmp_path / "demos.jsonl", f'{good}\n\n{good}\n{{"prompt_ids": [2] ]}}\n')
    cfg = write(tmp_path / "cfg.yaml", f"data:\n  demonstrations: {data}\n")
    one_line_error(
        capsys, ["train", "--preset", "tiny", "--config", cfg], f"{data}, line 4", "JSON"
    )


def test_a_missing_resume_directory_is_named(tmp_path, capsys):
    missing = str(tmp_path / "no-checkpoint")
    one_line_error(
        capsys,
        ["train", "--preset", "tiny", "--steps", "1", "--threads", "1", "--resume", missing],
        missing,
    )


def oracle_command(tmp_path, *extra):
    params = tmp_path / "params.pkl"
    params.touch()  # never read: each error comes before the oracle is loaded
    return ["oracle", "--oracle", str(params), "--mode", "ppo", "--out", str(tmp_path / "o")] + [
        *extra
    ]


def test_an_unfinished_warm_start_is_named_with_how_to_make_one(tmp_path, capsys):
    unfinished = tmp_path / "sft"
    unfinished.mkdir()
    (unfinished / "generator.safetensors").touch()
    for init, words in (
        (unfinished, ["holds no finished run", "metrics.json is missing"]),
        (tmp_path / "none", ["does not exist"]),
    ):
        one_line_error(
            capsys, oracle_command(tmp_path, "--init", str(init)), str(init), "--mode sft", *words
        )
    assert not (tmp_path / "o").exists()


def test_oracle_argument_errors_are_one_line(tmp_path, capsys):
    missing = str(tmp_path / "missing.pkl")
    command = ["oracle", "--oracle", missing, "--mode", "ppo", "--out", str(tmp_path / "o")]
    one_line_error(capsys, command, missing, "target_params_py3.pkl")
    one_line_error(
        capsys, oracle_command(tmp_path, "--set", "kl_coeff=0.1"), "'kl_coeff'", "'kl_coef'?"
    )
    one_line_error(capsys, oracle_command(tmp_path, "--set", "kl_coef"), "KEY=VALUE")
    one_line_error(
        capsys,
        oracle_command(tmp_path, "--discriminator", "cnn", "--d-fit-steps", "2"),
        "needs an lm discriminator",
    )


def test_the_installed_command_prints_one_line_and_exits_2(tmp_path):
    cfg = write(tmp_path / "cfg.yaml", "trainer:\n  kl_coeff: 0.1\n")
    command = [sys.executable, "-m", "rlgaf_fast.cli", "train", "--config", cfg]
    env = {k: v for k, v in os.environ.items() if k != "RLGAF_FAST_DEBUG"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"rlgaf-fast train: error: unknown trainer key 'kl_coeff' in {cfg}; did you mean 'kl_coef'?"
    ]


def test_debug_shows_the_traceback_and_bugs_are_not_hidden(tmp_path, monkeypatch):
    cfg = write(tmp_path / "cfg.yaml", "trainer:\n  kl_coeff: 0.1\n")
    monkeypatch.setenv("RLGAF_FAST_DEBUG", "1")
    with pytest.raises(ValueError, match="did you mean 'kl_coef'"):
        main(["train", "--config", cfg])
    monkeypatch.delenv("RLGAF_FAST_DEBUG")
    import rlgaf_fast.cli as cli

    def bug(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "build_from_config", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["train", "--preset", "tiny"])
