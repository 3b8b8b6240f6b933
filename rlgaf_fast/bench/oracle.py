"""The SeqGAN synthetic benchmark: a fixed random LSTM "oracle" is the expert.

Its 10,000 samples (20 tokens, vocabulary 5000) are the demonstrations; a generator (a small
config-built transformers LM) is judged by NLL_oracle (how likely the oracle finds the
generator's samples; lower is better) and NLL_test (how likely the generator finds held-out
oracle samples; it rises when the generator drops modes). The oracle's weights are SeqGAN's
``target_params_py3.pkl`` (``rlgaf-fast oracle --oracle seqgan`` downloads it; a path works too).

``run_oracle`` trains one mode and writes metrics.json, samples.txt and curves.png. It runs any
task object with the oracle's interface: ``sample(num, seed)``, ``log_likelihood(tokens)``,
``nll(tokens)``, ``score(samples)`` (the task's metrics of generated samples), ``reward(tokens)``
(the ideal judge), ``vocab_size``, ``seq_len``, ``name`` and optionally ``presets``; the rule
task of ``rlgaf_fast.bench.rule_task`` is the other one.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rlgaf_fast.bench.seqgan_data import seqgan_oracle_path
from rlgaf_fast.rlgaf.config import RLGAFConfig
from rlgaf_fast.rlgaf.data import Batch, torch_generator
from rlgaf_fast.rlgaf.discriminator import (
    CNNDiscriminator,
    LMDiscriminator,
    RecurrentDiscriminator,
    build_transformer_discriminator,
)
from rlgaf_fast.rlgaf.models import build_causal_lm
from rlgaf_fast.rlgaf.modes import mode_spec
from rlgaf_fast.rlgaf.rollout import generate, sample_categorical

VOCAB_SIZE, SEQ_LEN, HIDDEN, START_TOKEN = 5000, 20, 32, 0
PARAM_SHAPES = (
    [(VOCAB_SIZE, HIDDEN)]
    + [(HIDDEN, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN,)] * 4
    + [(HIDDEN, VOCAB_SIZE), (VOCAB_SIZE,)]
)

# The only globals a pickle of plain numpy arrays refers to (numpy 1.x and 2.x spellings, pickle
# protocols 2 to 5).
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),  # pickle protocol 5
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # bytes under protocols 0-2 (text to bytes; runs nothing)
}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that admits numpy arrays and nothing else: any other global (a function
    that could run code, such as os.system) is refused before it is looked up."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: this file may only contain numpy arrays "
                "(a pickle naming other globals can run arbitrary code)"
            )
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module.removeprefix("numpy.core.")  # numpy 2 moved them
        return super().find_class(module, name)


def load_oracle_params(path: str | Path) -> list[np.ndarray]:
    """The 15 float32 arrays of the SeqGAN oracle (target_params_py3.pkl), checked for shape.
    Only numpy arrays are admitted (NumpyOnlyUnpickler); anything else is a clear error."""
    data = Path(path).read_bytes()
    params = NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    if not isinstance(params, list) or len(params) != len(PARAM_SHAPES):
        raise ValueError(
            f"{path}: expected a list of {len(PARAM_SHAPES)} arrays, got {type(params).__name__}"
        )
    for i, (array, shape) in enumerate(zip(params, PARAM_SHAPES, strict=True)):
        if not isinstance(array, np.ndarray) or array.dtype != np.float32 or array.shape != shape:
            got = f"{getattr(array, 'dtype', type(array))} {getattr(array, 'shape', '')}"
            raise ValueError(f"{path}: array {i} should be float32 {shape}, got {got}")
    return params


class OracleLSTM(nn.Module):
    """The oracle LSTM of SeqGAN, exactly as its README writes it (gates i, f, o, c~; h = c = 0
    and the start token's embedding as the first input)."""

    name, vocab_size, seq_len = "seqgan", VOCAB_SIZE, SEQ_LEN

    def __init__(self, params: list[np.ndarray]) -> None:
        super().__init__()
        t = [torch.from_numpy(np.array(p)) for p in params]
        self.register_buffer("embedding", t[0])
        # Stack the four gates (i, f, o, c~) so that one product computes them all.
        self.register_buffer("w_x", torch.cat([t[1], t[4], t[7], t[10]], dim=1))  # [32, 128]
        self.register_buffer("w_h", torch.cat([t[2], t[5], t[8], t[11]], dim=1))  # [32, 128]
        self.register_buffer("bias", torch.cat([t[3], t[6], t[9], t[12]]))  # [128]
        self.register_buffer("w_out", t[13])
        self.register_buffer("b_out", t[14])

    @classmethod
    def from_file(cls, path: str | Path) -> OracleLSTM:
        return cls(load_oracle_params(path))

    def _cell(self, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        i, f, o, g = (x @ self.w_x + h @ self.w_h + self.bias).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c

    @torch.no_grad()
    def log_likelihood(self, tokens: Tensor) -> Tensor:
        """Natural-log probability of each token, float32 ``[B, T]``, for tokens ``[B, T]``."""
        tokens = tokens.to(self.embedding.device)
        inputs = torch.cat([torch.full_like(tokens[:, :1], START_TOKEN), tokens[:, :-1]], 1)
        x = self.embedding[inputs]
        h = c = x.new_zeros(tokens.shape[0], HIDDEN)
        out = torch.empty(tokens.shape, dtype=torch.float32, device=tokens.device)
        for t in range(tokens.shape[1]):
            h, c = self._cell(x[:, t], h, c)
            # One step at a time: a [B, 20, 5000] logits tensor would not fit in cache.
            logits = torch.addmm(self.b_out, h, self.w_out)
            picked = logits.gather(-1, tokens[:, t : t + 1]).squeeze(-1)
            out[:, t] = picked - torch.logsumexp(logits, -1)
        return out

    def nll(self, tokens: Tensor, batch_size: int = 500) -> float:
        """NLL_oracle: mean negative log-likelihood per token over all of ``tokens [N, T]``."""
        total = sum(-self.log_likelihood(chunk).sum().item() for chunk in tokens.split(batch_size))
        return total / tokens.numel()

    def score(self, samples: Tensor) -> dict[str, float]:
        """Metrics of generated ``samples [N, 20]``: NLL_oracle."""
        return {"nll_oracle": self.nll(samples)}

    def reward(self, tokens: Tensor) -> Tensor:
        """The ideal judge: the mean log-likelihood per token of each row, float32 ``[B]``."""
        return self.log_likelihood(tokens).mean(-1)

    @torch.no_grad()
    def sample(self, num: int, seed: int, batch_size: int = 500) -> Tensor:
        """``num`` sequences of 20 tokens, int64 ``[num, 20]``, reproducible from ``seed``."""
        generator = torch_generator(seed, self.embedding.device)
        out = []
        for start in range(0, num, batch_size):
            n = min(batch_size, num - start)
            token = torch.full((n,), START_TOKEN, dtype=torch.int64, device=self.embedding.device)
            h = c = self.embedding.new_zeros(n, HIDDEN)
            seq = []
            for _ in range(SEQ_LEN):
                h, c = self._cell(self.embedding[token], h, c)
                probs = torch.softmax(torch.addmm(self.b_out, h, self.w_out), -1)
                token = sample_categorical(probs, generator)
                seq.append(token)
            out.append(torch.stack(seq, 1))
        return torch.cat(out)


# ---------------------------------------------------------------------- the benchmark


@dataclass
class OraclePreset:
    """Sizes and schedules of one benchmark run."""

    num_demos: int = 10_000
    num_test: int = 10_000
    num_eval: int = 2_000  # generated samples per evaluation during training
    num_final: int = 10_000  # generated samples written to samples.txt and scored at the end
    num_sweep: int = 10_000  # samples per temperature of the MLE temperature sweep
    # Generator: a 2-layer Llama of width 32 with tied embeddings (193k parameters). Wider ones
    # overfit the 200k demonstration tokens within a few epochs (NLL_test rises).
    gen_hidden: int = 32
    gen_layers: int = 2
    sft_steps: int = 1000
    sft_batch: int = 64
    sft_lr: float = 3e-3
    sft_weight_decay: float = 0.01
    adv_steps: int = 300
    d_pretrain_steps: int = 600  # minibatches of 64 + 64: about 4 epochs of the negatives
    eval_every: int = 50
    # "lm": LMDiscriminator on a frozen feature model (the warm start, fit d_fit_steps further);
    # "lm-context": the same reading the LM's hidden state too; "lm-tuned": that model trained
    # with the head; "lm-bigram": the same with
    # bigram counts of half the demonstrations as a third feature, the other half its real
    # examples; "cnn": SeqGAN's CNN, which memorises the 10,000 demonstrations and is at chance
    # on unseen sequences (README); "transformer": a small Llama classifier from scratch;
    # "lstm", "gru": a recurrent classifier from scratch (RecurrentDiscriminator).
    discriminator: str = "lm"
    # MLE steps (batches of 64, AdamW at 1e-3) that the LM discriminators' feature model takes
    # on the demonstrations past the warm start (0 for the CNN, which has none). The
    # closer that model fits the demonstrations, the likelier they look beside the generator's
    # samples, and the sharper the generator the loop settles on (README, "Proof").
    d_fit_steps: int = 500
    # An sft run's directory whose generator (of any size, trained on the same task) is the LM
    # discriminators' feature model in place of the warm start; d_fit_steps then fit it further.
    d_features: str | None = None
    trainer: dict | None = None  # RLGAFConfig overrides of the adversarial phase
    # temperatures of the MLE warm start's sweep (sft runs)
    sweep_temperatures: tuple[float, ...] = (0.8, 0.9, 1.0, 1.1, 1.2)


DISCRIMINATORS = ("lm", "lm-context", "lm-tuned", "lm-bigram", "cnn", "transformer", "lstm", "gru")

PRESETS = {
    # CI: the whole pipeline at toy sizes (fewer demonstrations and final samples).
    "smoke": OraclePreset(
        num_demos=2000,
        num_test=500,
        num_eval=500,
        num_final=2000,
        num_sweep=500,
        gen_hidden=32,
        gen_layers=1,
        sft_steps=100,
        adv_steps=10,
        d_pretrain_steps=5,
        eval_every=5,
        d_fit_steps=20,
    ),
    "full": OraclePreset(),
}

# The adversarial modes evaluate (and ship) a moving average of the generator's weights: the
# generator and the discriminator oscillate, and the live generator's NLL_oracle at a given
# iteration depends on the phase (README).
# The policy step of both grpo modes; they differ only in what scores the completions.
_GRPO_POLICY_STEP = dict(
    batch_size=64,
    minibatch_size=32,
    ppo_epochs=2,
    group_size=8,
    generator_lr=2e-4,
    kl_coef=0.01,
    generator_ema=0.99,
)

ADVERSARIAL_DEFAULTS: dict[str, dict] = {
    "ppo": dict(
        batch_size=64,
        minibatch_size=32,
        ppo_epochs=2,
        generator_lr=2e-4,
        discriminator_lr=1e-3,
        kl_coef=0.01,
        reward_type="log_d",
        d_steps=2,
        generator_ema=0.99,
        mle_coef=0.05,
    ),
    "reinforce": dict(
        batch_size=64,
        minibatch_size=64,
        generator_lr=2e-4,
        discriminator_lr=1e-3,
        kl_coef=0.01,
        reward_type="log_d",
        d_steps=2,
        generator_ema=0.99,
    ),
    "gumbel": dict(
        batch_size=64,
        minibatch_size=64,
        generator_lr=2e-4,
        discriminator_lr=1e-3,
        kl_coef=0.02,
        reward_type="log_d",
        tau_start=1.0,
        tau_end=0.5,
        tau_schedule="exponential",
        straight_through=True,
        d_steps=2,
        generator_ema=0.99,
    ),
    "rlhf": dict(batch_size=64, minibatch_size=32, ppo_epochs=2, generator_lr=2e-4, kl_coef=0.02),
    # ppo's settings less the critic's: 8 groups of 8 completions per batch.
    "grpo": dict(
        _GRPO_POLICY_STEP,
        discriminator_lr=1e-3,
        reward_type="log_d",
        d_steps=2,
        mle_coef=0.05,
    ),
    # grpo's policy step without a discriminator, as rlhf is ppo's.
    "rlhf-grpo": dict(_GRPO_POLICY_STEP),
}


def build_oracle_generator(preset: OraclePreset, task: Any = None) -> nn.Module:
    """The preset's generator for ``task`` (default: the SeqGAN oracle's vocabulary and
    length), randomly initialised: a Llama with tied embeddings."""
    vocab_size, seq_len = (VOCAB_SIZE, SEQ_LEN) if task is None else (task.vocab_size, task.seq_len)
    return build_causal_lm(
        vocab_size,
        hidden_size=preset.gen_hidden,
        num_layers=preset.gen_layers,
        num_heads=4,
        max_positions=seq_len + 1,
        tie_embeddings=True,
    )


def oracle_data(
    oracle: OracleLSTM, data_seed: int, num_demos: int = 10_000, num_test: int = 10_000
) -> tuple[Tensor, Tensor]:
    """The demonstrations and the held-out test set ``[N, 20]`` that run_oracle draws for
    ``data_seed``."""
    return (
        oracle.sample(num_demos, seed=1000 + data_seed),
        oracle.sample(num_test, seed=2000 + data_seed),
    )


def check_warm_start(init: str | Path) -> None:
    """Raise FileNotFoundError unless ``init`` holds a finished run: its generator and its
    metrics.json, which a run writes last."""
    init = Path(init)
    make = (
        f"make one with `rlgaf-fast oracle --oracle PARAMS.pkl --mode sft --out {init}`, "
        "or start without a warm start to train one first"
    )
    if not init.is_dir():
        raise FileNotFoundError(f"warm start directory {init} does not exist; {make}")
    for name in ("metrics.json", "generator.safetensors"):
        if not (init / name).is_file():
            raise FileNotFoundError(
                f"warm start {init} holds no finished run: {name} is missing; {make}"
            )


def load_warm_start(
    init: str | Path, preset: OraclePreset | None = None, task: Any = None
) -> tuple[nn.Module, dict]:
    """The generator an sft run saved in directory ``init`` for ``task`` (default: the SeqGAN
    oracle), and that run's metrics.json (with ``data_seed``, the seed of its demonstrations and
    test set). The generator has the width and depth that run recorded, else ``preset``'s."""
    from safetensors.torch import load_model

    check_warm_start(init)
    metrics = json.loads((Path(init) / "metrics.json").read_text())
    metrics.setdefault("data_seed", metrics["seed"])  # runs before data_seed drew with seed
    if metrics.get("task", "seqgan") != getattr(task, "name", "seqgan"):
        raise ValueError(
            f"warm start {init} was trained on task {metrics.get('task', 'seqgan')!r}, "
            f"not {getattr(task, 'name', 'seqgan')!r}"
        )
    sizes = {
        k: v for k, v in metrics.get("preset", {}).items() if k in ("gen_hidden", "gen_layers")
    }
    preset = dataclasses.replace(preset or PRESETS["full"], **sizes)
    generator = build_oracle_generator(preset, task)
    load_model(generator, str(Path(init) / "generator.safetensors"))
    return generator, metrics


def oracle_batch(tokens: Tensor) -> Batch:
    """Sequences ``[B, 20]`` as a Batch after the start-token prompt."""
    prompt = torch.full_like(tokens[:, :1], START_TOKEN)
    return Batch(prompt, torch.ones_like(prompt), tokens, torch.ones_like(tokens))


def oracle_examples(tokens: Tensor) -> list[dict]:
    """Oracle sequences as examples: the prompt is the start token, the response the sequence."""
    return [{"prompt_ids": [START_TOKEN], "response_ids": row} for row in tokens.tolist()]


@torch.no_grad()
def sample_generator(
    model: nn.Module,
    num: int,
    seed: int,
    temperature: float = 1.0,
    batch_size: int = 500,
    seq_len: int = SEQ_LEN,
) -> Tensor:
    """``num`` sequences of ``seq_len`` tokens from the generator after the start token,
    ``[num, seq_len]`` int64 on the CPU (drawn on the model's device, so a seed's samples differ
    by device)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch_generator(seed, device)
    out = []
    for start in range(0, num, batch_size):
        n = min(batch_size, num - start)
        prompt = torch.full((n, 1), START_TOKEN, dtype=torch.int64, device=device)
        batch = generate(
            model,
            prompt,
            torch.ones_like(prompt),
            seq_len,
            temperature=temperature,
            generator=generator,
        )
        out.append(batch.response_ids.cpu())
    model.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def generator_nll(
    model: nn.Module, tokens: Tensor, temperature: float = 1.0, batch_size: int = 250
) -> float:
    """NLL_test: the generator's mean NLL per token of oracle sequences ``[N, 20]``, with its
    logits divided by ``temperature`` (the tempered model)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = 0.0
    for chunk in tokens.to(device).split(batch_size):
        ids = torch.cat([torch.full_like(chunk[:, :1], START_TOKEN), chunk], 1)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float() / temperature
        total += F.cross_entropy(logits.flatten(0, 1), chunk.flatten(), reduction="sum").item()
    model.train(was_training)
    return total / tokens.numel()


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (ties broken by order)."""
    ranks = [x.argsort().argsort().double() for x in (a.flatten(), b.flatten())]
    return torch.corrcoef(torch.stack(ranks))[0, 1].item()


def distinct_fraction(tokens: Tensor) -> float:
    return len({tuple(row) for row in tokens.tolist()}) / max(1, tokens.shape[0])


def copied_fraction(tokens: Tensor, demos: Tensor) -> float:
    """Fraction of the sequences ``tokens`` found verbatim among ``demos``: memorisation, which
    NLL_oracle rewards (a copied demonstration is an oracle sample)."""
    seen = {tuple(row) for row in demos.tolist()}
    return sum(tuple(row) in seen for row in tokens.tolist()) / max(1, tokens.shape[0])


def evaluate(
    model: nn.Module,
    task: Any,
    test: Tensor,
    num: int,
    seed: int,
    temperature: float = 1.0,
) -> tuple[dict, Tensor]:
    """The task's metrics of ``num`` samples (``task.score``), NLL_test on ``test [N, T]`` and
    the distinct fraction, and the samples ``[num, T]``."""
    samples = sample_generator(model, num, seed, temperature, seq_len=task.seq_len)
    metrics = {
        **task.score(samples),
        "nll_test": generator_nll(model, test, temperature),
        "distinct": distinct_fraction(samples),
    }
    return metrics, samples


def check_discriminator(p: OraclePreset, mode: str) -> None:
    """Refuse a preset whose discriminator settings cannot build one for ``mode``, with what was
    expected (sft and rlhf build none)."""
    if not mode_spec(mode).discriminator:
        return
    if p.discriminator not in DISCRIMINATORS:
        raise ValueError(
            f"discriminator must be one of {', '.join(DISCRIMINATORS)}, got {p.discriminator!r}"
        )
    if p.d_fit_steps < 0:
        raise ValueError(f"d_fit_steps must be >= 0, got {p.d_fit_steps}")
    if p.d_fit_steps and not p.discriminator.startswith("lm"):
        raise ValueError(
            f"d_fit_steps needs an lm discriminator (the {p.discriminator} has no feature model "
            f"to fit): set it to 0, got {p.d_fit_steps}"
        )
    if p.d_features is not None:
        if not p.discriminator.startswith("lm"):
            raise ValueError(
                f"d_features needs an lm discriminator (the {p.discriminator} reads no feature "
                f"model), got {p.d_features!r}"
            )
        check_warm_start(p.d_features)


def fit_features(
    generator: nn.Module,
    demos: Tensor,
    steps: int,
    seed: int,
    output_dir: str | Path | None = None,
    use_fused_kernels: bool = False,
) -> nn.Module:
    """A copy of ``generator`` trained ``steps`` more MLE steps on ``demos`` ``[N, T]`` (batches
    of 64, AdamW at 1e-3): the feature model of run_oracle's LM discriminators (d_fit_steps)."""
    from rlgaf_fast.rlgaf.trainer import RLGAFTrainer

    if steps < 0:
        raise ValueError(f"d_fit_steps must be >= 0, got {steps}")
    features = copy.deepcopy(generator)
    if steps:
        config = RLGAFConfig(
            mode="sft",
            total_steps=steps,
            batch_size=64,
            minibatch_size=64,
            generator_lr=1e-3,
            weight_decay=0.01,
            seed=seed,
            use_fused_kernels=use_fused_kernels,
            max_new_tokens=demos.shape[1],
            output_dir=None if output_dir is None else str(output_dir),
            progress_bar=True,
            tensorboard=False,
        )
        trainer = RLGAFTrainer(config, features, demonstrations=oracle_examples(demos))
        trainer.train()
        trainer.close()
    return features


def run_oracle(
    oracle_path: str | Path | Any,
    mode: str,
    out_dir: str | Path,
    *,
    preset: str | OraclePreset = "smoke",
    init: str | Path | None = None,
    seed: int = 0,
    use_fused_kernels: bool = False,
    overrides: dict | None = None,
) -> dict:
    """Train ``mode`` on the SeqGAN oracle, or on another task object (``oracle_path`` a
    ``rule_task.RuleTask``, say), and write out_dir/{metrics.json, samples.txt, curves.png,
    generator.safetensors}. A preset named by a string comes from the task's ``presets``
    (the SeqGAN oracle's: PRESETS).

    ``sft`` trains the MLE warm start (and reports the preset's temperature sweep); the other
    modes start from ``init`` (an sft run's directory) or, without it, train their own warm
    start first. The demonstrations and the test set are drawn with the warm start's seed
    (``init``'s metrics.json), so that the discriminator's "real" sequences are the ones the
    warm start was trained on; ``seed`` sets everything else. ``oracle_path`` is SeqGAN's
    target_params_py3.pkl or "seqgan" (``seqgan_data.seqgan_oracle_path``). Returns the metrics
    dictionary.
    """
    from safetensors.torch import save_model
    from tqdm.auto import tqdm

    from rlgaf_fast.rlgaf.trainer import RLGAFTrainer

    task = None if isinstance(oracle_path, (str, Path)) else oracle_path
    p = getattr(task, "presets", PRESETS)[preset] if isinstance(preset, str) else preset
    spec = mode_spec(mode)
    check_discriminator(p, mode)  # before the warm start trains
    if task is None:
        oracle_path = seqgan_oracle_path(oracle_path)  # "seqgan": downloaded once, then cached
    if init is not None and spec.rollouts:
        check_warm_start(init)  # a mistyped warm start leaves no empty out_dir behind
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    torch.manual_seed(seed)
    if init is not None and spec.rollouts:
        generator, warm = load_warm_start(init, p, task)
    else:
        generator, warm = build_oracle_generator(p, task), None
    data_seed = seed if warm is None else warm["data_seed"]
    oracle = OracleLSTM.from_file(oracle_path) if task is None else task
    demos, test = oracle_data(oracle, data_seed, p.num_demos, p.num_test)
    history: list[dict] = []
    metrics: dict[str, Any] = {
        "task": oracle.name,
        "mode": mode,
        "seed": seed,
        "data_seed": data_seed,
        "preset": p.__dict__,
        "oracle_samples_nll_oracle": oracle.nll(test),
    }

    def eval_fn(trainer: RLGAFTrainer, phase: str) -> dict:
        model = trainer.evaluation_model
        result, samples = evaluate(
            model, oracle, test[: p.num_eval], p.num_eval, seed=3000 + trainer.step_count
        )
        if trainer.discriminator is not None:
            # Does the discriminator's judgement track the task's ideal judge (the oracle's
            # log-likelihood, the rule's validity)? Rank correlation on the generated samples.
            logit = trainer.score(oracle_batch(samples).to(trainer.device)).cpu()
            result["d_oracle_spearman"] = spearman(logit, oracle.reward(samples))
        history.append({"phase": phase, "step": trainer.step_count, **result})
        return result

    base = dict(
        seed=seed,
        use_fused_kernels=use_fused_kernels,
        max_new_tokens=oracle.seq_len,
        progress_bar=True,
        tensorboard=False,
    )
    config = None
    if spec.rollouts:  # built first, so that a bad override fails before the warm start trains
        if overrides and "mode" in overrides:
            raise ValueError("overrides may not set mode; choose it with mode (--mode)")
        config = RLGAFConfig.from_dict(
            {
                **base,
                "mode": mode,
                "total_steps": p.adv_steps,
                "output_dir": str(out_dir / mode),
                "extra": {"eval_every": p.eval_every},
                **ADVERSARIAL_DEFAULTS[mode],
                **(p.trainer or {}),
                **(overrides or {}),
            }
        )
    if warm is not None:
        metrics["warm_start"] = warm["final"]
    else:
        sft = RLGAFConfig(
            mode="sft",
            total_steps=p.sft_steps,
            batch_size=p.sft_batch,
            minibatch_size=p.sft_batch,
            generator_lr=p.sft_lr,
            weight_decay=p.sft_weight_decay,
            lr_schedule="cosine",
            warmup_steps=p.sft_steps // 20,
            output_dir=str(out_dir / "sft"),
            extra={"eval_every": max(1, p.sft_steps // 10)},
            **base,
        )
        trainer = RLGAFTrainer(
            sft,
            generator,
            demonstrations=oracle_examples(demos),
            eval_fn=lambda tr: eval_fn(tr, "sft"),
        )
        trainer.train()
        trainer.close()
        if spec.rollouts:
            metrics["warm_start"], _ = evaluate(generator, oracle, test, p.num_final, seed=4000)

    if config is not None:
        metrics["config"] = config.to_dict()

        def oracle_reward(batch: Batch) -> Tensor:
            return oracle.reward(batch.response_ids.cpu()).to(batch.response_ids.device)

        discriminator, real_demos = None, demos
        if spec.discriminator:
            bigram_sequences = None
            if p.discriminator == "lm-bigram":
                # Counts from one half, real examples from the other: a real example's count is
                # then what a fresh oracle sequence would see, not its own.
                table, real_demos = demos.chunk(2)
                bigram_sequences = torch.cat([torch.full_like(table[:, :1], START_TOKEN), table], 1)
            if p.discriminator == "cnn":
                discriminator = CNNDiscriminator(oracle.vocab_size)
            elif p.discriminator == "transformer":
                discriminator = build_transformer_discriminator(
                    oracle.vocab_size, max_positions=oracle.seq_len + 1
                )
            elif p.discriminator in ("lstm", "gru"):
                discriminator = RecurrentDiscriminator(oracle.vocab_size, cell=p.discriminator)
            else:
                base = generator
                if p.d_features is not None:
                    base, _ = load_warm_start(p.d_features, p, task)
                features = fit_features(
                    base,
                    demos,
                    p.d_fit_steps,
                    seed,
                    out_dir / "d_fit",
                    use_fused_kernels=use_fused_kernels,
                )
                if p.d_fit_steps:
                    # how much closer the feature model fits: NLL per token, before then after
                    metrics["d_fit_nll_demos"] = [generator_nll(m, demos) for m in (base, features)]
                discriminator = LMDiscriminator(
                    features,
                    train_lm=p.discriminator == "lm-tuned",
                    context_features=p.discriminator == "lm-context",
                    bigram_sequences=bigram_sequences,
                )
            metrics["discriminator_trainable_params"] = sum(
                t.numel() for t in discriminator.parameters() if t.requires_grad
            )
        trainer = RLGAFTrainer(
            config,
            generator,
            discriminator,
            demonstrations=oracle_examples(real_demos),
            reward_fn=oracle_reward if spec.reward_fn else None,
            eval_fn=lambda tr: eval_fn(tr, mode),
        )
        if discriminator is not None:
            # Pretrain the discriminator against the warm start, as SeqGAN does: minibatches
            # from the demonstrations and from a pool of 10,000 generated negatives.
            negatives = sample_generator(
                generator, p.num_demos, seed=7000 + seed, seq_len=oracle.seq_len
            )
            draw = torch_generator(8000 + seed)
            for _ in tqdm(range(p.d_pretrain_steps), desc="discriminator pretraining"):
                real = real_demos[torch.randint(len(real_demos), (64,), generator=draw)]
                fake = negatives[torch.randint(len(negatives), (64,), generator=draw)]
                trainer.discriminator_step(oracle_batch(fake), real=oracle_batch(real))
        eval_fn(trainer, mode)
        trainer.train()
        trainer.close()
        generator = trainer.evaluation_model

    final, samples = evaluate(generator, oracle, test, p.num_final, seed=5000)
    final["copied"] = copied_fraction(samples, demos)
    metrics["final"] = final
    if not spec.rollouts:  # the MLE model: how its temperature trades quality for diversity
        metrics["temperature_sweep"] = [
            {
                "temperature": t,
                **evaluate(generator, oracle, test, p.num_sweep, seed=6000, temperature=t)[0],
            }
            for t in p.sweep_temperatures
        ]
    metrics["history"] = history
    metrics["time_s"] = time.perf_counter() - started
    save_model(generator, str(out_dir / "generator.safetensors"))
    (out_dir / "samples.txt").write_text(
        "\n".join(" ".join(map(str, row)) for row in samples.tolist()) + "\n"
    )
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    plot_curves(metrics, out_dir / "curves.png")
    return metrics


def plot_curves(metrics: dict, path: Path) -> None:
    """The task's first metric (NLL_oracle, or the rule's validity) and NLL_test against
    training step, one panel each, phases in colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    keys = [next(iter(metrics["final"])), "nll_test"]
    phases = dict.fromkeys(h["phase"] for h in metrics["history"])
    offset = 0
    for phase in phases:
        rows = [h for h in metrics["history"] if h["phase"] == phase]
        steps = [offset + h["step"] for h in rows]
        for ax, key in zip(axes, keys, strict=True):
            ax.plot(steps, [h[key] for h in rows], marker="o", label=phase)
        offset = steps[-1] if steps else offset
    for ax, key in zip(axes, keys, strict=True):
        ax.set_xlabel("step")
        ax.set_title(key.replace("nll", "NLL"))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{metrics.get('task', 'seqgan')} task: {metrics['mode']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
