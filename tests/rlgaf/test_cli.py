import json

import yaml

from rlgaf_fast.cli import SUBCOMMANDS, main


def test_subcommands_registered():
    assert {"train", "oracle"} <= set(SUBCOMMANDS)


def test_train_tiny_preset_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--steps", "3", "--out", str(out),
                 "--threads", "1"]) == 0
    lines = (out / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    assert (out / "final" / "generator.safetensors").exists()
    assert main(["train", "--preset", "tiny", "--steps", "5", "--out", str(out),
                 "--resume", str(out / "final")]) == 0
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def test_train_from_yaml_with_jsonl_data(tmp_path):
    data = tmp_path / "demos.jsonl"
    rows = [{"prompt_ids": [2 + i % 5], "response_ids": [3, 4, 5, 1]} for i in range(20)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    model = {"model_type": "gpt2", "vocab_size": 16, "n_embd": 16, "n_layer": 1, "n_head": 2,
             "n_positions": 32}
    config = {"generator": {"config": model}, "discriminator": {"config": model},
              "data": {"demonstrations": str(data)}, "pad_token_id": 0, "eos_token_id": 1,
              "trainer": {"mode": "gumbel", "total_steps": 2, "batch_size": 4,
                          "minibatch_size": 2, "max_new_tokens": 5, "straight_through": True}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "out")]) == 0
    logs = [json.loads(x) for x in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert len(logs) == 2 and "d_acc_real" in logs[-1]
