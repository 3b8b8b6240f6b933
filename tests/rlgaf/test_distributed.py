"""Two CPU processes under `accelerate launch` train and stay in sync: with DDP over gloo, and
with FSDP2 sharding the models, which must train exactly as DDP does."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("distributed_worker.py")
# "gumbel-lm": a generator with tied embeddings against an LMDiscriminator with bigram counts
# (whose embedding matrix is computed from the LM's).
MODES = ("ppo", "reinforce", "gumbel", "grpo", "sft", "gumbel-lm")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    out_dir: Path, sharding: str, processes: int = 2, modes: tuple[str, ...] = MODES
) -> dict[str, list[dict]]:
    out_dir.mkdir()
    # A port of its own for each launch: the previous one's may not be free yet.
    if processes > 1:
        launcher = [
            "accelerate",
            "launch",
            "--multi_gpu",
            "--num_processes",
            str(processes),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(free_port()),
        ]
    else:  # accelerate launch refuses --multi_gpu for one process; torchrun's is distributed
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "1",
            "--master_port",
            str(free_port()),
        ]
    command = [*launcher, str(WORKER), str(out_dir), ",".join(modes), sharding]
    repo = str(Path(__file__).parents[2])
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
        "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return {
        mode: [json.loads((out_dir / f"{mode}-rank{r}.json").read_text()) for r in range(processes)]
        for mode in modes
    }


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate CLI not installed")
def test_two_processes_train_and_stay_in_sync(tmp_path):
    ddp = launch(tmp_path / "ddp", "ddp")
    fsdp = launch(tmp_path / "fsdp", "fsdp")
    for mode in MODES:
        for ranks, sharding in ((ddp[mode], "MULTI_CPU"), (fsdp[mode], "FSDP")):
            assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["world"] == 2
            assert ranks[0]["distributed_type"] == f"DistributedType.{sharding}"
            # Trained: the weights moved, every logged value is finite.
            assert ranks[0]["generator"][: len(ranks[0]["initial"])] != ranks[0]["initial"]
            assert all(len(r["history"]) == 3 for r in ranks)
            # In sync: identical generator, value head and discriminator weights on both
            # ranks...
            for part in ("generator", "discriminator", "ema"):
                assert ranks[0][part] == ranks[1][part], (mode, sharding, part)
            # ...while each rank generated its own rollouts.
            assert ranks[0]["rollout"] != ranks[1]["rollout"], (mode, sharding)
        assert ddp[mode][0]["param_types"] == ["Parameter"]
        assert fsdp[mode][0]["param_types"] == ["DTensor"]  # each rank holds shards
        # FSDP2 trains as DDP does: the same rollouts, weights equal up to rounding.
        assert fsdp[mode][0]["rollout"] == ddp[mode][0]["rollout"], mode
        for part in ("generator", "discriminator", "ema"):
            assert fsdp[mode][0][part] == pytest.approx(ddp[mode][0][part], rel=1e-5, abs=1e-6), (
                mode,
                part,
            )
        # An FSDP checkpoint loads back into a fresh trainer, which continues identically.
        resumed = fsdp[mode][0]["resumed"]
        for part in ("generator", "discriminator", "ema"):
            assert resumed[part] == fsdp[mode][0][part], (mode, part)
        first, second = fsdp[mode][0]["next_step"]
        assert first == second, mode
        assert first[1] != fsdp[mode][0]["generator"], mode  # the step did update the weights


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate CLI not installed")
def test_one_process_ddp_trains_the_gumbel_mode(tmp_path):
    """A launch of one CPU process is DDP-wrapped all the same (accelerate's MULTI_CPU), and DDP
    needs every discriminator parameter to get a gradient: the Gumbel generator step must not
    detach the discriminator's embedding there, as it does in a plain single process."""
    (result,) = launch(tmp_path / "one", "ddp", processes=1, modes=("gumbel",))["gumbel"]
    assert result["world"] == 1 and result["distributed_type"].endswith("MULTI_CPU")
    assert len(result["history"]) == 3
    assert result["generator"] != result["initial"]  # the steps did update the weights
