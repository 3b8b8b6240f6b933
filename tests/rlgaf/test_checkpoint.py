"""Checkpoints (checkpoint.py): a resumed run continues exactly, in safe file formats."""

import pytest
import torch

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
