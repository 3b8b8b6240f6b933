#!/usr/bin/env bash
# One-call check on a GPU machine (H100/H200; torch, triton and nvcc preinstalled; no network):
# build the extension in place, run the GPU tests, the CUDA self-check, a few fused training
# steps of the RLGAF trainer, then the benchmark suite's GPU targets; everything lands under $OUT and a short summary table is printed last.
# Runs from the repository root without installing the package; finishes within 8 minutes.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh          # on the GPU machine
#   OUT=/tmp/x bash benchmarks/gpu_check.sh --cpu       # dry run of the python parts on a CPU
#
# Files written (at most 8): build.log, tests.log, cuda_selfcheck.log, bench/results.json,
# bench/results.md, one bench/*.png, summary.txt, and bench/bench.log when
# the suite exits non-zero (an error, or a result that failed its check).
# Stage caps in seconds (each also shrinks to leave the later stages their share of the total
# GPU_CHECK_BUDGET_S, default 460): GPU_CHECK_BUILD_S (240), GPU_CHECK_TESTS_S (150),
# GPU_CHECK_SELFCHECK_S (60), GPU_CHECK_TRAIN_S (30 per mode), GPU_CHECK_BENCH_S (300). The benchmark runs fused and eager
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
DEADLINE=$((SECONDS + ${GPU_CHECK_BUDGET_S:-460}))  # leave margin under the 8 minutes

# rlgaf_fast.kernels is the top-level kernels/ folder mapped by setup.py's package_dir; without
# an install, a symlink gives the same import path (removed again at exit if made here).
MADE_LINK=0
if [ ! -e rlgaf_fast/kernels ]; then
  ln -s ../kernels rlgaf_fast/kernels && MADE_LINK=1
fi
cleanup() { if [ "$MADE_LINK" = 1 ]; then rm -f rlgaf_fast/kernels; fi; }
trap cleanup EXIT

# stage_timeout CAP RESERVE: at most CAP seconds, and never eat into RESERVE seconds that the
# later stages need.
stage_timeout() {
  local left=$((DEADLINE - SECONDS - $2))
  if [ "$left" -gt "$1" ]; then left=$1; fi
  if [ "$left" -lt 10 ]; then left=10; fi
  echo "$left"
}

banner() { echo; echo "=== $* ($(date +%T), ${SECONDS}s)"; }

banner "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
  || echo "no nvidia-smi"
python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"
python3 -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "no triton"

if [ "$CPU_DRY" = 1 ]; then
  banner "build (skipped in --cpu dry run)"
  echo "dry run: build skipped" > "$OUT/build.log"
else
  banner "build the extension in place (MAX_JOBS=$MAX_JOBS)"
  t=$(stage_timeout "${GPU_CHECK_BUILD_S:-240}" 250)
  timeout "$t" python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1
  echo "build exit status $? (timeout ${t}s); last lines:"
  tail -n 5 "$OUT/build.log"
fi
python3 - <<'EOF'
import torch
try:
    import rlgaf_fast._C as ext
    print("rlgaf_fast._C:", ext.__file__, "| built with CUDA:", ext.built_with_cuda())
except Exception as error:  # report and go on: the torch and triton backends still run
    print("rlgaf_fast._C not importable:", error)
import rlgaf_fast
print("available backends:", rlgaf_fast.available_backends())
EOF

banner "GPU tests (tests/ops)"
if [ "$CPU_DRY" = 1 ]; then
  timeout 120 python3 -m pytest -q --co tests/ops 2>&1 | tail -n 3 | tee "$OUT/tests.log"
else
  t=$(stage_timeout "${GPU_CHECK_TESTS_S:-150}" 170)
  timeout "$t" python3 -m pytest -q -x tests/ops -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" \
    | tail -n 25
  echo "tests exit status $? (timeout ${t}s)"
fi

if [ -f benchmarks/cuda_selfcheck.py ]; then
  banner "CUDA self-check"
  t=$(stage_timeout "${GPU_CHECK_SELFCHECK_S:-60}" 150)
  timeout "$t" python3 benchmarks/cuda_selfcheck.py 2>&1 | tee "$OUT/cuda_selfcheck.log" | tail -n 20
  echo "self-check exit status $? (timeout ${t}s)"
fi

banner "RLGAF trainer, fused kernels (tiny preset: ppo and gumbel, 20 steps each)"
# Console only (no file under $OUT); skipped where the image lacks the trainer's libraries.
if python3 -c "import transformers, accelerate, datasets" 2>/dev/null; then
  for mode in ppo gumbel; do
    t=$(stage_timeout "${GPU_CHECK_TRAIN_S:-30}" 110)
    timeout "$t" python3 -m rlgaf_fast.cli train --preset tiny --mode "$mode" --fused --steps 20 \
      2>&1 | grep -v "it/s" | tail -n 3
    echo "train $mode exit status $? (timeout ${t}s)"
  done
else
  echo "skipped: transformers, accelerate or datasets not installed"
fi

banner "benchmarks"
if [ "$CPU_DRY" = 1 ]; then
  BENCH_ARGS=(--tiny --device cpu --ops gumbel_softmax ppo_loss fused_linear_ppo_loss)
else
  BENCH_ARGS=(--goals)
fi
t=$(stage_timeout "${GPU_CHECK_BENCH_S:-300}" 10)
# the suite stops starting new runs at its own limit and writes after every run; timeout is
# the backstop
timeout "$t" python3 -m rlgaf_fast.bench "${BENCH_ARGS[@]}" --out "$OUT/bench" --max-plots 1 \
  --no-progress --time-limit $((t > 60 ? t - 30 : t / 2)) > "$OUT/bench/bench.log" 2>&1
status=$?
echo "bench exit status $status (timeout ${t}s)"
if [ "$status" = 0 ]; then
  rm -f "$OUT/bench/bench.log"  # its summary is printed below; keeps the file count at 8
else
  tail -n 40 "$OUT/bench/bench.log"
fi

banner "summary"
python3 - "$OUT/bench/results.json" <<'EOF' | tee "$OUT/summary.txt"
import json, sys
from rlgaf_fast.bench.cli import summary
try:
    doc = json.load(open(sys.argv[1]))
except (OSError, ValueError) as error:
    sys.exit(f"no benchmark results: {error}")
print(summary(doc))
EOF
