"""Control for "a discriminator that knows more than the warm start": MLE on the same
demonstrations with the oracle's own architecture (an LSTM, embedding and hidden size 32, as
SeqGAN's generator), evaluated after every epoch count in ``--evaluate`` and at the epoch with
the best NLL on 1,000 held-out demonstrations (it trains on the other 9,000).

If a model of the oracle's shape fitted the demonstrations better than the warm start does, an
LMDiscriminator on it would know more than the warm start; SeqGAN's MLE figure (9.038) also
came from such an LSTM.

    python benchmarks/oracle/lstm_control.py \
        --oracle seqgan --init runs/oracle/sft \
        --out benchmarks/oracle/seeds/lstm-control.json
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rlgaf_fast.bench.oracle import (
    HIDDEN,
    SEQ_LEN,
    START_TOKEN,
    VOCAB_SIZE,
    OracleLSTM,
    copied_fraction,
    load_warm_start,
    oracle_data,
)
from rlgaf_fast.bench.seqgan_data import seqgan_oracle_path


class LSTMLanguageModel(nn.Module):
    """SeqGAN's generator: embedding, one LSTM layer, a linear output over the vocabulary."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB_SIZE, HIDDEN)
        self.lstm = nn.LSTM(HIDDEN, HIDDEN, batch_first=True)
        self.out = nn.Linear(HIDDEN, VOCAB_SIZE)

    def forward(self, ids: Tensor, state=None):
        hidden, state = self.lstm(self.embedding(ids), state)
        return self.out(hidden), state

    def loss(self, tokens: Tensor) -> Tensor:
        """Mean NLL per token of sequences ``[N, 20]`` after the start token."""
        inputs = torch.cat([torch.full_like(tokens[:, :1], START_TOKEN), tokens[:, :-1]], 1)
        return F.cross_entropy(self(inputs)[0].flatten(0, 1), tokens.flatten())

    @torch.no_grad()
    def nll(self, tokens: Tensor) -> float:
        # in chunks: all 10,000 test sequences at once would make about 4 GB of logits
        return sum(self.loss(c).item() * c.numel() for c in tokens.split(500)) / tokens.numel()

    @torch.no_grad()
    def sample(self, num: int, seed: int) -> Tensor:
        generator = torch.Generator().manual_seed(seed)
        token, state, out = torch.full((num, 1), START_TOKEN), None, []
        for _ in range(SEQ_LEN):
            logits, state = self(token, state)
            token = torch.multinomial(torch.softmax(logits[:, -1], -1), 1, generator=generator)
            out.append(token)
        return torch.cat(out, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--oracle", required=True, help="seqgan, or target_params_py3.pkl")
    parser.add_argument("--init", required=True, help="the sft run's directory (its data seed)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--evaluate", type=int, nargs="*", default=[5, 10, 20, 40])
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    oracle = OracleLSTM.from_file(seqgan_oracle_path(args.oracle))
    _, warm = load_warm_start(args.init)
    demos, test = oracle_data(oracle, warm["data_seed"])
    train, held_out = demos[:9000], demos[9000:]
    model = LSTMLanguageModel()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    shuffle = torch.Generator().manual_seed(0)

    def evaluate(epoch: int) -> dict:
        samples = model.sample(10_000, seed=5000)
        return {
            "epoch": epoch,
            "held_out_demo_nll": model.nll(held_out),
            "nll_oracle": oracle.nll(samples),
            "nll_test": model.nll(test),
            "copied": copied_fraction(samples, demos),
        }

    evaluations, best, start = [], None, time.time()
    for epoch in range(1, args.epochs + 1):
        for index in torch.randperm(len(train), generator=shuffle).split(args.batch):
            loss = model.loss(train[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        held = model.nll(held_out)
        if best is None or held < best[0]:
            best = (held, epoch, {k: v.clone() for k, v in model.state_dict().items()})
        if epoch in args.evaluate:
            evaluations.append(evaluate(epoch))
        print(
            f"epoch {epoch}: held-out demonstrations {held:.3f} ({time.time() - start:.0f} s)",
            flush=True,
        )
    model.load_state_dict(best[2])
    result = {
        "warm_start": warm["final"],
        "early_stopped": evaluate(best[1]),
        "epochs": evaluations,
        "lr": args.lr,
        "batch": args.batch,
        "train_demos": len(train),
        "held_out_demos": len(held_out),
    }
    print(json.dumps(result, indent=1))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
