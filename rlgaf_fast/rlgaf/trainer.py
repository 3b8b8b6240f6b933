"""RLGAFTrainer: adversarial RL fine-tuning of a causal LM against a discriminator.

One iteration (``step``), as in docs/design.md ("Training loop"):
  1. roll out responses to prompts from the generator;
  2. the discriminator scores them; the score is the reward, plus a KL penalty to a frozen
     reference; the generator is updated by PPO (value head, GAE), REINFORCE (baseline), GRPO
     (group-relative advantages, grpo.py), or, in the Gumbel mode, by the discriminator's
     gradient through soft one-hot tokens;
  3. the discriminator is updated on demonstrations versus the fresh generations.
``sft`` (MLE on the demonstrations) and ``rlhf`` (PPO against a fixed reward function) are the
baselines. What each mode needs, and which update it runs, is the table in modes.py; the
pieces the trainer is built from come from build.py, and its checkpoints from checkpoint.py.
``config.use_fused_kernels`` swaps rlgaf_fast's fused ops in for their references
(kernel_ops.py); nothing else changes. Processes and devices come from ``accelerate``.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rlgaf_fast.rlgaf import build, checkpoint, parallel
from rlgaf_fast.rlgaf.config import RLGAFConfig
from rlgaf_fast.rlgaf.data import (
    STREAM_DEMOS,
    STREAM_GUMBEL,
    STREAM_MLE,
    STREAM_PROMPTS,
    STREAM_SAMPLING,
    STREAM_SHUFFLE,
    Batch,
    step_seed,
    torch_generator,
)
from rlgaf_fast.rlgaf.discriminator import (
    discriminator_loss,
    reward_from_logit,
    sequences_for_discriminator,
    stack_batches,
    token_sequences,
)
from rlgaf_fast.rlgaf.kernel_ops import kernel_ops, masked_mean, masked_whiten
from rlgaf_fast.rlgaf.models import PolicyWithValue
from rlgaf_fast.rlgaf.modes import mode_spec
from rlgaf_fast.rlgaf.rollout import generate, response_slice, sequence_inputs

# reward_fn(batch) -> [B] float tensor: the sequence-level reward of the rlhf mode.
RewardFn = Callable[[Batch], Tensor]


class NonFiniteLossError(FloatingPointError):
    """A loss was NaN or infinite; raised before the optimizer step, so the model stays finite."""


class RLGAFTrainer:
    """Adversarial fine-tuning loop. See the module docstring for what one step does.

    generator: a ``transformers`` causal LM. discriminator: a sequence-classification model
    taking ``inputs_embeds`` (see discriminator.py); not needed for ``sft`` and ``rlhf``.
    demonstrations / prompts: ``datasets`` datasets, lists of dicts or JSON Lines paths with
    ``prompt``/``response`` (text, needs ``tokenizer``) or ``prompt_ids``/``response_ids``;
    prompts default to the demonstrations' prompts. reference_model: the frozen model of the KL
    penalty (default: a copy of the generator as it starts). reward_fn: for ``rlhf``.
    eval_fn(trainer) -> dict: called every ``config.extra["eval_every"]`` steps, merged into
    the log. accelerator: an ``accelerate.Accelerator`` (one is made if not given).
    """

    def __init__(
        self,
        config: RLGAFConfig,
        generator: nn.Module,
        discriminator: nn.Module | None = None,
        demonstrations: Any = None,
        prompts: Any = None,
        *,
        reference_model: nn.Module | None = None,
        reward_fn: RewardFn | None = None,
        tokenizer: Any = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        eval_fn: Callable[[RLGAFTrainer], dict] | None = None,
        accelerator: Any = None,
    ) -> None:
        config.validate()
        self.config = config
        self.mode = config.mode
        self.spec = mode_spec(config.mode)
        self.ops = kernel_ops(config.use_fused_kernels)
        self.accelerator, self.fsdp = parallel.make_accelerator(accelerator)
        self.device = self.accelerator.device
        self.rank = self.accelerator.process_index
        self.is_main = self.accelerator.is_main_process
        self.step_count = 0
        self.reward_baseline: float | None = None
        self.eval_fn = eval_fn
        self.reward_fn = reward_fn
        # Seeds torch's global generator: the value head's initial weights (and dropout, if
        # any) follow config.seed. Batches and samples use their own per-step seeds.
        torch.manual_seed(config.seed)

        self.eos_token_id, self.pad_token_id = build.special_tokens(
            tokenizer, generator, eos_token_id, pad_token_id
        )
        build.check_inputs(self.spec, config, discriminator, reward_fn, demonstrations, prompts)
        tokens = (tokenizer, self.eos_token_id, self.pad_token_id)
        self.demos, self.prompts = build.data(config, generator, demonstrations, prompts, *tokens)
        models = build.models(
            self.spec, config, generator, discriminator, reference_model, self.device
        )
        optimizers = build.optimizers(config, models.policy, models.discriminator)
        models, optimizers = parallel.prepare(self.accelerator, models, optimizers)
        self.policy, self.discriminator, self.reference, self.ema = models
        self.g_opt, self.g_sched, self.d_opt, self.d_sched = optimizers
        self.run_log = build.RunLog(config, self.is_main)
        self.stopped_by: str | None = None  # the signal that ended the last train() early
        if config.resume_from is not None:
            path = checkpoint.resolve_resume(config.resume_from, config.output_dir)
            if path is not None:
                self.load_checkpoint(path)

    # ------------------------------------------------------------------ the loop

    def train(self, num_steps: int | None = None) -> list[dict]:
        """Run until ``config.total_steps`` (or ``num_steps`` more steps); log every step to
        ``output_dir/log.jsonl`` (and TensorBoard), checkpoint every ``save_every`` steps.
        SIGTERM or SIGINT ends the run after the current step, with a checkpoint when there is
        an ``output_dir``; ``stopped_by`` then names the signal."""
        from tqdm.auto import tqdm

        c = self.config
        end = c.total_steps if num_steps is None else self.step_count + num_steps
        history = []
        bar = tqdm(
            total=end,
            initial=self.step_count,
            desc=f"rlgaf {self.mode}",
            disable=not (c.progress_bar and self.is_main),
            dynamic_ncols=True,
        )
        self.stopped_by = None
        with checkpoint.GracefulStop() as stop:
            while self.step_count < end:
                logs = self.step()
                history.append(logs)
                self.log(logs)
                bar.update(1)
                bar.set_postfix(
                    {k: f"{logs[k]:.3g}" for k in ("g_loss", "d_loss", "reward") if k in logs}
                )
                stopping = stop.requested(self.accelerator)
                due = c.save_every and self.step_count % c.save_every == 0
                if c.output_dir and (due or stopping):
                    self.save_checkpoint(Path(c.output_dir) / f"checkpoint-{self.step_count}")
                    if c.save_total_limit and self.is_main:
                        checkpoint.prune_checkpoints(c.output_dir, c.save_total_limit)
                if stopping:
                    self.stopped_by = stop.received or "a stop signal on another process"
                    break
        bar.close()
        return history

    def step(self) -> dict:
        """One iteration: ``g_steps`` generator updates then ``d_steps`` discriminator updates."""
        c = self.config
        start = time.perf_counter()
        self.policy.train()
        logs: dict[str, Any] = {}
        fakes: list[Batch] = []
        for g in range(c.g_steps):
            out, batch = self.spec.update(self, g)  # sft_step, ppo_step, ... (modes.py)
            if batch is not None:
                fakes.append(batch)
            logs.update(out)
            if self.ema is not None:
                with self.unsharded(self.policy):
                    self.ema.update_parameters(self.unwrapped_policy.model)
        # The schedule counts iterations (total_steps of them), whatever g_steps is.
        self.g_sched.step()
        if self.discriminator is not None:
            for d in range(c.d_steps):
                # The first discriminator steps use this iteration's rollouts (made before the
                # generator update); any further ones get fresh generations.
                fake = fakes[d] if d < len(fakes) else self.rollout(sub=c.g_steps + d)
                logs.update(self.discriminator_step(fake, sub=d))
        self.step_count += 1
        elapsed = time.perf_counter() - start
        logs["tokens_per_s"] = logs.pop("tokens", 0) * c.g_steps / elapsed
        logs["lr"] = self.g_sched.get_last_lr()[0]
        logs["step"] = self.step_count
        eval_every = int(c.extra.get("eval_every", 0))
        if self.eval_fn is not None and eval_every and self.step_count % eval_every == 0:
            logs.update(self.eval_fn(self))
        return logs

    def log(self, logs: dict) -> None:
        """Append ``logs`` to ``output_dir/log.jsonl`` and TensorBoard every ``log_every``
        steps (on the main process only)."""
        if self.step_count % self.config.log_every == 0:
            self.run_log.write(logs, self.step_count)

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, path: str | Path) -> Path:
        """Save everything training needs to continue into directory ``path`` (see
        checkpoint.py for its files); returns ``path``."""
        return checkpoint.save_checkpoint(self, path)

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore everything :meth:`save_checkpoint` wrote; training continues exactly."""
        checkpoint.load_checkpoint(self, path, stacklevel=3)

    def close(self) -> None:
        """Close the log files."""
        self.run_log.close()

    # ------------------------------------------------------------------ generator updates

    def demonstration_nll(
        self, size: int, stream: int = STREAM_DEMOS, sub: int = 0
    ) -> tuple[Tensor, int]:
        """MLE loss: mean cross-entropy per response token of ``size`` fresh demonstrations,
        and their number of response tokens."""
        batch = self.demos.batch(size, self._seed(stream, sub=sub)).to(self.device)
        logits, _ = self.policy(*sequence_inputs(batch))
        logits = response_slice(logits, batch.prompt_ids.shape[1]).float()
        token_nll = F.cross_entropy(
            logits.flatten(0, 1), batch.response_ids.flatten(), reduction="none"
        ).view_as(batch.response_mask.float())
        return masked_mean(token_nll, batch.response_mask), int(batch.response_mask.sum())

    def _with_mle(self, loss: Tensor, size: int, sub: int = 0) -> tuple[Tensor, float | None]:
        """``loss`` plus ``mle_coef`` times the MLE loss of fresh demonstrations (when > 0)."""
        if self.config.mle_coef == 0:
            return loss, None
        mle, _ = self.demonstration_nll(size, STREAM_MLE, sub)
        return loss + self.config.mle_coef * mle, mle.item()

    def sft_step(self, sub: int = 0) -> dict:
        """MLE on a batch of demonstrations (the ``sub``-th of this iteration): cross-entropy
        of the response tokens."""
        loss, tokens = self.demonstration_nll(self.config.batch_size, sub=sub)
        self._check_finite(loss, "SFT loss")
        self._optimizer_step(loss, self.policy, self.g_opt)
        return {"g_loss": loss.item(), "tokens": tokens}

    def ppo_step(self, batch: Batch, sub: int = 0) -> dict:
        """PPO with a value head and GAE on one batch of rollouts (``ppo`` and ``rlhf``), the
        ``sub``-th generator step of this iteration."""
        c, ops = self.config, self.ops
        prompt_len = batch.prompt_ids.shape[1]
        inputs = sequence_inputs(batch)
        actions, mask = batch.response_ids, batch.response_mask
        with torch.no_grad():
            logits, values = self.policy(*inputs)
            logits = response_slice(logits, prompt_len)
            old_logprobs = ops.token_logprobs(logits, actions, temperature=c.sample_temperature)
            old_values = response_slice(values, prompt_len)
            score = self.score(batch)
            rewards, kl = self._token_rewards(batch, old_logprobs, score)
            advantages, returns = ops.gae(
                rewards, old_values, mask.float(), gamma=c.gamma, lam=c.lam
            )
            if c.whiten_advantages:
                advantages = masked_whiten(advantages, mask)

        stats: dict[str, list[float]] = defaultdict(list)
        updates = c.ppo_epochs * (c.batch_size // c.minibatch_size)
        for mb in self.minibatches(sub):
            mb_logits, mb_values = self.policy(*(x[mb] for x in inputs))
            out = ops.ppo_loss(
                response_slice(mb_logits, prompt_len),
                actions[mb],
                old_logprobs[mb],
                advantages[mb],
                mask[mb],
                clip_eps=c.clip_eps,
                entropy_coef=c.entropy_coef,
                temperature=c.sample_temperature,
            )
            v_loss = ops.value_loss(
                response_slice(mb_values, prompt_len),
                old_values[mb],
                returns[mb],
                mask[mb].float(),
                clip=c.value_clip,
            )
            loss, mle = self._with_mle(
                out.loss + c.vf_coef * v_loss,
                c.minibatch_size,
                sub=sub * updates + len(stats["g_loss"]),
            )
            self._check_finite(loss, "PPO loss")
            self._optimizer_step(loss, self.policy, self.g_opt)
            stats["g_loss"].append(out.loss.item())
            stats["value_loss"].append(v_loss.item())
            stats["entropy"].append(masked_mean(out.entropy, mask[mb]).item())
            stats["clipfrac"].append(out.clipfrac.item())
            stats["approx_kl"].append(out.approx_kl.item())
            if mle is not None:
                stats["mle_loss"].append(mle)
        result = {k: sum(v) / len(v) for k, v in stats.items()}
        result.update(reward=score.mean().item(), kl=kl, tokens=int(mask.sum()))
        return result

    def minibatches(self, sub: int = 0) -> Iterator[Tensor]:
        """The row indices of each update of a PPO-style step: ``ppo_epochs`` passes over the
        batch in a fresh shuffled order, ``minibatch_size`` rows at a time."""
        c = self.config
        shuffle = torch_generator(self._seed(STREAM_SHUFFLE, sub=sub))
        for _ in range(c.ppo_epochs):
            order = torch.randperm(c.batch_size, generator=shuffle).to(self.device)
            for start in range(0, c.batch_size, c.minibatch_size):
                yield order[start : start + c.minibatch_size]

    def _token_rewards(self, batch: Batch, logprobs: Tensor, score: Tensor) -> tuple[Tensor, float]:
        """Per-token rewards ``[B, T]``: -kl_coef * (logp - ref_logp) at every token, plus the
        sequence score at its last token. Also returns the mean sequence KL (k1)."""
        mask = batch.response_mask.float()
        rewards = torch.zeros_like(logprobs)
        kl = 0.0
        if self.reference is not None and self.config.kl_coef > 0:
            token_kl = (logprobs - self._response_logprobs(self.reference, batch)) * mask
            rewards = rewards - self.config.kl_coef * token_kl
            kl = (token_kl.sum(-1)).mean().item()
        last = (batch.response_mask.sum(-1) - 1).clamp(min=0)
        rewards[torch.arange(len(last), device=rewards.device), last] += score
        return rewards * mask, kl

    def reinforce_step(self, batch: Batch, sub: int = 0) -> dict:
        """REINFORCE with a baseline: every token of a sequence gets the advantage
        R - b, R = score - kl_coef * KL(sequence), b the batch mean (or a moving average).
        ``sub``: which generator step of this iteration."""
        c, ops = self.config, self.ops
        mask = batch.response_mask
        with torch.no_grad():
            score = self.score(batch)
            with self.unsharded(self.policy):
                old_logprobs = self._response_logprobs(self.unwrapped_policy.model, batch)
            rewards, kl = self._token_rewards(batch, old_logprobs, score)
            seq_reward = rewards.sum(-1)
            baseline = seq_reward.mean().item()
            if c.baseline_decay > 0 and self.reward_baseline is not None:
                decay = c.baseline_decay
                baseline = decay * self.reward_baseline + (1 - decay) * baseline
            advantages = (seq_reward - baseline)[:, None].expand_as(old_logprobs) * mask
        logits, _ = self.policy(*sequence_inputs(batch))
        # old_logprobs equal the current ones (to rounding, when the fused loss computes the
        # current ones), so the ratio is 1 and the gradient of the PPO loss is REINFORCE's
        # -A * grad log p (no clipping can occur).
        out = ops.ppo_loss(
            response_slice(logits, batch.prompt_ids.shape[1]),
            batch.response_ids,
            old_logprobs,
            advantages,
            mask,
            clip_eps=c.clip_eps,
            entropy_coef=c.entropy_coef,
            temperature=c.sample_temperature,
        )
        loss, mle = self._with_mle(out.loss, c.batch_size, sub=sub)
        self._check_finite(loss, "REINFORCE loss")
        self.reward_baseline = baseline  # only a finite step may move the baseline
        self._optimizer_step(loss, self.policy, self.g_opt)
        result = {
            "g_loss": out.loss.item(),
            "reward": score.mean().item(),
            "kl": kl,
            "entropy": masked_mean(out.entropy, mask).item(),
            "tokens": int(mask.sum()),
        }
        return result if mle is None else {**result, "mle_loss": mle}

    def gumbel_step(self, batch: Batch, seeds: list[int], sub: int = 0) -> dict:
        """One generator update on ``batch``, generated by Gumbel-max with ``seeds[t]`` at step
        t: recompute the relaxed samples from the same seeds in one teacher-forced pass; the
        discriminator reads them through its embedding (soft one-hot @ weight, fused), and the
        generator ascends the discriminator's reward directly (plus the exact KL penalty).

        Randomness: token t of sequence b uses noise row b of seed s_t (one seed per time step,
        not one seed with row b * T + t): generation then draws each step with the fused op, and
        the training pass regenerates the identical noise, so the relaxed sample's argmax is the
        generated token and no [T, V] noise is kept between the two passes.
        """
        c, ops = self.config, self.ops
        prompt_len, length = batch.prompt_ids.shape[1], batch.response_ids.shape[1]
        logits, _ = self.policy(*sequence_inputs(batch))
        logits = response_slice(logits, prompt_len) / c.sample_temperature
        with self.unsharded(self.discriminator):
            weight = self.unwrapped_discriminator.get_input_embeddings().weight
            weight = parallel.weight_for_other_update(weight, self.discriminator, self.fsdp)
        relaxed = [
            ops.gumbel_softmax_embedding(
                logits[:, t].contiguous(), weight, self.tau(), c.straight_through, seed=seeds[t]
            )
            for t in range(length)
        ]
        soft_embeds = torch.stack([emb for emb, _ in relaxed], 1)
        tokens = torch.stack([tok for _, tok in relaxed], 1)
        embeds, mask = sequences_for_discriminator(
            [
                (F.embedding(batch.prompt_ids, weight), batch.prompt_mask),
                (soft_embeds, batch.response_mask),
            ]
        )
        reward = reward_from_logit(self.discriminator(embeds, mask), c.reward_type)
        loss = -reward.mean()
        kl = torch.zeros(())
        if self.reference is not None and c.kl_coef > 0:
            # Exact KL(policy || reference) over the vocabulary, differentiable, summed over
            # each sequence's tokens as in PPO's reward: the same kl_coef, the same objective.
            ref_logits = self._response_logits(self.reference, batch)
            logp = torch.log_softmax(logits.float(), -1)
            ref_logp = torch.log_softmax(ref_logits.float() / c.sample_temperature, -1)
            token_kl = (logp.exp() * (logp - ref_logp)).sum(-1) * batch.response_mask
            kl = token_kl.sum(-1).mean()
            loss = loss + c.kl_coef * kl
        g_loss = loss.item()
        loss, mle = self._with_mle(loss, c.batch_size, sub=sub)
        self._check_finite(loss, "Gumbel generator loss")
        self._optimizer_step(loss, self.policy, self.g_opt)
        mismatch = (
            ((tokens != batch.response_ids) & batch.response_mask.bool()).float().mean().item()
        )
        result = {
            "g_loss": g_loss,
            "reward": reward.mean().item(),
            "kl": kl.item(),
            "tau": self.tau(),
            "token_mismatch": mismatch,
            "tokens": int(batch.response_mask.sum()),
        }
        return result if mle is None else {**result, "mle_loss": mle}

    # ------------------------------------------------------------------ discriminator update

    def discriminator_step(self, fake: Batch, sub: int = 0, real: Batch | None = None) -> dict:
        """Demonstrations against generations, by ``config.discriminator_loss`` (see
        :func:`~rlgaf_fast.rlgaf.discriminator.discriminator_loss`). ``real`` defaults to a
        fresh batch of demonstrations as large as ``fake`` for bce, and to the demonstrations of
        ``fake``'s prompts, row for row, for bradley_terry (a given ``real`` must be so)."""
        pairs = self.config.discriminator_loss == "bradley_terry"
        if real is None and pairs:
            real = self.demos.for_prompts(fake.prompt_ids.cpu(), fake.prompt_mask.cpu())
        elif real is None:
            real = self.demos.batch(
                fake.response_ids.shape[0], self._seed(STREAM_DEMOS, sub=sub + 1)
            )
        real, fake = real.to(self.device), fake.to(self.device)
        ids, mask = stack_batches(token_sequences(real), token_sequences(fake))
        logit = self.discriminator(ids, mask)
        n_real = real.response_ids.shape[0]
        loss = discriminator_loss(logit[:n_real], logit[n_real:], self.config.discriminator_loss)
        self._check_finite(loss, "discriminator loss")
        self._optimizer_step(loss, self.discriminator, self.d_opt)
        self.d_sched.step()
        logs = {
            "d_loss": loss.item(),
            "d_acc_real": (logit[:n_real] > 0).float().mean().item(),
            "d_acc_fake": (logit[n_real:] < 0).float().mean().item(),
        }
        if pairs:  # a ranking has no threshold at 0: its accuracy is the pairs it orders
            logs["d_acc_pairs"] = (logit[:n_real] > logit[n_real:]).float().mean().item()
        return logs

    # ------------------------------------------------------------------ helpers

    def _seed(self, stream: int, step: int | None = None, sub: int = 0) -> int:
        step = self.step_count if step is None else step
        return step_seed(self.config.seed, step, self.rank, stream, sub)

    @property
    def unwrapped_policy(self) -> PolicyWithValue:
        return self.accelerator.unwrap_model(self.policy)

    @property
    def unwrapped_discriminator(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.discriminator).discriminator

    def unsharded(self, *modules: nn.Module | None) -> contextlib.AbstractContextManager:
        """Under FSDP, gathers the full weights of ``modules`` for reads outside their forward,
        such as generation; does nothing otherwise. Every process must enter it together."""
        return parallel.unsharded(self.fsdp, *modules)

    @property
    def evaluation_model(self) -> nn.Module:
        """The generator to evaluate and ship: the weight average when ``generator_ema`` > 0,
        else the live generator (under FSDP, sharded: use it inside
        ``unsharded(trainer.policy)``)."""
        return self.unwrapped_policy.model if self.ema is None else self.ema.module

    def tau(self, step: int | None = None) -> float:
        """Gumbel-Softmax temperature at ``step`` (default: the current one); see
        :func:`~rlgaf_fast.rlgaf.build.tau_at`."""
        return build.tau_at(self.config, self.step_count if step is None else step)

    def _check_finite(self, loss: Tensor, what: str) -> None:
        if not torch.isfinite(loss).all():
            # Steps are numbered as the log numbers them (from 1).
            raise NonFiniteLossError(
                f"non-finite {what} ({loss.item()}) at step {self.step_count + 1} "
                f"(mode {self.mode!r}); stopped before its optimizer step, so every weight is "
                "that of the last finite update"
            )

    def _optimizer_step(self, loss: Tensor, module: nn.Module, optimizer: Any) -> None:
        parallel.optimizer_step(
            self.accelerator, self.fsdp, loss, module, optimizer, self.config.max_grad_norm
        )

    def rollout(
        self, sub: int = 0, gumbel_seeds: list[int] | None = None, group_size: int = 1
    ) -> Batch:
        """Responses of the current generator to a fresh batch of prompts: ``batch_size //
        group_size`` prompts, each answered ``group_size`` times in consecutive rows."""
        c = self.config
        prompts = self.prompts.batch(
            c.batch_size // group_size, self._seed(STREAM_PROMPTS, sub=sub)
        ).to(self.device)
        prompts = Batch(*(t.repeat_interleave(group_size, 0) for t in vars(prompts).values()))
        sampler = torch_generator(self._seed(STREAM_SAMPLING, sub=sub), self.device)
        token_sampler = None
        if gumbel_seeds is not None:

            def token_sampler(logits: Tensor, t: int) -> Tensor:
                # Gumbel-max: the hard Gumbel-Softmax sample's one-hot sits at argmax(x + g).
                return self.ops.gumbel_softmax(logits, 1.0, True, seed=gumbel_seeds[t]).argmax(-1)

        model = self.unwrapped_policy.model
        was_training = model.training
        model.eval()
        with self.unsharded(self.policy):
            batch = generate(
                model,
                prompts.prompt_ids,
                prompts.prompt_mask,
                c.max_new_tokens,
                temperature=c.sample_temperature,
                eos_token_id=self.eos_token_id,
                pad_token_id=self.pad_token_id,
                generator=sampler,
                token_sampler=token_sampler,
            )
        model.train(was_training)
        return batch

    @torch.no_grad()
    def score(self, batch: Batch) -> Tensor:
        """Sequence reward ``[B]``: reward_fn in ``rlhf``, else the discriminator's."""
        if self.spec.reward_fn:
            return self.reward_fn(batch).to(self.device).float()
        self.discriminator.eval()  # rewards without dropout noise
        logit = self.discriminator(*token_sequences(batch))
        self.discriminator.train()
        return reward_from_logit(logit, self.config.reward_type)

    @torch.no_grad()
    def _response_logits(self, model: nn.Module, batch: Batch) -> Tensor:
        """Logits ``[B, T, V]`` of ``model`` (a plain LM) at the response tokens (no grad)."""
        input_ids, attention_mask, position_ids = sequence_inputs(batch)
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ).logits
        return response_slice(logits, batch.prompt_ids.shape[1])

    @torch.no_grad()
    def _response_logprobs(self, model: nn.Module, batch: Batch) -> Tensor:
        """Log-probabilities ``[B, T]`` of the response tokens under ``model`` (no grad)."""
        logits = self._response_logits(model, batch)
        return self.ops.token_logprobs(
            logits, batch.response_ids, temperature=self.config.sample_temperature
        )

    def gumbel_seeds(self, g: int) -> list[int]:
        """The seeds of the ``g``-th Gumbel update of this iteration: one per response token,
        each drawing that token's noise for every sequence of the batch."""
        n = self.config.max_new_tokens
        return [self._seed(STREAM_GUMBEL, sub=n * g + t) for t in range(n)]
