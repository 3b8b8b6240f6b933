"""TRL drop-in: a GRPOTrainer's per-token log-probabilities and entropies from rlgaf_fast.

    trainer = GRPOTrainer(...)
    rlgaf_fast.integrations.trl.enable(trainer)
    trainer.train()

The seam is ``GRPOTrainer._get_per_token_logps_and_entropies(model, input_ids, attention_mask,
logits_to_keep, batch_size=None, compute_entropy=False, ...)``, which every log-probability of the
trainer goes through (the loss, the old policy's and the reference model's). ``enable`` replaces it
on this one trainer by a wrapper that calls TRL's own method with a stand-in for the model: TRL
still splits the batch into ``batch_size`` chunks, slices pixel values and the other per-sample
inputs, masks the prompt and the padding out of the labels, keeps the last ``logits_to_keep``
positions and drops the entropy when it was not asked for; the stand-in receives the model inputs
of one chunk, runs the model's body for the last hidden states (the LM head never produces
logits) and projects only the labelled positions through ``rlgaf_fast.fused_linear_logprobs``,
with the trainer's temperature and the model's logit scale, as TRL's own fused head would.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = ["UnsupportedError", "enable", "disable", "is_enabled"]

_METHOD = "_get_per_token_logps_and_entropies"
_MIN_TRL = "1.16"
# Marks the instance attribute enable() sets, so that disable() removes only its own.
_MARK = "_rlgaf_fast_original"
# Parameters of TRL's method the wrapper relies on: it reads compute_entropy, and the rest must mean
# what they mean in 1.16 for TRL's slicing around the stand-in to stay right.
_REQUIRED_PARAMETERS = ("model", "input_ids", "attention_mask", "logits_to_keep", "compute_entropy")


class UnsupportedError(ValueError):
    """The trainer, its model or the installed TRL is outside what enable() reproduces exactly."""


class _FusedOutput(NamedTuple):
    """The fields of TRL's FusedCausalLMOutput that its GRPO method reads."""

    log_probs: Tensor
    entropy: Tensor | None
    aux_loss: Tensor | None


def enable(trainer: Any, *, backend: str = "auto") -> Any:
    """Routes ``trainer``'s per-token log-probabilities and entropies through rlgaf_fast.

    Args:
        trainer: a ``trl.GRPOTrainer`` (TRL >= 1.16) or a subclass, before or during training.
        backend: passed to ``rlgaf_fast.fused_linear_logprobs`` ("auto", "torch", "cpp", ...).

    Returns:
        ``trainer`` itself, patched on the instance only: other trainers and the class keep TRL's
        method. Calling ``enable`` again is a no-op; ``disable(trainer)`` restores TRL's method.

    Raises:
        ImportError: TRL is not installed.
        UnsupportedError: a TRL version below 1.16 or one whose method no longer has the expected
            parameters, a trainer that is not a GRPOTrainer, more than one process (DDP, FSDP,
            DeepSpeed: the body would run outside the wrapper's forward), an MoE load-balancing
            loss, a model whose output head is not a plain ``torch.nn.Linear``, prompt-learning
            PEFT, or an rlgaf_fast without ``fused_linear_logprobs``.
    """
    try:
        import trl
    except ImportError as error:
        raise ImportError(
            "rlgaf_fast.integrations.trl needs TRL: pip install 'rlgaf_fast[trl]'"
        ) from error
    from packaging.version import Version

    if Version(trl.__version__).release < Version(_MIN_TRL).release:
        raise UnsupportedError(
            f"rlgaf_fast.integrations.trl supports TRL >= {_MIN_TRL}; TRL {trl.__version__} "
            "is installed"
        )
    if not isinstance(trainer, trl.GRPOTrainer):
        raise UnsupportedError(f"enable() takes a trl.GRPOTrainer; got {type(trainer).__name__}")
    if is_enabled(trainer):
        return trainer
    parameters = inspect.signature(getattr(type(trainer), _METHOD)).parameters
    missing = [name for name in _REQUIRED_PARAMETERS if name not in parameters]
    if missing:
        raise UnsupportedError(
            f"TRL {trl.__version__}: {type(trainer).__name__}.{_METHOD} has no parameter "
            f"{', '.join(missing)}; this adapter follows the method of TRL {_MIN_TRL}"
        )

    import rlgaf_fast

    if not hasattr(rlgaf_fast, "fused_linear_logprobs"):
        raise UnsupportedError(
            "this rlgaf_fast has no fused_linear_logprobs, the op the TRL adapter calls"
        )
    if trainer.accelerator.num_processes > 1:
        raise UnsupportedError(
            "enable() supports single-process training only: with "
            f"{trainer.accelerator.num_processes} processes the model body would run outside "
            "the DDP/FSDP/DeepSpeed wrapper's forward"
        )
    if getattr(trainer, "aux_loss_enabled", False):
        raise UnsupportedError(
            "enable() does not compute the MoE load-balancing loss (router_aux_loss_coef != 0); "
            "set router_aux_loss_coef=0.0 or leave TRL's method in place"
        )
    for model in (trainer.model, getattr(trainer, "ref_model", None)):
        if model is not None:
            _head_spec(_unwrap(trainer, model))

    original = getattr(trainer, _METHOD)
    signature = inspect.signature(original)

    @functools.wraps(original)
    def per_token_logps_and_entropies(*args: Any, **kwargs: Any):
        bound = signature.bind(*args, **kwargs)
        arguments = bound.arguments
        compute_entropy = arguments.get("compute_entropy", parameters["compute_entropy"].default)
        arguments["model"] = _FusedHead(
            trainer,
            arguments["model"],
            outputs=("log_probs", "entropy") if compute_entropy else ("log_probs",),
            backend=backend,
        )
        return original(*bound.args, **bound.kwargs)

    setattr(per_token_logps_and_entropies, _MARK, original)
    setattr(trainer, _METHOD, per_token_logps_and_entropies)
    return trainer


def disable(trainer: Any) -> Any:
    """Restores TRL's own method on ``trainer`` (a no-op when not enabled); returns ``trainer``."""
    if is_enabled(trainer):
        delattr(trainer, _METHOD)
    return trainer


def is_enabled(trainer: Any) -> bool:
    """Whether ``enable`` has patched ``trainer``."""
    return hasattr(vars(trainer).get(_METHOD), _MARK)


def _unwrap(trainer: Any, model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under the accelerate and PEFT wrappers."""
    model = trainer.accelerator.unwrap_model(model)
    peft_config = getattr(model, "peft_config", None)
    if peft_config is not None and hasattr(model, "get_base_model"):
        if any(getattr(c, "is_prompt_learning", False) for c in peft_config.values()):
            raise UnsupportedError(
                "enable() does not support prompt-learning PEFT (its virtual tokens are added "
                "by the PEFT model's forward, which the adapter bypasses)"
            )
        model = model.get_base_model()
    return model


class _HeadSpec(NamedTuple):
    lm_head: torch.nn.Linear
    backbone: str
    logit_scale: float
    softcap: float | None


def _head_spec(model: torch.nn.Module) -> _HeadSpec:
    """How ``model`` turns its last hidden states into logits, the way TRL's fused head reads it.

    Raises UnsupportedError where the op cannot reproduce it.
    """
    import transformers
    from packaging.version import Version

    name = type(model).__name__
    get_head = getattr(model, "get_output_embeddings", None)
    lm_head = get_head() if get_head is not None else None
    # A subclass of Linear (a LoRA-wrapped head, a quantised one) computes something else than
    # hidden @ weight.T + bias, which is all the op knows.
    if type(lm_head) is not torch.nn.Linear:
        raise UnsupportedError(
            f"enable() needs the model's output head to be a plain torch.nn.Linear; {name}'s is "
            f"{type(lm_head).__name__}"
        )
    config = model.config.get_text_config()
    softcap = getattr(config, "final_logit_softcapping", None)
    # The same attributes, in the same order, as TRL's add_fused_lm_head reads: the model families
    # that scale their logits name the factor differently.
    logit_scale = getattr(config, "logit_scale", None)
    if logit_scale is None:
        logit_scale = getattr(config, "output_multiplier", None)
    if logit_scale is None:
        logit_scale = getattr(config, "lm_head_multiplier", None)
    if logit_scale is None and getattr(config, "logits_scaling", None) is not None:
        scaling = config.logits_scaling
        logit_scale = scaling if config.model_type == "hyperclovax" else 1 / scaling
    logit_scale = 1.0 if logit_scale is None else float(logit_scale)
    # Before transformers 5, vision-language models keep their language backbone under `model`.
    backbone = "base_model"
    if config is not model.config and Version(transformers.__version__) < Version("5.0.0"):
        backbone = "model"
    return _HeadSpec(lm_head, backbone, logit_scale, None if softcap is None else float(softcap))


class _FusedHead:
    """Stands in for the model in TRL's method: ``model(**inputs, labels=, fused_lm_head=True)``."""

    def __init__(self, trainer: Any, model: torch.nn.Module, outputs: tuple, backend: str):
        self.trainer = trainer
        self.model = model
        self.outputs = outputs
        self.backend = backend

    def __call__(
        self, *args: Any, labels: Tensor | None = None, fused_lm_head: bool = False, **kwargs: Any
    ) -> _FusedOutput:
        """Per-token outputs for one chunk.

        Args:
            labels: int64 [B, L] token ids with -100 where no log-probability is wanted (prompt and
                padding); position t scores token t from the hidden state at t - 1.
            kwargs: the model inputs TRL built (input_ids [B, L], attention_mask [B, L], pixel
                values and the other per-sample inputs of multimodal models).

        Returns:
            log_probs and, if asked for, entropy: float [B, L - 1], zero where labels[:, 1:] is
            -100 (as TRL's fused head returns them); aux_loss None.
        """
        unexpected = [k for k in ("shift_labels", "output_router_logits") if kwargs.get(k)]
        if args or labels is None or not fused_lm_head or unexpected:
            raise UnsupportedError(
                "TRL called the model in a way rlgaf_fast.integrations.trl does not handle "
                f"(positional inputs, no labels, no fused_lm_head, or {unexpected}); "
                "disable(trainer) to use TRL's own method"
            )
        import rlgaf_fast

        model = _unwrap(self.trainer, self.model)
        spec = _head_spec(model)
        kwargs["use_cache"] = False
        hidden = getattr(model, spec.backbone)(**kwargs).last_hidden_state[:, :-1]
        weight, bias = spec.lm_head.weight, spec.lm_head.bias
        # A model split across devices can end its body on another device than its head.
        hidden = hidden.to(weight.device)
        labels = labels[:, 1:].to(weight.device)
        mask = labels != -100
        device_type = hidden.device.type
        if self.trainer.args.cast_lm_head_to_fp32:
            dtype = torch.float32
        elif torch.is_autocast_enabled(device_type):
            # The projection in the autocast dtype, as the model's own head (and TRL's fused one)
            # computes it under the trainer's mixed precision; the softmax stays in float32.
            dtype = torch.get_autocast_dtype(device_type)
        else:
            dtype = weight.dtype
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        with torch.autocast(device_type, enabled=False):
            # Only the scored positions are projected: the prompt and the padding never reach the
            # vocabulary-sized matmul.
            result = rlgaf_fast.fused_linear_logprobs(
                hidden[mask],
                weight,
                labels[mask],
                bias=bias,
                temperature=self.trainer.temperature,
                logit_scale=spec.logit_scale,
                softcap=spec.softcap,
                outputs=self.outputs,
                backend=self.backend,
            )

        def scatter(values: Tensor | None) -> Tensor | None:
            # masked_scatter keeps a chunk with no scored position connected to the graph, so its
            # zero loss still backpropagates.
            if values is None:
                return None
            return values.new_zeros(mask.shape).masked_scatter(mask, values)

        entropy = scatter(result.entropy) if "entropy" in self.outputs else None
        return _FusedOutput(scatter(result.log_probs), entropy, None)
