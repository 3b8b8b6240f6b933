"""Two CPU processes under `accelerate launch` (DDP over gloo) train and stay in sync."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("ddp_worker.py")
MODES = ("ppo", "gumbel")


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate CLI not installed")
def test_two_processes_train_and_stay_in_sync(tmp_path):
    command = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(WORKER), str(tmp_path), ",".join(MODES)]
    repo = str(Path(__file__).parents[2])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
           "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    for mode in MODES:
        ranks = [json.loads((tmp_path / f"{mode}-rank{r}.json").read_text()) for r in (0, 1)]
        assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["world"] == 2
        assert ranks[0]["distributed_type"] == "DistributedType.MULTI_CPU"
        # Trained: the weights moved, every logged value is finite.
        assert ranks[0]["generator"][: len(ranks[0]["initial"])] != ranks[0]["initial"]
        assert all(len(r["history"]) == 3 for r in ranks)
        # In sync: identical generator, value head and discriminator weights on both ranks...
        assert ranks[0]["generator"] == ranks[1]["generator"], mode
        assert ranks[0]["discriminator"] == ranks[1]["discriminator"], mode
        # ...while each rank generated its own rollouts.
        assert ranks[0]["rollout"] != ranks[1]["rollout"], mode
