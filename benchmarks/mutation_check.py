"""Mutation check of the training objective: does the test suite notice a wrong formula?

Each mutant below changes one line of the reference (rlgaf_fast/reference.py), the
discriminator's loss and reward, the trainer's reward, advantage and loss code, or the noise of
the Triton and C++ kernels into a plausible mistake. The script copies a git revision into a
temporary folder (the working tree is never touched), applies one mutant at a time and runs the
test files that cover the mutated code. A mutant is killed when a test fails, and survives
when they all pass. The unmutated copy must pass the same files first.

    python benchmarks/mutation_check.py                     # HEAD's code and tests
    python benchmarks/mutation_check.py --tests-rev REV     # HEAD's code, REV's tests
    python benchmarks/mutation_check.py --only k3-offset    # one mutant (repeatable)

Writes benchmarks/results/mutation/<label>.json and .md (``--label``, default the tests'
revision). Run on demand, not in CI: every mutant reruns several test files (about half an
hour in all on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

REFERENCE_TESTS = (
    "tests/test_reference.py",
    "tests/test_reference_closed_form.py",
    "tests/ops/test_policy_loss_variants.py",
    "tests/ops/test_ppo_loss.py",
)
# tests/ops/test_gumbel_softmax.py compares the noise only through the softmax, and takes
# minutes under the Triton interpreter: the noise mutants run the direct noise tests.
NOISE_TESTS = ("tests/test_reference.py", "tests/ops/test_gumbel_noise.py")
TRAINER_TESTS = (
    "tests/rlgaf/test_objective.py",
    "tests/rlgaf/test_trainer.py",
    "tests/rlgaf/test_modes.py",
    "tests/rlgaf/test_grpo.py",
    "tests/rlgaf/test_discriminator.py",
    "tests/rlgaf/test_discriminator_objectives.py",
    "tests/rlgaf/test_kernel_ops.py",
)

# The trainer's fused-against-unfused training comparisons run both paths through the same
# trainer code, which a mutant there changes on both sides alike; they take half the time of
# the trainer's files, and are left out.
DESELECT = ("-k", "not fused_kernels_give_the_same")


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str  # must occur exactly once in path
    new: str
    tests: tuple[str, ...]
    what: str


REF, DISC, TRAINER = (
    "rlgaf_fast/reference.py",
    "rlgaf_fast/rlgaf/discriminator.py",
    ("rlgaf_fast/rlgaf/trainer.py"),
)
GRPO, KOPS = "rlgaf_fast/rlgaf/grpo.py", "rlgaf_fast/rlgaf/kernel_ops.py"

MUTANTS = [
    # ---- the reference: KL estimators, aggregation, PPO loss, GAE, value loss, noise
    Mutant(
        "k3-offset",
        REF,
        "return torch.exp(-d) + d - 1",
        "return torch.exp(-d) + d - 0.99",
        REFERENCE_TESTS,
        "constant offset in the k3 estimator",
    ),
    Mutant(
        "k3-sign",
        REF,
        "return torch.exp(-d) + d - 1",
        "return torch.exp(d) - d - 1",
        REFERENCE_TESTS,
        "k3 of the reversed log-ratio",
    ),
    Mutant(
        "k2-half",
        REF,
        '    if estimator == "k2":\n        return 0.5 * d * d',
        '    if estimator == "k2":\n        return d * d',
        REFERENCE_TESTS,
        "k2 without 1/2",
    ),
    Mutant(
        "k3plus-grad",
        REF,
        'return kl_estimate(logprobs, ref_logprobs, "k3").detach() + (k2 - k2.detach())',
        'return kl_estimate(logprobs, ref_logprobs, "k3")',
        REFERENCE_TESTS,
        "k3+ with k3's gradient instead of k2's",
    ),
    Mutant(
        "token-mean-n",
        REF,
        "return _masked(token_loss, mask).sum() / num_items_in_batch",
        "return _masked_mean(token_loss, mask)",
        REFERENCE_TESTS,
        "num_items_in_batch ignored",
    ),
    Mutant(
        "seq-norm-default",
        REF,
        "norm = mask.shape[-1] if loss_agg_norm is None else loss_agg_norm",
        "norm = mask.shape[-1]",
        REFERENCE_TESTS,
        "loss_agg_norm ignored",
    ),
    Mutant(
        "seq-mean-count",
        REF,
        "per_seq = seq_sum / seq_count.clamp(min=1)",
        "per_seq = seq_sum / mask.shape[-1]",
        REFERENCE_TESTS,
        "seq-mean-token-mean divides by T, not the sequence's token count",
    ),
    Mutant(
        "empty-seq-counts",
        REF,
        "return (per_seq * has_tokens).sum() / has_tokens.sum().clamp(min=1)",
        "return per_seq.mean()",
        REFERENCE_TESTS,
        "sequences without tokens count in the mean over sequences",
    ),
    Mutant(
        "clip-low",
        REF,
        "torch.clamp(ratio, 1 - clip_eps, 1 + eps_high)",
        "torch.clamp(ratio, 1 - eps_high, 1 + eps_high)",
        REFERENCE_TESTS,
        "lower clip uses clip_eps_high",
    ),
    Mutant(
        "clip-min",
        REF,
        "token_loss = torch.maximum(unclipped, clipped)",
        "token_loss = torch.minimum(unclipped, clipped)",
        REFERENCE_TESTS,
        "pessimistic max replaced by min",
    ),
    Mutant(
        "dual-clip-sign",
        REF,
        "advantages < 0, torch.minimum(token_loss, -dual_clip * advantages)",
        "advantages > 0, torch.minimum(token_loss, -dual_clip * advantages)",
        REFERENCE_TESTS,
        "dual clip applied to positive advantages",
    ),
    Mutant(
        "entropy-sign",
        REF,
        "token_loss = token_loss - entropy_coef * entropy",
        "token_loss = token_loss + entropy_coef * entropy",
        REFERENCE_TESTS,
        "entropy bonus with the wrong sign",
    ),
    Mutant(
        "kl-coef",
        REF,
        "token_loss = token_loss + kl_coef * kl",
        "token_loss = token_loss + kl",
        REFERENCE_TESTS,
        "kl_coef ignored in the loss",
    ),
    Mutant(
        "ratio-clamp",
        REF,
        "torch.clamp(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)",
        "log_ratio",
        REFERENCE_TESTS,
        "log-ratio not clamped before exp",
    ),
    Mutant(
        "gspo-sum",
        REF,
        "seq_mean = seq_sum / seqs.sum(-1, keepdim=True).clamp(min=1)",
        "seq_mean = seq_sum",
        REFERENCE_TESTS,
        "GSPO ratio of the sum, not the mean",
    ),
    Mutant(
        "cispo-no-stopgrad",
        REF,
        "-torch.clamp(ratio, max=1 + eps_high).detach() * advantages",
        "-torch.clamp(ratio, max=1 + eps_high) * advantages",
        REFERENCE_TESTS,
        "CISPO weight not detached",
    ),
    Mutant(
        "tis-cap",
        REF,
        "return torch.clamp(rho, max=cap)",
        "return rho",
        REFERENCE_TESTS,
        "truncated importance sampling not truncated",
    ),
    Mutant(
        "temperature",
        REF,
        "z = logits.to(dtype) / temperature",
        "z = logits.to(dtype)",
        REFERENCE_TESTS,
        "temperature ignored in ppo_loss",
    ),
    Mutant(
        "gae-lam",
        REF,
        "advantage = delta + gamma * lam * next_advantage",
        "advantage = delta + lam * next_advantage",
        REFERENCE_TESTS + TRAINER_TESTS,
        "GAE without gamma in the trace",
    ),
    Mutant(
        "gae-gamma-twice",
        REF,
        "delta = rewards[..., t] + gamma * next_value - values[..., t]",
        "delta = rewards[..., t] + gamma * gamma * next_value - values[..., t]",
        REFERENCE_TESTS + TRAINER_TESTS,
        "gamma applied twice to the bootstrap",
    ),
    Mutant(
        "value-clip",
        REF,
        "loss = torch.maximum(loss, (clipped - returns) ** 2)",
        "loss = torch.minimum(loss, (clipped - returns) ** 2)",
        REFERENCE_TESTS + TRAINER_TESTS,
        "value clipping optimistic",
    ),
    Mutant(
        "uniform-offset",
        REF,
        "return ((word >> 9) * 2 + 1).to(torch.float32) * 2.0**-24",
        "return ((word >> 9) * 2).to(torch.float32) * 2.0**-24 + 2.0**-25",
        NOISE_TESTS,
        "uniform grid shifted by half a step",
    ),
    Mutant(
        "triton-log-poly",
        "kernels/philox.py",
        "q = q * d + 0.33333253860473633",
        "q = q * d + 0.333",
        NOISE_TESTS,
        "a coefficient of the Triton -log(u) polynomial rounded",
    ),
    # ---- the discriminator's objective and reward
    Mutant(
        "d-labels-swapped",
        DISC,
        "labels = torch.cat([torch.ones_like(real_logit), torch.zeros_like(fake_logit)])",
        "labels = torch.cat([torch.zeros_like(real_logit), torch.ones_like(fake_logit)])",
        TRAINER_TESTS,
        "demonstrations labelled fake, generations real",
    ),
    Mutant(
        "bt-order",
        DISC,
        "return -F.logsigmoid(real_logit - fake_logit).mean()",
        "return -F.logsigmoid(fake_logit - real_logit).mean()",
        TRAINER_TESTS,
        "Bradley-Terry prefers the generation",
    ),
    Mutant(
        "log-d-sign",
        DISC,
        "        return F.logsigmoid(logit)\n",
        "        return -F.logsigmoid(logit)\n",
        TRAINER_TESTS,
        "log_d reward negated",
    ),
    Mutant(
        "neg-log-1m-d",
        DISC,
        "return -F.logsigmoid(-logit)",
        "return F.logsigmoid(-logit)",
        TRAINER_TESTS,
        "-log(1 - D) reward negated",
    ),
    # ---- the trainer's rewards, advantages and losses
    Mutant(
        "kl-dropped",
        TRAINER,
        "rewards = rewards - self.config.kl_coef * token_kl",
        "rewards = rewards",
        TRAINER_TESTS,
        "KL penalty dropped from the reward",
    ),
    Mutant(
        "kl-sign",
        TRAINER,
        "rewards = rewards - self.config.kl_coef * token_kl",
        "rewards = rewards + self.config.kl_coef * token_kl",
        TRAINER_TESTS,
        "KL penalty rewarded",
    ),
    Mutant(
        "score-first-token",
        TRAINER,
        "rewards[torch.arange(len(last), device=rewards.device), last] += score",
        "rewards[:, 0] += score",
        TRAINER_TESTS,
        "sequence score on the first response token",
    ),
    Mutant(
        "whiten-no-centre",
        KOPS,
        "return (x - mean) * torch.rsqrt(var + eps) * mask.to(x.dtype)",
        "return x * torch.rsqrt(var + eps) * mask.to(x.dtype)",
        TRAINER_TESTS,
        "advantage whitening that does not centre",
    ),
    Mutant(
        "whiten-no-scale",
        KOPS,
        "return (x - mean) * torch.rsqrt(var + eps) * mask.to(x.dtype)",
        "return (x - mean) * mask.to(x.dtype)",
        TRAINER_TESTS,
        "whitening that does not scale",
    ),
    Mutant(
        "gamma-twice",
        TRAINER,
        "rewards, old_values, mask.float(), gamma=c.gamma, lam=c.lam",
        "rewards, old_values, mask.float(), gamma=c.gamma * c.gamma, lam=c.lam",
        TRAINER_TESTS,
        "gamma applied twice inside the trainer",
    ),
    Mutant(
        "lam-ignored",
        TRAINER,
        "rewards, old_values, mask.float(), gamma=c.gamma, lam=c.lam",
        "rewards, old_values, mask.float(), gamma=c.gamma",
        TRAINER_TESTS,
        "the configured lam ignored",
    ),
    Mutant(
        "ppo-clip-ignored",
        TRAINER,
        "                clip_eps=c.clip_eps,\n                entropy_coef",
        "                entropy_coef",
        TRAINER_TESTS,
        "the configured clip_eps ignored by ppo",
    ),
    Mutant(
        "vf-coef",
        TRAINER,
        "out.loss + c.vf_coef * v_loss",
        "out.loss + v_loss",
        TRAINER_TESTS,
        "vf_coef ignored",
    ),
    Mutant(
        "baseline-sign",
        TRAINER,
        "(seq_reward - baseline)[:, None]",
        "(baseline - seq_reward)[:, None]",
        TRAINER_TESTS,
        "REINFORCE advantage negated",
    ),
    Mutant(
        "gumbel-reward-sign",
        TRAINER,
        "        loss = -reward.mean()\n",
        "        loss = reward.mean()\n",
        TRAINER_TESTS,
        "Gumbel generator descends the reward",
    ),
    Mutant(
        "gumbel-kl-sign",
        TRAINER,
        "            loss = loss + c.kl_coef * kl\n",
        "            loss = loss - c.kl_coef * kl\n",
        TRAINER_TESTS,
        "Gumbel generator rewarded for KL",
    ),
    Mutant(
        "gumbel-tau",
        TRAINER,
        "logits[:, t].contiguous(), weight, self.tau(), c.straight_through",
        "logits[:, t].contiguous(), weight, 1.0, c.straight_through",
        TRAINER_TESTS,
        "Gumbel relaxation ignores tau",
    ),
    Mutant(
        "group-no-centre",
        GRPO,
        "advantages = groups - groups.mean(-1, keepdim=True)",
        "advantages = groups",
        TRAINER_TESTS,
        "group advantages not centred",
    ),
    Mutant(
        "group-batch-mean",
        GRPO,
        "advantages = groups - groups.mean(-1, keepdim=True)",
        "advantages = groups - groups.mean()",
        TRAINER_TESTS,
        "group advantages centred on the batch, not the group",
    ),
    Mutant(
        "grpo-kl-sign",
        GRPO,
        'kl_options = {"kl_coef": c.kl_coef, "kl_estimator": "k3"}',
        'kl_options = {"kl_coef": -c.kl_coef, "kl_estimator": "k3"}',
        TRAINER_TESTS,
        "GRPO's KL term with the wrong sign",
    ),
]


def copy_revision(rev: str, tests_rev: str, into: Path) -> None:
    """``rev``'s files (``tests_rev``'s tests/) and the built extension, into ``into``."""

    def extract(revision: str, *paths: str) -> None:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", revision, *paths], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)

    extract(rev)
    if tests_rev != rev:
        shutil.rmtree(into / "tests")
        extract(tests_rev, "tests")
    for so in (ROOT / "rlgaf_fast").glob("_C*.so"):
        shutil.copy2(so, into / "rlgaf_fast" / so.name)


def apply(copy: Path, m: Mutant) -> str:
    """Write ``m`` into ``copy``; returns the file's original text."""
    target = copy / m.path
    source = target.read_text()
    if source.count(m.old) != 1:
        raise SystemExit(
            f"mutant {m.name}: its line occurs {source.count(m.old)} times in {m.path}"
        )
    target.write_text(source.replace(m.old, m.new))
    return source


def run_tests(copy: Path, tests: tuple[str, ...], timeout: float) -> tuple[str, float, str]:
    """('passed' | 'failed' | 'timeout' | 'error', seconds, last lines of output)."""
    present = [t for t in tests if (copy / t).is_file()]
    if not present:
        return "passed", 0.0, "no covering test file"
    # No bytecode cache: a mutant of the same length written and restored within one second
    # would otherwise run from the other version's .pyc.
    env = {
        **os.environ,
        "PYTHONPATH": str(copy),
        "PYTHONDONTWRITEBYTECODE": "1",
        "RLGAF_FAST_EXPECT_CPP": "1",
    }
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-x",
                "-q",
                "-p",
                "no:cacheprovider",
                *DESELECT,
                *present,
            ],
            cwd=copy,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - start, ""
    seconds = time.perf_counter() - start
    output = proc.stdout + proc.stderr
    failed = [line for line in output.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    tail = "\n".join(failed[:1] + output.strip().splitlines()[-1:])
    # pytest: 0 all passed, 1 some failed; anything else (collection or usage error) is not a
    # verdict on the mutant.
    status = {0: "passed", 1: "failed"}.get(proc.returncode, "error")
    return status, seconds, tail


def first_failure(output: str) -> str:
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split(" ", 1)[1].split(" - ")[0]
    return ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", default="HEAD", help="revision whose code is mutated")
    parser.add_argument("--tests-rev", help="revision whose tests/ run (default --rev)")
    parser.add_argument("--only", action="append", help="run only this mutant (repeatable)")
    parser.add_argument("--label", help="name of the results files (default the tests' revision)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per mutant")
    parser.add_argument(
        "--check", action="store_true", help="only check that every mutant applies to --rev"
    )
    args = parser.parse_args()
    names = {m.name for m in MUTANTS}
    if len(names) != len(MUTANTS):
        raise SystemExit("two mutants share a name")
    unknown = set(args.only or ()) - names
    if unknown:
        raise SystemExit(f"--only: no mutant named {sorted(unknown)}; known: {sorted(names)}")
    tests_rev = args.tests_rev or args.rev
    resolve = ["git", "-C", str(ROOT), "rev-parse", "--short"]
    rev_id = subprocess.run([*resolve, args.rev], capture_output=True, text=True).stdout.strip()
    tests_id = subprocess.run([*resolve, tests_rev], capture_output=True, text=True).stdout.strip()
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    results = []
    with tempfile.TemporaryDirectory(prefix="rlgaf-mutation-") as tmp:
        copy = Path(tmp)
        copy_revision(args.rev, tests_rev, copy)
        if args.check:
            for m in chosen:
                (copy / m.path).write_text(apply(copy, m))
            print(f"all {len(chosen)} mutants apply to {rev_id}")
            return 0
        for tests in sorted({m.tests for m in chosen}):
            status, seconds, tail = run_tests(copy, tests, args.timeout)
            print(f"baseline {len(tests)} files: {status} ({seconds:.0f} s)", flush=True)
            if status != "passed":
                raise SystemExit(f"the unmutated copy does not pass {tests}:\n{tail}")
        for i, m in enumerate(chosen, 1):
            target = copy / m.path
            source = apply(copy, m)
            try:
                status, seconds, tail = run_tests(copy, m.tests, args.timeout)
            finally:
                target.write_text(source)
            verdict = {"failed": "killed", "timeout": "killed (timeout)"}.get(status, status)
            if status == "passed":
                verdict = "survived"
            results.append(
                {
                    **dataclasses.asdict(m),
                    "verdict": verdict,
                    "seconds": round(seconds, 1),
                    "caught_by": first_failure(tail),
                    "output": tail,
                }
            )
            print(
                f"[{i}/{len(chosen)}] {m.name}: {verdict} ({seconds:.0f} s) {first_failure(tail)}",
                flush=True,
            )
    killed = sum(r["verdict"].startswith("killed") for r in results)
    errors = sum(r["verdict"] == "error" for r in results)
    summary = {
        "code_revision": rev_id,
        "tests_revision": tests_id,
        "date": time.strftime("%Y-%m-%d"),
        "mutants": len(results),
        "killed": killed,
        "errors": errors,
        "score": round(killed / max(1, len(results) - errors), 3),
        "results": results,
    }
    out = ROOT / "benchmarks" / "results" / "mutation"
    out.mkdir(parents=True, exist_ok=True)
    label = args.label or f"tests-{tests_id}"
    (out / f"{label}.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = [
        f"Mutation check: code at {rev_id}, tests at {tests_id}, {summary['date']}: "
        f"{killed} of {len(results)} mutants killed ({100 * summary['score']:.0f}%)"
        + (f", {errors} not run (error)" if errors else "")
        + ".",
        "",
        "| mutant | file | fault | verdict | first failing test |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['name']} | {r['path']} | {r['what']} | {r['verdict']} | {r['caught_by']} |"
        )
    (out / f"{label}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
