#!/usr/bin/env bash
# One-call check on a GPU machine (H100/H200; torch, triton and a C++ compiler preinstalled; no
# network): build the extension in place, run the GPU tests, a few fused training steps of the
# RLGAF trainer, a sweep of the Gumbel-Softmax row kernels' launch configuration, then the
# benchmark suite's GPU targets; everything lands under $OUT and a short summary table is
# printed last.
# Runs from the repository root without installing the package; finishes within 8 minutes.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh          # on the GPU machine
#   OUT=/tmp/x bash benchmarks/gpu_check.sh --cpu       # dry run of the python parts on a CPU
#
# Files written (at most 9): build.log, tests.log, row_config_sweep.{json,md},
# bench/results.json, bench/results.md, one bench/*.png, bench/bench.log and summary.txt (each
# stage's exit status, then the sweep's and the benchmark's tables). The script exits 1 if a stage failed: the build, a test, a training run, or a fused
# kernel of the benchmark (an error or a wrong result).
# Every stage has a time cap; a process that ignores the terminate signal is killed 10 s later.
# Set RLGAF_BENCH_COMMIT to the commit the tree was copied from (a copy without .git cannot say).
# Stage caps in seconds (each also shrinks to leave the later stages their share of the total
# GPU_CHECK_BUDGET_S, default 460): GPU_CHECK_BUILD_S (240), GPU_CHECK_TESTS_S (150),
# GPU_CHECK_TRAIN_S (30 per mode), GPU_CHECK_SWEEP_S (60), GPU_CHECK_BENCH_S (300). The benchmark runs fused and eager
# providers of every case before the torch.compile baselines, so a short stage loses those last.
set -o pipefail

CPU_DRY=0
case "${1:-}" in
  --cpu|--dry) CPU_DRY=1 ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--cpu|--dry]" >&2; exit 2 ;;
esac

cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)
OUT=${OUT:-$ROOT/benchmarks/results/gpu_check}
mkdir -p "$OUT/bench"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export MAX_JOBS=${MAX_JOBS:-16}
DEFAULT_BUDGET_S=460  # leave margin under the 8 minutes
BUDGET=${GPU_CHECK_BUDGET_S:-$DEFAULT_BUDGET_S}
DEADLINE=$((SECONDS + BUDGET))

# rlgaf_fast.kernels is the committed symlink rlgaf_fast/kernels -> ../kernels; a copy of the
# tree that dropped links gets it back here (removed again at exit if made here).
MADE_LINK=0
if [ ! -e rlgaf_fast/kernels ]; then
  ln -s ../kernels rlgaf_fast/kernels && MADE_LINK=1
fi
cleanup() { if [ "$MADE_LINK" = 1 ]; then rm -f rlgaf_fast/kernels; fi; }
trap cleanup EXIT

# stage_timeout CAP RESERVE: at most CAP seconds, and never eat into the time that the later
# stages need: RESERVE seconds of the default 460 s budget, scaled to GPU_CHECK_BUDGET_S (a fixed
# reserve under a smaller budget left the build 38 s on an H200, and it timed out).
stage_timeout() {
  local left=$((DEADLINE - SECONDS - $2 * BUDGET / DEFAULT_BUDGET_S))
  if [ "$left" -gt "$1" ]; then left=$1; fi
  if [ "$left" -lt 10 ]; then left=10; fi
  echo "$left"
}

banner() { echo; echo "=== $* ($(date +%T), ${SECONDS}s)"; }

STATUS=()  # one "stage: exit status N" line per stage, for summary.txt
FAILED=""  # the first stage that failed, for the exit status
record() {
  STATUS+=("$1: exit status $2${3:+ ($3)}")
  echo "${STATUS[-1]}"
  if [ "$2" != 0 ] && [ -z "$FAILED" ]; then FAILED=${STATUS[-1]}; fi
}

banner "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
  || echo "no nvidia-smi"
timeout -k 5 60 python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch',
torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"
timeout -k 5 60 python3 -c "import triton; print('triton', triton.__version__)" 2>/dev/null \
  || echo "no triton"

if [ "$CPU_DRY" = 1 ]; then
  banner "build (skipped in --cpu dry run)"
  echo "dry run: build skipped" > "$OUT/build.log"
else
  banner "build the extension in place (MAX_JOBS=$MAX_JOBS)"
  t=$(stage_timeout "${GPU_CHECK_BUILD_S:-240}" 250)
  timeout -k 10 "$t" python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1
  record build $? "timeout ${t}s"
  tail -n 5 "$OUT/build.log"
fi
timeout -k 5 120 python3 - <<'EOF'
import torch
try:
    import rlgaf_fast._C as ext
    print("rlgaf_fast._C:", ext.__file__)
except Exception as error:  # report and go on: the torch and triton backends still run
    print("rlgaf_fast._C not importable:", error)
import rlgaf_fast
print("available backends:", rlgaf_fast.available_backends())
EOF

banner "GPU tests (tests/ops)"
if [ "$CPU_DRY" = 1 ]; then
  timeout -k 10 120 python3 -m pytest -q --co tests/ops > "$OUT/tests.log" 2>&1
  record "tests (collected only)" $?
  tail -n 3 "$OUT/tests.log"
else
  t=$(stage_timeout "${GPU_CHECK_TESTS_S:-150}" 170)
  timeout -k 10 "$t" python3 -m pytest -q tests/ops -p no:cacheprovider > "$OUT/tests.log" 2>&1
  record tests $? "timeout ${t}s"
  tail -n 25 "$OUT/tests.log"
fi

banner "RLGAF trainer, fused kernels (tiny preset: ppo and gumbel, 20 steps each)"
# Console only (no file under $OUT); skipped where the image lacks the trainer's libraries.
if python3 -c "import transformers, accelerate, datasets" 2>/dev/null; then
  for mode in ppo gumbel; do
    t=$(stage_timeout "${GPU_CHECK_TRAIN_S:-30}" 110)
    timeout -k 10 "$t" python3 -m rlgaf_fast.cli train --preset tiny --mode "$mode" --fused \
      --steps 20 2>&1 | grep -v "it/s" | tail -n 3
    record "train $mode" "${PIPESTATUS[0]}" "timeout ${t}s"
  done
else
  echo "skipped: transformers, accelerate or datasets not installed"
fi

banner "launch configuration sweep of the Gumbel-Softmax row kernels"
if [ "$CPU_DRY" = 1 ]; then SWEEP_ARGS=(--device cpu); else SWEEP_ARGS=(); fi
t=$(stage_timeout "${GPU_CHECK_SWEEP_S:-60}" 120)
timeout -k 10 "$t" python3 benchmarks/row_config_sweep.py --out "$OUT" \
  --time-limit $((t > 30 ? t - 20 : t / 2)) "${SWEEP_ARGS[@]}" 2>&1 | tail -n 12
record sweep "${PIPESTATUS[0]}" "timeout ${t}s"

banner "benchmarks"
if [ "$CPU_DRY" = 1 ]; then
  BENCH_ARGS=(--tiny --device cpu --ops gumbel_softmax ppo_loss fused_linear_ppo_loss)
else
  BENCH_ARGS=(--goals)
fi
t=$(stage_timeout "${GPU_CHECK_BENCH_S:-300}" 10)
# the suite stops starting new runs at its own limit and writes after every run; timeout is
# the backstop
timeout -k 10 "$t" python3 -m rlgaf_fast.bench "${BENCH_ARGS[@]}" --out "$OUT/bench" \
  --max-plots 1 --no-progress --time-limit $((t > 60 ? t - 30 : t / 2)) \
  > "$OUT/bench/bench.log" 2>&1
status=$?
record benchmarks "$status" "timeout ${t}s"
[ "$status" = 0 ] || tail -n 40 "$OUT/bench/bench.log"

banner "summary"
printf '%s\n' "${STATUS[@]}" > "$OUT/summary.txt"
cat "$OUT/row_config_sweep.md" >> "$OUT/summary.txt" 2>/dev/null
timeout -k 5 60 python3 - "$OUT/bench/results.json" <<'EOF' >> "$OUT/summary.txt"
import json, sys
from rlgaf_fast.bench.cli import summary
try:
    doc = json.load(open(sys.argv[1]))
except (OSError, ValueError) as error:
    sys.exit(f"no benchmark results: {error}")
print(summary(doc))
EOF
cat "$OUT/summary.txt"
if [ -n "$FAILED" ]; then echo "FAILED: $FAILED"; exit 1; fi
