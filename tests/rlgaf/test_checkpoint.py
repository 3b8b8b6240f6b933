"""Checkpoints (checkpoint.py): a resumed run continues exactly, in safe file formats."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlgaf_fast.rlgaf import checkpoint
from rlgaf_fast.rlgaf.discriminator import CNNDiscriminator

from .conftest import VOCAB, make_trainer


def params(module):
    return [p.detach().clone() for p in module.parameters()]


@pytest.mark.parametrize("mode", ["ppo", "reinforce", "gumbel"])
def test_resume_continues_exactly(mode, demos, tmp_path):
    extra = {"baseline_decay": 0.9} if mode == "reinforce" else {}

    # Gumbel mode trains a CNN discriminator with dropout: torch's random state must resume too.
    def discriminator():
        return (
            CNNDiscriminator(VOCAB, embed_dim=16, filters=((2, 8), (3, 8)))
            if mode == "gumbel"
            else None
        )

    full = make_trainer(
        mode,
        demos,
        total_steps=4,
        save_every=2,
        output_dir=str(tmp_path),
        tensorboard=False,
        lr_schedule="linear",
        discriminator=discriminator(),
        **extra,
    )
    full_history = full.train()
    full.close()

    resumed = make_trainer(
        mode,
        demos,
        total_steps=4,
        seed=0,
        **extra,
        lr_schedule="linear",
        discriminator=discriminator(),
    )
    torch.manual_seed(123)  # a random state unlike the checkpoint's
    # Different random weights first, so that loading must restore all of them.
    for p in resumed.unwrapped_policy.parameters():
        torch.nn.init.normal_(p.data)
    resumed.load_checkpoint(tmp_path / "checkpoint-2")
    assert resumed.step_count == 2
    resumed_history = resumed.train()
    assert resumed_history == [
        {k: v for k, v in h.items() if k != "tokens_per_s"} | {"tokens_per_s": r["tokens_per_s"]}
        for h, r in zip(full_history[2:], resumed_history, strict=True)
    ]
    for a, b in zip(params(full.unwrapped_policy), params(resumed.unwrapped_policy), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(
        params(full.unwrapped_discriminator), params(resumed.unwrapped_discriminator), strict=True
    ):
        assert torch.equal(a, b)
    steps = [t.g_opt.state_dict()["state"][0]["step"] for t in (full, resumed)]
    assert steps[0] == steps[1]


def test_resume_warns_about_a_changed_config_or_missing_random_state(demos, tmp_path):
    make_trainer("ppo", demos).save_checkpoint(tmp_path / "ckpt")
    with pytest.warns(UserWarning, match=r"kl_coef \(0.05 -> 0.02\)"):
        make_trainer("ppo", demos, kl_coef=0.02).load_checkpoint(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "rng-0.pt").unlink()
    with pytest.warns(UserWarning, match="rng-0.pt is missing"):
        make_trainer("ppo", demos).load_checkpoint(tmp_path / "ckpt")


def test_a_crafted_optimizer_file_cannot_run_code(demos, tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').close()",))

    path = make_trainer("ppo", demos).save_checkpoint(tmp_path / "ckpt")
    torch.save({"g_opt": Exploit()}, path / "optimizer.pt", pickle_module=pickle)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        make_trainer("ppo", demos).load_checkpoint(path)
    assert not marker.exists()


def test_checkpoint_files_are_safe_formats(demos, tmp_path):
    trainer = make_trainer("ppo", demos)
    path = trainer.save_checkpoint(tmp_path / "ckpt")
    names = sorted(p.name for p in path.iterdir())
    assert names == [
        "discriminator.safetensors",
        "generator.safetensors",
        "optimizer.pt",
        "rng-0.pt",
        "trainer_state.json",
    ]
    torch.load(path / "optimizer.pt", weights_only=True)  # tensors and plain values only


# --- crash safety --------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]


def _worker(out_dir: Path, steps: int, kill_at: int | None = None) -> subprocess.Popen:
    args = [sys.executable, "-m", "tests.rlgaf.crash_worker", str(out_dir), str(steps)]
    if kill_at is not None:
        args.append(str(kill_at))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {
        f"{name}/{key}": value
        for name in ("generator", "discriminator")
        for key, value in load_file(str(path / f"{name}.safetensors")).items()
    }


def _logged_steps(out_dir: Path) -> int:
    log = out_dir / "log.jsonl"
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_a_failed_save_leaves_no_checkpoint_and_keeps_the_previous(demos, tmp_path, monkeypatch):
    trainer = make_trainer("ppo", demos, output_dir=str(tmp_path), tensorboard=False)
    trainer.save_checkpoint(tmp_path / "checkpoint-0")

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint, "_write_checkpoint", disk_full)
    trainer.step_count = 1
    with pytest.raises(OSError, match="No space"):
        trainer.save_checkpoint(tmp_path / "checkpoint-1")
    assert not (tmp_path / "checkpoint-1").exists()
    assert checkpoint.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-0"


def test_latest_checkpoint_and_save_total_limit(demos, tmp_path):
    trainer = make_trainer(
        "ppo",
        demos,
        total_steps=4,
        output_dir=str(tmp_path),
        save_every=1,
        save_total_limit=2,
        tensorboard=False,
    )
    trainer.train()
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint-"))
    assert names == ["checkpoint-3", "checkpoint-4"]
    (tmp_path / ".checkpoint-5.partial").mkdir()  # a save that was cut short
    (tmp_path / "checkpoint-9").mkdir()  # not a checkpoint: no trainer_state.json
    assert checkpoint.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    resumed = make_trainer("ppo", demos, output_dir=str(tmp_path), resume_from="latest")
    assert resumed.step_count == 4
    fresh = make_trainer("ppo", demos, output_dir=str(tmp_path / "new"), resume_from="latest")
    assert fresh.step_count == 0
    with pytest.raises(FileNotFoundError, match="checkpoint-9 holds no trainer_state.json"):
        make_trainer("ppo", demos, resume_from=str(tmp_path / "checkpoint-9"))


def test_sigkill_at_random_points_then_resume_gives_identical_weights(tmp_path):
    steps = 8
    clean = _worker(tmp_path / "clean", steps)
    assert clean.wait(timeout=600) == 0, clean.stderr.read()
    expected = _weights(checkpoint.latest_checkpoint(tmp_path / "clean"))

    out = tmp_path / "killed"
    # One kill in the middle of a save, then kills at random moments of the training.
    died = _worker(out, steps, kill_at=3)
    assert died.wait(timeout=600) == -signal.SIGKILL
    assert (out / ".checkpoint-3.partial").exists() and not (out / "checkpoint-3").exists()
    assert checkpoint.checkpoint_step(checkpoint.latest_checkpoint(out)) == 2
    rng = random.Random(0)
    for _ in range(3):
        proc = _worker(out, steps)
        deadline = time.monotonic() + 300
        start = _logged_steps(out)
        while _logged_steps(out) <= start and proc.poll() is None:
            assert time.monotonic() < deadline, "the worker made no progress"
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.0))
        proc.kill()
        proc.wait(timeout=60)
    final = _worker(out, steps)
    assert final.wait(timeout=600) == 0, final.stderr.read()
    latest = checkpoint.latest_checkpoint(out)
    assert checkpoint.checkpoint_step(latest) == steps
    got = _weights(latest)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def test_sigterm_finishes_the_step_saves_and_exits_0(tmp_path):
    proc = _worker(tmp_path, 10_000)
    deadline = time.monotonic() + 300
    while _logged_steps(tmp_path) < 2:
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the worker made no progress"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "SIGTERM received" in err
    logged = _logged_steps(tmp_path)
    assert f"done at step {logged}, stopped by SIGTERM" in out
    assert checkpoint.checkpoint_step(checkpoint.latest_checkpoint(tmp_path)) == logged < 10_000
