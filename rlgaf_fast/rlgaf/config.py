"""RLGAFConfig: every knob of the adversarial fine-tuning loop, as one dataclass.

Loadable from YAML (through ``yaml.safe_load``, so a config file can never run code) or a dict;
unknown keys are an error rather than silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlgaf_fast.rlgaf.modes import MODE_NAMES, mode_spec

MODES = MODE_NAMES  # the table in modes.py says what each needs
REWARD_TYPES = ("log_d", "neg_log_1m_d", "logit")
TAU_SCHEDULES = ("constant", "linear", "exponential")
LR_SCHEDULES = ("constant", "linear", "cosine")
# grpo mode's policy losses; grpo.py maps each onto ppo_loss's options.
GRPO_LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "gspo", "cispo")
DISCRIMINATOR_LOSSES = ("bce", "bradley_terry")


@dataclass
class RLGAFConfig:
    """Configuration of :class:`RLGAFTrainer`.

    mode: ``sft`` (MLE on the demonstrations), ``ppo`` (discriminator reward, value head, GAE,
    clipped PPO), ``reinforce`` (discriminator reward, baseline, no critic), ``gumbel``
    (Gumbel-Softmax relaxation, discriminator gradient flows into the generator), ``rlhf``
    (PPO against a fixed reward function or reward model), ``grpo`` (discriminator reward,
    group-relative advantages over ``group_size`` completions per prompt, no critic),
    ``rlhf-grpo`` (GRPO against a fixed reward function or reward model); see modes.py for
    what each needs.
    """

    mode: str = "ppo"
    seed: int = 0
    use_fused_kernels: bool = False
    total_steps: int = 100

    # Batches (per process).
    batch_size: int = 16
    max_new_tokens: int = 20
    # Keep at most this many prompt tokens, the last ones (TRL's left truncation); None keeps
    # whole prompts, which must then fit the generator's positions with max_new_tokens.
    max_prompt_length: int | None = None
    sample_temperature: float = 1.0

    # Generator optimisation.
    generator_lr: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    # Decay of an exponential moving average of the generator's weights, updated after every
    # generator step (0: off). GAN generators oscillate around the equilibrium; the average
    # (Polyak averaging, from the weights after the first step) sits near its centre. It is what
    # evaluations see and what is shipped (RLGAFTrainer.evaluation_model); rollouts still come
    # from the live generator.
    generator_ema: float = 0.0
    # Set every dropout probability of the generator to 0 (as TRL does for PPO): dropout would
    # make the log-probabilities of the rollout, of PPO's old policy and of the update differ
    # for the same weights, so the ratio would not start at 1.
    disable_dropout: bool = True
    # Adam's first-moment decay, for the generator's and the discriminator's optimisers. Momentum
    # makes each player keep moving after the other has answered, which feeds the GAN
    # oscillation; DCGAN and most GANs since lower it to 0.5 (or 0).
    adam_beta1: float = 0.9

    # Discriminator: its optimiser and how many of its steps per generator step.
    discriminator_lr: float = 1e-4
    # AdamW's decoupled weight decay of the discriminator; it pulls the discriminator toward
    # "cannot tell", which damps the generator-discriminator oscillation.
    discriminator_weight_decay: float = 0.01
    d_steps: int = 1
    g_steps: int = 1
    reward_type: str = "log_d"
    # "bce": demonstrations labelled real, generations fake. "bradley_terry": each generation is
    # paired with a demonstration of its prompt, loss -log sigmoid(s_demo - s_gen); it learns a
    # ranking, so the score is defined up to a constant (which advantages and baselines remove).
    # Every prompt must then have a demonstration.
    discriminator_loss: str = "bce"

    # KL penalty to the frozen reference model, summed over each sequence's tokens: k1 per
    # token in the PPO and REINFORCE rewards, the exact KL over the vocabulary in Gumbel mode.
    kl_coef: float = 0.05
    # Weight of an MLE term on fresh demonstrations added to every generator update of ppo,
    # reinforce, gumbel and rlhf (InstructGPT's pretraining-mix term). The KL penalty above keeps
    # the policy near the reference where the policy samples; this term keeps probability on the
    # demonstrations' tokens, which the adversarial reward alone lets the policy drop.
    mle_coef: float = 0.0

    # PPO.
    ppo_epochs: int = 2
    minibatch_size: int = 8
    clip_eps: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.5
    entropy_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True

    # GRPO: the batch is batch_size // group_size prompts, each answered group_size times, so a
    # step costs what the other modes' steps cost. Advantage: the sequence reward minus its
    # group's mean, divided by the group's (unbiased) std when scale_rewards. loss_type picks
    # the policy loss (GRPO_LOSS_TYPES); clip_eps_high is the upper ratio clip of dapo and the
    # weight cap of cispo. kl_in_reward: the KL penalty enters the reward as in ppo (k1 summed
    # over the tokens) instead of the loss (k3 per token, kl_coef). ppo_epochs and
    # minibatch_size apply as in ppo.
    group_size: int = 4
    scale_rewards: bool = True
    loss_type: str = "grpo"
    clip_eps_high: float = 0.28
    kl_in_reward: bool = False

    # REINFORCE: moving-average baseline of the sequence reward (0 = batch mean only).
    baseline_decay: float = 0.0

    # Gumbel mode.
    tau_start: float = 1.0
    tau_end: float = 1.0
    tau_schedule: str = "constant"
    straight_through: bool = False

    # Logging and checkpoints.
    output_dir: str | None = None
    log_every: int = 1
    save_every: int = 0
    # Keep only the newest this many checkpoint-<step> directories (0: keep all).
    save_total_limit: int = 0
    # Continue from this checkpoint directory, or "latest": the newest complete checkpoint under
    # output_dir (none yet: start from the beginning), so a preempted job can rerun one command.
    resume_from: str | None = None
    tensorboard: bool = True
    progress_bar: bool = True

    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field that holds an impossible value (or TypeError
        for one of the wrong type, such as YAML's string ``1e3``)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            expected = _FIELD_TYPES[f.type]
            if f.type == "float" and isinstance(value, int) and not isinstance(value, bool):
                continue  # an int is a fine float
            if isinstance(value, bool) and bool not in expected:
                ok = False
            else:
                ok = isinstance(value, expected)
            if not ok:
                names = " or ".join("None" if t is type(None) else t.__name__ for t in expected)
                raise TypeError(f"{f.name} must be {names}, got {value!r} ({type(value).__name__})")
        choices = {
            "mode": MODES,
            "reward_type": REWARD_TYPES,
            "tau_schedule": TAU_SCHEDULES,
            "lr_schedule": LR_SCHEDULES,
            "loss_type": GRPO_LOSS_TYPES,
            "discriminator_loss": DISCRIMINATOR_LOSSES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        positive = (
            "batch_size",
            "max_new_tokens",
            "minibatch_size",
            "ppo_epochs",
            "tau_start",
            "tau_end",
            "sample_temperature",
            "log_every",
            "generator_lr",
            "discriminator_lr",
            "clip_eps",
            "value_clip",
            "group_size",
            "clip_eps_high",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        non_negative = (
            "total_steps",
            "d_steps",
            "g_steps",
            "kl_coef",
            "warmup_steps",
            "save_every",
            "save_total_limit",
            "entropy_coef",
            "mle_coef",
            "discriminator_weight_decay",
            "weight_decay",
            "max_grad_norm",
            "vf_coef",
        )
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ValueError(
                f"max_prompt_length must be >= 1 or None, got {self.max_prompt_length!r}"
            )
        if not 0 <= self.baseline_decay < 1:
            raise ValueError(f"baseline_decay must be in [0, 1), got {self.baseline_decay!r}")
        if not 0 <= self.adam_beta1 < 1:
            raise ValueError(f"adam_beta1 must be in [0, 1), got {self.adam_beta1!r}")
        if not 0 <= self.generator_ema < 1:
            raise ValueError(f"generator_ema must be in [0, 1), got {self.generator_ema!r}")
        if self.batch_size % self.minibatch_size:
            raise ValueError(
                f"minibatch_size ({self.minibatch_size}) must divide batch_size ({self.batch_size})"
            )
        if mode_spec(self.mode).grouped:
            # One completion per prompt leaves nothing to compare it with (and no group std).
            if self.group_size < 2:
                raise ValueError(
                    f"group_size must be >= 2 in {self.mode} mode, got {self.group_size!r}"
                )
            if self.batch_size % self.group_size:
                raise ValueError(
                    f"group_size ({self.group_size}) must divide batch_size ({self.batch_size}): "
                    f"a {self.mode} batch is batch_size // group_size prompts, each answered "
                    f"group_size times"
                )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RLGAFConfig:
        """Build from a mapping; unknown keys raise ValueError naming each with the closest
        field name."""
        if not isinstance(values, dict):
            raise TypeError(f"RLGAFConfig values must be a mapping, got {type(values).__name__}")
        check_keys(values, [f.name for f in dataclasses.fields(cls)], "RLGAFConfig")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path) -> RLGAFConfig:
        """Load from a YAML file (``yaml.safe_load``); the file may hold the fields at top level
        or under a ``trainer:`` key (the ``rlgaf-fast train`` config layout)."""
        values = load_yaml(path)
        section = "trainer" if "trainer" in values else "RLGAFConfig"
        values = values.get("trainer", values)
        if isinstance(values, dict):  # from_dict names the file's key without the file
            check_keys(values, [f.name for f in dataclasses.fields(cls)], section, source=path)
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The annotations above, as written (``from __future__ import annotations`` keeps them strings).
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (float,),
    "bool": (bool,),
    "str": (str,),
    "str | None": (str, type(None)),
    "int | None": (int, type(None)),
    "dict[str, Any]": (dict,),
}


def check_keys(
    values: dict[str, Any], known: list[str], section: str, source: str | Path | None = None
) -> None:
    """Raise ValueError naming the keys of ``values`` that are not in ``known``, each with the
    closest known name: a misspelt key would otherwise leave its default silently in place."""
    unknown = [key for key in values if key not in known]
    if not unknown:
        return
    where = f" in {source}" if source is not None else ""
    close = {key: difflib.get_close_matches(str(key), known, n=1) for key in unknown}
    if len(unknown) == 1:
        (key,) = unknown
        hint = (
            f"did you mean {close[key][0]!r}?" if close[key] else "valid keys: " + ", ".join(known)
        )
        raise ValueError(f"unknown {section} key {key!r}{where}; {hint}")
    named = [f"{k!r} (did you mean {close[k][0]!r}?)" if close[k] else repr(k) for k in unknown]
    valid = "" if any(close.values()) else "; valid keys: " + ", ".join(known)
    raise ValueError(f"unknown {section} keys{where}: {', '.join(named)}{valid}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with ``yaml.safe_load`` (no Python object tags, nothing executes)."""
    import yaml

    with open(path, encoding="utf-8") as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ValueError(
            f"{path}: expected a YAML mapping at top level, got {type(values).__name__}"
        )
    return values
