import json
import math
import os
import pickle

import numpy as np
import pytest
import torch

from rlgaf_fast.bench.oracle import (
    PARAM_SHAPES,
    OracleLSTM,
    OraclePreset,
    build_oracle_generator,
    copied_fraction,
    load_oracle_params,
    run_oracle,
    spearman,
)


class RunsACommand:
    """Unpickling this would call os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps([np.zeros(3, np.float32), RunsACommand(marker)]))
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load .*system"):
        load_oracle_params(path)
    assert not marker.exists()


def test_wrong_arrays_are_refused(tmp_path):
    path = tmp_path / "wrong.pkl"
    arrays = [np.zeros(shape, np.float32) for shape in PARAM_SHAPES]
    arrays[13] = np.zeros((32, 10), np.float32)
    path.write_bytes(pickle.dumps(arrays))
    with pytest.raises(ValueError, match="array 13"):
        load_oracle_params(path)
    arrays = [np.zeros(shape, np.float64) for shape in PARAM_SHAPES]
    path.write_bytes(pickle.dumps(arrays))
    with pytest.raises(ValueError, match="float32"):
        load_oracle_params(path)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_arrays_load_whatever_the_pickle_protocol(tmp_path, protocol):
    path = tmp_path / "params.pkl"
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(shape).astype(np.float32) for shape in PARAM_SHAPES]
    path.write_bytes(pickle.dumps(arrays, protocol=protocol))
    for loaded, array in zip(load_oracle_params(path), arrays, strict=True):
        np.testing.assert_array_equal(loaded, array)


def numpy_oracle_log_likelihood(params, tokens):
    """README's equations, literally, in numpy float64."""
    emb, wi, ui, bi, wf, uf, bf, wo, uo, bo, wc, uc, bc, w_out, b_out = [
        p.astype(np.float64) for p in params
    ]

    def sigmoid(z):
        return 1 / (1 + np.exp(-z))

    out = np.zeros(tokens.shape)
    for b, seq in enumerate(tokens):
        h = c = np.zeros(32)
        x = emb[0]
        for t, token in enumerate(seq):
            i, f = sigmoid(x @ wi + h @ ui + bi), sigmoid(x @ wf + h @ uf + bf)
            o, cand = sigmoid(x @ wo + h @ uo + bo), np.tanh(x @ wc + h @ uc + bc)
            c = f * c + i * cand
            h = o * np.tanh(c)
            logits = h @ w_out + b_out
            out[b, t] = logits[token] - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
            x = emb[token]
    return out


def test_oracle_matches_its_readme(seqgan_oracle):
    params = load_oracle_params(seqgan_oracle)
    oracle = OracleLSTM(params)
    tokens = oracle.sample(3, seed=0)
    expected = numpy_oracle_log_likelihood(params, tokens.numpy())
    np.testing.assert_allclose(oracle.log_likelihood(tokens).numpy(), expected, atol=1e-4)
    # README: the oracle's own samples score 5.749, uniformly random tokens 11.43.
    assert oracle.nll(oracle.sample(1000, seed=1)) == pytest.approx(5.75, abs=0.1)
    random = torch.randint(0, 5000, (1000, 20), generator=torch.Generator().manual_seed(0))
    assert oracle.nll(random) == pytest.approx(11.43, abs=0.05)
    assert torch.equal(oracle.sample(5, seed=3), oracle.sample(5, seed=3))


MICRO = OraclePreset(
    num_demos=200,
    num_test=100,
    num_eval=100,
    num_final=300,
    num_sweep=100,
    gen_hidden=16,
    gen_layers=1,
    sft_steps=4,
    sft_batch=16,
    adv_steps=2,
    d_pretrain_steps=1,
    eval_every=1,
    d_fit_steps=0,
    trainer={"batch_size": 8, "minibatch_size": 4},
)


def test_run_oracle_writes_metrics_samples_and_plot(tmp_path, seqgan_oracle):
    sft = run_oracle(seqgan_oracle, "sft", tmp_path / "sft", preset=MICRO)
    assert [row["temperature"] for row in sft["temperature_sweep"]] == [0.8, 0.9, 1.0, 1.1, 1.2]
    ppo = run_oracle(seqgan_oracle, "ppo", tmp_path / "ppo", preset=MICRO, init=tmp_path / "sft")
    metrics = json.loads((tmp_path / "ppo" / "metrics.json").read_text())
    assert metrics["warm_start"] == sft["final"]
    # Another seed from the same warm start keeps the demonstrations it was trained on.
    other = run_oracle(
        seqgan_oracle, "ppo", tmp_path / "ppo1", preset=MICRO, init=tmp_path / "sft", seed=1
    )
    assert (other["seed"], other["data_seed"]) == (1, 0)
    assert other["oracle_samples_nll_oracle"] == metrics["oracle_samples_nll_oracle"]
    assert {"nll_oracle", "nll_test", "distinct", "copied"} <= set(metrics["final"])
    assert 0 <= metrics["final"]["copied"] <= 1
    assert [h["step"] for h in metrics["history"]] == [0, 1, 2]
    assert all(-1 <= h["d_oracle_spearman"] <= 1 for h in metrics["history"])
    assert metrics["history"] == ppo["history"]
    lines = (tmp_path / "ppo" / "samples.txt").read_text().splitlines()
    assert len(lines) == 300
    rows = np.array([[int(t) for t in line.split(" ")] for line in lines])
    assert rows.shape == (300, 20) and rows.min() >= 0 and rows.max() < 5000
    assert (tmp_path / "ppo" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    # A uniformly random generator scores about 11.4; a few SFT steps cannot go far below.
    assert 5.0 < metrics["final"]["nll_oracle"] < 12.0


@pytest.mark.skipif(not os.environ.get("RLGAF_SLOW_TESTS"), reason="set RLGAF_SLOW_TESTS=1")
def test_smoke_preset_through_the_cli(tmp_path, seqgan_oracle):
    from rlgaf_fast.cli import main

    assert (
        main(
            [
                "oracle",
                "--oracle",
                "seqgan",  # the file the fixture found: RLGAF_SEQGAN_ORACLE or the cache
                "--mode",
                "ppo",
                "--out",
                str(tmp_path),
                "--preset",
                "smoke",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "metrics.json").read_text())["final"]["nll_oracle"] < 11.0


@pytest.mark.parametrize("discriminator", ["cnn", "lm-context", "lm-tuned", "lm-bigram"])
def test_run_oracle_with_each_discriminator(tmp_path, discriminator, seqgan_oracle):
    import dataclasses

    preset = dataclasses.replace(MICRO, discriminator=discriminator)
    metrics = run_oracle(seqgan_oracle, "gumbel", tmp_path, preset=preset)
    assert metrics["preset"]["discriminator"] == discriminator
    adversarial = [h for h in metrics["history"] if h["phase"] == "gumbel"]
    assert len(metrics["history"]) == 4 + 3  # sft steps 1..4, then gumbel steps 0, 1, 2
    assert [h["step"] for h in adversarial] == [0, 1, 2]
    assert all(-1 <= h["d_oracle_spearman"] <= 1 for h in adversarial)
    # The discriminator built is the one asked for: the MLP head alone (width 32, inputs 2,
    # 2 + 32 or 3), the LM copy too, or the CNN.
    generator_params = sum(t.numel() for t in build_oracle_generator(MICRO).parameters())
    head = {
        "lm-context": (2 + MICRO.gen_hidden) * 32 + 32 + 33,
        "lm-tuned": 2 * 32 + 32 + 33,
        "lm-bigram": 3 * 32 + 32 + 33,
    }
    trainable = metrics["discriminator_trainable_params"]
    if discriminator == "cnn":
        assert trainable > 10**5
    else:
        assert trainable == head[discriminator] + (discriminator == "lm-tuned") * generator_params
    logs = [
        json.loads(line) for line in (tmp_path / "gumbel" / "log.jsonl").read_text().splitlines()
    ]
    assert [row["step"] for row in logs if "d_loss" in row] == [1, 2]
    assert all(
        math.isfinite(row["d_loss"]) and 0 <= row["d_acc_real"] <= 1
        for row in logs
        if "d_loss" in row
    )
    with pytest.raises(ValueError, match="discriminator must be one of lm, lm-context, lm-tuned"):
        run_oracle(
            seqgan_oracle,
            "ppo",
            tmp_path / "bad",
            init=tmp_path,
            preset=dataclasses.replace(MICRO, discriminator="mlp"),
        )


def test_d_fit_steps_fits_the_discriminators_features_further(tmp_path, seqgan_oracle):
    import dataclasses

    metrics = run_oracle(
        seqgan_oracle, "ppo", tmp_path, preset=dataclasses.replace(MICRO, d_fit_steps=3)
    )
    fit_log = [
        json.loads(line) for line in (tmp_path / "d_fit" / "log.jsonl").read_text().splitlines()
    ]
    assert [row["step"] for row in fit_log] == [1, 2, 3]
    warm_nll, fit_nll = metrics["d_fit_nll_demos"]
    assert fit_nll < warm_nll  # three MLE steps at 1e-3 on 200 sequences raise their likelihood
    # tmp_path holds that run's generator, a warm start like any other
    assert "d_fit_nll_demos" not in run_oracle(
        seqgan_oracle, "ppo", tmp_path / "none", preset=MICRO, init=tmp_path
    )


@pytest.mark.parametrize("mode", ["ppo", "gumbel", "reinforce"])
def test_discriminator_settings_are_checked_before_anything_trains(mode, tmp_path, capsys):
    import dataclasses

    from rlgaf_fast.cli import main

    cases = (
        (dict(d_fit_steps=-1), "d_fit_steps must be >= 0"),
        (dict(d_fit_steps=2, discriminator="cnn"), "needs an lm discriminator"),
        (dict(d_fit_steps=2, discriminator="mlp"), "discriminator must be one of lm, "),
    )
    for bad, match in cases:
        # a missing oracle file: the check must come first
        with pytest.raises(ValueError, match=match):
            run_oracle(
                tmp_path / "missing.pkl",
                mode,
                tmp_path / "bad",
                preset=dataclasses.replace(MICRO, **bad),
            )
    for extra, match in (
        (["--d-fit-steps", "-1"], "d_fit_steps must be >= 0"),
        (["--discriminator", "cnn", "--d-fit-steps", "5"], "needs an lm"),
    ):
        command = ["oracle", "--oracle", str(tmp_path / "missing.pkl"), "--mode", mode]
        assert main([*command, "--out", str(tmp_path / "bad"), *extra]) == 2
        assert match in capsys.readouterr().err


def test_oracle_cli_sets_d_fit_steps_and_zero_for_the_cnn(tmp_path, monkeypatch):
    import rlgaf_fast.bench.oracle as oracle_module
    from rlgaf_fast.cli import main

    presets = []

    def record(*args, preset, **kwargs):
        presets.append(preset)
        return {"time_s": 0.0, "final": {}}

    monkeypatch.setattr(oracle_module, "run_oracle", record)
    command = [
        "oracle",
        "--oracle",
        str(tmp_path / "params.pkl"),  # run_oracle, which would read it, is replaced
        "--mode",
        "ppo",
        "--out",
        str(tmp_path),
        "--preset",
        "full",
    ]
    for extra in (
        [],
        ["--d-fit-steps", "7"],
        ["--discriminator", "cnn"],
        ["--discriminator", "lm-bigram"],
    ):
        assert main(command + extra) == 0
    assert [(p.discriminator, p.d_fit_steps) for p in presets] == [
        ("lm", 500),
        ("lm", 7),
        ("cnn", 0),
        ("lm-bigram", 500),
    ]


def test_oracle_cli_refuses_a_malformed_override(tmp_path, capsys):
    from rlgaf_fast.cli import main

    command = ["oracle", "--oracle", str(tmp_path / "params.pkl"), "--mode", "ppo"]
    assert main([*command, "--out", str(tmp_path), "--set", "kl_coef"]) == 2
    assert "--set expects KEY=VALUE, got 'kl_coef'" in capsys.readouterr().err


def test_copied_fraction_counts_verbatim_demonstrations():
    demos = torch.tensor([[1, 2, 3], [4, 5, 6]])
    samples = torch.tensor([[1, 2, 3], [1, 2, 4], [4, 5, 6], [6, 5, 4]])
    assert copied_fraction(samples, demos) == 0.5
    assert copied_fraction(samples[1:2], demos) == 0.0


def test_spearman_matches_scipy():
    from scipy.stats import spearmanr

    a, b = torch.randn(200), torch.randn(200)
    b = a + b  # correlated
    assert spearman(a, b) == pytest.approx(spearmanr(a.numpy(), b.numpy()).statistic, abs=1e-9)
    assert spearman(a, -a) == pytest.approx(-1.0)


def test_overrides_set_any_field_and_are_checked_before_the_warm_start(
    tmp_path, monkeypatch, seqgan_oracle
):
    from rlgaf_fast.rlgaf.trainer import RLGAFTrainer

    metrics = run_oracle(
        seqgan_oracle,
        "ppo",
        tmp_path / "ppo",
        preset=MICRO,
        overrides={"total_steps": 1, "kl_coef": 0.03},
    )
    assert (metrics["config"]["total_steps"], metrics["config"]["kl_coef"]) == (1, 0.03)
    assert [h["step"] for h in metrics["history"] if h["phase"] == "ppo"] == [0, 1]

    def no_training(self, *args, **kwargs):
        raise AssertionError("trained before checking the overrides")

    monkeypatch.setattr(RLGAFTrainer, "train", no_training)
    with pytest.raises(
        ValueError, match="unknown RLGAFConfig key 'kl_coeff'; did you mean 'kl_coef'"
    ):
        run_oracle(
            seqgan_oracle, "ppo", tmp_path / "bad", preset=MICRO, overrides={"kl_coeff": 0.1}
        )
    with pytest.raises(ValueError, match="may not set mode"):
        run_oracle(seqgan_oracle, "ppo", tmp_path / "bad", preset=MICRO, overrides={"mode": "sft"})
