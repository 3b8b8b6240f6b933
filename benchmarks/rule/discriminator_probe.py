"""How well a discriminator learns the rule from demonstrations against warm-start samples.

    python benchmarks/rule/discriminator_probe.py benchmarks/rule/sft transformer --steps 4000

Trains one discriminator of run_oracle's kinds as its pretraining does (minibatches of 64
demonstrations against 64 of 10,000 warm-start samples, AdamW at 1e-3, weight decay 0.01,
gradient norm clipped at 1) and prints a JSON line at steps 0, 150, 300, 600, 1200, 2000, 3000,
4000, ...: on 2,000 fresh warm-start samples, the rank correlation of its logit with validity
(``spearman``), the fraction of (valid, invalid) pairs it orders correctly (``auc``), and the
fraction of 2,000 held-out demonstrations it calls real (``real_acc``) and of the valid and the
invalid samples it calls fake (``valid_fake_acc``, ``invalid_fake_acc``). A discriminator that
sees the rule calls the invalid samples fake more often than the valid ones.

Variants: ``--layers``/``--width`` size the transformer, ``--fresh`` draws 64 new warm-start
samples each step instead of the fixed pool, and ``--corrupt`` makes half the fakes
demonstrations with one token replaced at random (negative data augmentation).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from rlgaf_fast.bench.oracle import (
    load_warm_start,
    oracle_batch,
    oracle_data,
    sample_generator,
    spearman,
)
from rlgaf_fast.bench.rule_task import RULE_PRESETS, RuleTask
from rlgaf_fast.rlgaf.data import torch_generator
from rlgaf_fast.rlgaf.discriminator import (
    LMDiscriminator,
    RecurrentDiscriminator,
    build_transformer_discriminator,
    discriminator_logit,
    discriminator_loss,
    token_sequences,
)

KINDS = ("transformer", "lstm", "gru", "lm", "lm-context")
MARKS = (150, 300, 600, 1200, 2000, 3000, 4000, 6000, 8000)


def build(kind: str, task: RuleTask, warm_start: nn.Module, layers: int, width: int) -> nn.Module:
    if kind == "transformer":
        return build_transformer_discriminator(
            task.vocab_size, hidden_size=width, num_layers=layers, max_positions=task.seq_len + 1
        )
    if kind in ("lstm", "gru"):
        return RecurrentDiscriminator(task.vocab_size, cell=kind)
    return LMDiscriminator(copy.deepcopy(warm_start), context_features=kind == "lm-context")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("init", type=Path, help="the warm start (an sft run's directory)")
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--fresh", action="store_true", help="fresh warm-start samples each step, not the pool"
    )
    parser.add_argument(
        "--corrupt",
        action="store_true",
        help="half the fakes: demonstrations with one token replaced at random",
    )
    parser.add_argument("--layers", type=int, default=2, help="transformer layers")
    parser.add_argument("--width", type=int, default=64, help="transformer hidden size")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task, preset = RuleTask(), RULE_PRESETS["full"]
    warm_start, warm = load_warm_start(args.init, preset, task)
    demos, test = oracle_data(task, warm["data_seed"], preset.num_demos, preset.num_test)
    negatives = sample_generator(warm_start, 10_000, seed=7000, seq_len=task.seq_len)
    fresh = sample_generator(warm_start, 2000, seed=9100, seq_len=task.seq_len)
    valid = task.validity(fresh)
    torch.manual_seed(0)
    d = build(args.kind, task, warm_start, args.layers, args.width)
    opt = torch.optim.AdamW(
        [q for q in d.parameters() if q.requires_grad], lr=1e-3, weight_decay=0.01
    )

    def logit_of(tokens: Tensor) -> Tensor:
        ids, mask = token_sequences(oracle_batch(tokens))
        return discriminator_logit(d, d.get_input_embeddings()(ids), mask)

    def report(step: int) -> None:
        d.eval()
        with torch.no_grad():
            logit = torch.cat([logit_of(c) for c in fresh.split(500)])
            real = torch.cat([logit_of(c) for c in test[:2000].split(500)])
        d.train()
        on_valid, on_invalid = logit[valid], logit[~valid]
        row = {
            "kind": args.kind,
            "layers": args.layers,
            "width": args.width,
            "fresh": args.fresh,
            "corrupt": args.corrupt,
            "step": step,
            "spearman": round(spearman(logit, valid.float()), 3),
            "auc": round((on_valid[:, None] > on_invalid[None, :]).float().mean().item(), 3),
            "real_acc": round((real > 0).float().mean().item(), 3),
            "valid_fake_acc": round((on_valid < 0).float().mean().item(), 3),
            "invalid_fake_acc": round((on_invalid < 0).float().mean().item(), 3),
            "time_s": round(time.perf_counter() - started, 1),
        }
        print(json.dumps(row), flush=True)

    draw = torch_generator(8000)
    started = time.perf_counter()
    report(0)
    for step in range(1, args.steps + 1):
        real = demos[torch.randint(len(demos), (64,), generator=draw)]
        if args.fresh:
            fake = sample_generator(warm_start, 64, seed=20_000 + step, seq_len=task.seq_len)
        else:
            fake = negatives[torch.randint(len(negatives), (64,), generator=draw)]
        if args.corrupt:
            # Negative data augmentation: half the fakes are demonstrations with one token
            # replaced by a uniformly drawn one, fakes that differ from real data in one place.
            corrupt = demos[torch.randint(len(demos), (32,), generator=draw)].clone()
            where = torch.randint(task.seq_len, (32,), generator=draw)
            corrupt[torch.arange(32), where] = torch.randint(
                1, task.vocab_size, (32,), generator=draw
            )
            fake = torch.cat([fake[:32], corrupt])
        logit = logit_of(torch.cat([real, fake]))
        loss = discriminator_loss(logit[:64], logit[64:], "bce")
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(d.parameters(), 1.0)
        opt.step()
        if step in MARKS or step == args.steps:
            report(step)


if __name__ == "__main__":
    main()
