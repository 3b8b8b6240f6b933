"""Run by test_checkpoint.py in a subprocess that the test kills: trains the tiny PPO trainer of
conftest.py with a checkpoint every step, resuming from the newest complete one.

    python crash_worker.py OUT_DIR TOTAL_STEPS [KILL_IN_SAVE_AT_STEP]

With KILL_IN_SAVE_AT_STEP the process SIGKILLs itself in the middle of that step's save, after
the generator's weights are written and before the rest."""

import os
import signal
import sys

import torch

from rlgaf_fast.rlgaf import checkpoint
from rlgaf_fast.rlgaf.data import synthetic_examples
from tests.rlgaf.conftest import EOS, PAD, VOCAB, make_trainer


def main(out_dir: str, total_steps: int, kill_at: int | None = None) -> None:
    torch.set_num_threads(1)
    demos = synthetic_examples(64, VOCAB, seed=0, eos_token_id=EOS, pad_token_id=PAD)
    if kill_at is not None:
        save_weights = checkpoint._save_weights

        def save_then_die(trainer, module, unwrapped, file):
            save_weights(trainer, module, unwrapped, file)
            if trainer.step_count == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

        checkpoint._save_weights = save_then_die
    trainer = make_trainer(
        "ppo",
        demos,
        total_steps=total_steps,
        output_dir=out_dir,
        save_every=1,
        save_total_limit=2,
        resume_from="latest",
        tensorboard=False,
    )
    trainer.train()
    print(f"done at step {trainer.step_count}, stopped by {trainer.stopped_by}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else None)
