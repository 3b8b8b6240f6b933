"""The rule task: demonstrations from a known generator whose every sample obeys a global rule.

The generator writes sequences of ``seq_len`` tokens from a stochastic bracket language: at each
step it opens a bracket of one of ``num_types`` types, closes the innermost open bracket with
its matching type, or emits a filler token from a small Markov chain over ``num_fillers``
fillers. Steps that could no longer be balanced in the steps left are not allowed, so every
sample is balanced at the fixed length. The rule, balanced and type-matched brackets, ties each
closing bracket to its opening partner anywhere before it: a model must keep a stack.

Every balanced sequence has positive probability, every other sequence probability 0, and the
probability of a sequence is the product of the generator's step probabilities: exact, with no
normalising constant. Token 0 is the start token (the prompt) and never appears in a sequence.

``run_oracle(RuleTask(), mode, out_dir, preset="full")`` trains and scores a mode on it, with
the same code as the SeqGAN oracle (``rlgaf_fast.bench.oracle``).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from torch import Tensor

from rlgaf_fast.bench.oracle import PRESETS
from rlgaf_fast.rlgaf.data import torch_generator
from rlgaf_fast.rlgaf.rollout import sample_categorical

SWEEP = (0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3)

# The generator of the full preset: a 2-layer width-32 Llama, 10,000 demonstrations and 1000 MLE
# steps of 64 as in the SeqGAN preset. The discriminator is a small transformer trained from
# scratch (the LM-feature discriminators read the warm start, which does not know the rule).
RULE_PRESETS = {
    name: dataclasses.replace(
        PRESETS[name],
        discriminator="transformer",
        d_fit_steps=0,
        sweep_temperatures=SWEEP,
        **changes,
    )
    for name, changes in {
        # CI: the whole pipeline at toy sizes.
        "smoke": dict(d_pretrain_steps=20),
        "full": dict(num_final=10_000, num_sweep=5000, d_pretrain_steps=600),
    }.items()
}


class RuleTask:
    """A stochastic bracket language with exact likelihood (see the module docstring).

    Token ids: 0 the start token, ``1 .. K`` opening brackets of types 0 .. K-1, ``K+1 .. 2K``
    the matching closing brackets, ``2K+1 .. 2K+F`` fillers (K = num_types, F = num_fillers).
    ``p_open``, ``p_close`` and ``p_filler`` weigh the three kinds of step (renormalised over
    those allowed); an opening bracket's type is uniform; a filler follows the last filler by a
    transition matrix drawn once from ``chain_seed`` (rows Dirichlet(1)).
    """

    name = "rule"
    presets = RULE_PRESETS

    def __init__(
        self,
        seq_len: int = 32,
        num_types: int = 8,
        num_fillers: int = 8,
        p_open: float = 0.4,
        p_close: float = 0.3,
        p_filler: float = 0.3,
        chain_seed: int = 0,
    ) -> None:
        if seq_len < 1 or num_types < 1 or num_fillers < 1:
            raise ValueError(
                "seq_len, num_types and num_fillers must be >= 1, got "
                f"{seq_len}, {num_types}, {num_fillers}"
            )
        if min(p_open, p_close, p_filler) <= 0:
            raise ValueError(
                f"p_open, p_close and p_filler must be > 0, got {p_open}, {p_close}, {p_filler}"
            )
        self.seq_len, self.num_types, self.num_fillers = seq_len, num_types, num_fillers
        self.vocab_size = 1 + 2 * num_types + num_fillers
        self.weights = torch.tensor([p_open, p_close, p_filler], dtype=torch.float64)
        rng = np.random.default_rng(chain_seed)
        # Row num_fillers: the first filler of a sequence.
        chain = rng.dirichlet(np.ones(num_fillers), size=num_fillers + 1)
        self.log_chain = torch.from_numpy(np.log(chain))  # float64 [F + 1, F]

    # ------------------------------------------------------------------ the generator's steps

    def _initial_state(self, batch: int) -> dict[str, Tensor]:
        return {
            "depth": torch.zeros(batch, dtype=torch.int64),
            "stack": torch.zeros(batch, self.seq_len + 1, dtype=torch.int64),  # open types
            "last_filler": torch.full((batch,), self.num_fillers, dtype=torch.int64),
            "alive": torch.ones(batch, dtype=torch.bool),  # every step so far allowed
        }

    def _step_log_probs(self, state: dict[str, Tensor], t: int) -> Tensor:
        """Log-probability of each next token at step ``t`` (0-based), float64 ``[B, V]``."""
        k, depth = self.num_types, state["depth"]
        left = self.seq_len - t  # steps left, this one included
        allowed = torch.stack([depth + 2 <= left, depth > 0, depth + 1 <= left], 1)
        weights = self.weights * allowed
        log_kind = (weights / weights.sum(1, keepdim=True)).log()  # [B, 3]
        out = torch.full((depth.shape[0], self.vocab_size), -math.inf, dtype=torch.float64)
        out[:, 1 : 1 + k] = (log_kind[:, :1] - math.log(k)).expand(-1, k)
        top = state["stack"].gather(1, (depth - 1).clamp(min=0)[:, None]).squeeze(1)
        out.scatter_(1, (1 + k + top)[:, None], log_kind[:, 1:2])
        out[:, 1 + 2 * k :] = log_kind[:, 2:3] + self.log_chain[state["last_filler"]]
        return out

    def _advance(self, state: dict[str, Tensor], token: Tensor, log_prob: Tensor) -> None:
        k, depth = self.num_types, state["depth"]
        is_open = (token >= 1) & (token <= k)
        is_close = (token > k) & (token <= 2 * k)
        is_filler = token > 2 * k
        state["alive"] &= log_prob > -math.inf
        rows = is_open.nonzero().squeeze(1)
        state["stack"][rows, depth[rows]] = token[rows] - 1
        state["depth"] = (depth + is_open.long() - is_close.long()).clamp(0, self.seq_len)
        state["last_filler"] = torch.where(is_filler, token - 1 - 2 * k, state["last_filler"])

    # ------------------------------------------------------------------ the task's interface

    @torch.no_grad()
    def sample(self, num: int, seed: int) -> Tensor:
        """``num`` sequences, int64 ``[num, seq_len]``, reproducible from ``seed``; all valid."""
        generator = torch_generator(seed)
        state = self._initial_state(num)
        seq = []
        for t in range(self.seq_len):
            log_probs = self._step_log_probs(state, t)
            token = sample_categorical(log_probs.exp(), generator)
            self._advance(state, token, log_probs.gather(1, token[:, None]).squeeze(1))
            seq.append(token)
        return torch.stack(seq, 1)

    @torch.no_grad()
    def log_likelihood(self, tokens: Tensor) -> Tensor:
        """Natural-log probability of each token given those before it, float64 ``[B, T]``
        for tokens ``[B, T]``; -inf from a sequence's first disallowed token on. The row sum
        is log p(x), -inf exactly when ``x`` breaks the rule."""
        if tokens.dim() != 2 or tokens.shape[1] != self.seq_len:
            raise ValueError(f"tokens must be [B, {self.seq_len}], got {list(tokens.shape)}")
        tokens = tokens.cpu()
        state = self._initial_state(tokens.shape[0])
        out = torch.empty(tokens.shape, dtype=torch.float64)
        for t in range(self.seq_len):
            token = tokens[:, t]
            in_vocab = (token >= 0) & (token < self.vocab_size)
            token = token.clamp(0, self.vocab_size - 1)  # its row is -inf from here on anyway
            log_probs = self._step_log_probs(state, t)
            picked = log_probs.gather(1, token[:, None]).squeeze(1)
            picked = torch.where(in_vocab & state["alive"], picked, -math.inf)
            self._advance(state, token, picked)
            out[:, t] = picked
        return out

    def validity(self, tokens: Tensor) -> Tensor:
        """Whether each sequence obeys the rule, bool ``[B]`` for tokens ``[B, T]``: only
        bracket and filler tokens, every closing bracket matches the innermost open one, none
        left open at the end. Checked with a plain stack, apart from the generator."""
        k, out = self.num_types, []
        for row in tokens.tolist():
            stack, ok = [], True
            for token in row:
                if 1 <= token <= k:
                    stack.append(token)
                elif k < token <= 2 * k and stack and stack[-1] == token - k:
                    stack.pop()
                elif not 2 * k < token < self.vocab_size:
                    ok = False
                    break
            out.append(ok and not stack)
        return torch.tensor(out, dtype=torch.bool)

    def nll(self, tokens: Tensor) -> float:
        """NLL_true: the true distribution's mean NLL per token over the valid rows of
        ``tokens [N, T]`` (nan when none is valid)."""
        total = self.log_likelihood(tokens).sum(1)
        valid = total[total > -math.inf]
        return (-valid.sum() / (valid.numel() * self.seq_len)).item() if valid.numel() else math.nan

    def score(self, samples: Tensor) -> dict[str, float | None]:
        """Metrics of generated ``samples [N, T]``: validity rate and NLL_true of the valid
        (None when no sample is valid, so that metrics.json stays valid JSON)."""
        nll = self.nll(samples)
        return {
            "validity": self.validity(samples).float().mean().item(),
            "nll_true_valid": None if math.isnan(nll) else nll,
        }

    def reward(self, tokens: Tensor) -> Tensor:
        """The ideal judge, float32 ``[B]``: 1 for a valid sequence, 0 otherwise."""
        return self.validity(tokens).float()
