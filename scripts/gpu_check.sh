#!/usr/bin/env bash
# First run on a GPU node: the card and torch/CUDA versions, the GPU tests (pytest -m gpu), the
# training and sampling benchmarks, and one markdown table against the targets of docs/benchmarks.md.
#
#   scripts/gpu_check.sh [--device cuda|cpu] [--preset paper|demo] [--out DIR]
#                        [--train-steps N] [--warmup N] [--sample-steps N]
#
# Defaults: --device cuda --preset paper --out results/gpu_check; training 20 timed steps after 5
# warm-up steps per network and style; sampling at the preset's DDIM steps (paper: 200), one
# 155-slice volume, then (on a GPU) compiled with 4 volumes together. At the paper preset this
# compiles four large networks: expect 20-40 minutes on an H100-class card.
# Writes DIR/gpu_check.md (the table, also printed) and DIR/*.log (every command's full output).
# Exit status: 0 when every command ran (a missed target is a "no" in the table, not a failure);
# 1 when a GPU test or a benchmark failed; 2 for a bad option or --device cuda without a GPU.
# Python: $PYTHON, else python (an activated virtual environment), else python3.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "error: $*" >&2; exit 2; }
device=cuda preset=paper out=results/gpu_check train_steps=20 warmup=5 sample_steps=""
while [ $# -gt 0 ]; do
  [ $# -ge 2 ] || die "$1 needs a value"
  case "$1" in
    --device) device=$2 ;;
    --preset) preset=$2 ;;
    --out) out=$2 ;;
    --train-steps) train_steps=$2 ;;
    --warmup) warmup=$2 ;;
    --sample-steps) sample_steps=$2 ;;
    *) die "unknown option $1 (options: --device, --preset, --out, --train-steps, --warmup, --sample-steps)" ;;
  esac
  shift 2
done
case "$device" in cuda|cpu) ;; *) die "--device must be cuda or cpu, got '$device'" ;; esac
case "$preset" in paper|demo) ;; *) die "--preset must be paper or demo, got '$preset'" ;; esac
for n in "$train_steps" "$warmup" ${sample_steps:+"$sample_steps"}; do
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "step counts must be positive integers, got '$n'"
done
PY=${PYTHON:-$(command -v python || command -v python3 || true)}
[ -n "$PY" ] || die "no python found (activate the virtual environment or set PYTHON)"

"$PY" scripts/gpu_check_report.py env --device "$device"  # exits 2 for cuda without a GPU
mkdir -p "$out"
rm -f "$out"/bench_sampling*.log "$out"/gpu_check.md
export GEM3D_DEVICE=$device
failed=0

step() {  # step NAME LOG CMD...: run CMD, its output to LOG; say how it went in one line
  local name=$1 log=$2
  shift 2
  local t0=$SECONDS
  if "$@" >"$log" 2>&1; then
    echo "$name: done in $((SECONDS - t0)) s (log $log)"
  else
    echo "$name: FAILED with status $? after $((SECONDS - t0)) s; last lines of $log:"
    tail -n 15 "$log" | sed 's/^/    /'
    failed=1
  fi
}

echo "== pytest -m gpu"
step "pytest -m gpu" "$out/pytest_gpu.log" "$PY" -m pytest -q -m gpu -rs -p no:cacheprovider tests
summary=$(tail -n 1 "$out/pytest_gpu.log")
if [[ "$summary" =~ skipped ]] && ! [[ "$summary" =~ (passed|failed|error) ]]; then
  echo "pytest -m gpu: ${summary%% skipped*} skipped, none run (no CUDA GPU visible): the GPU tests need a GPU"
else
  echo "pytest -m gpu: $summary"
fi

echo "== training benchmark (preset $preset, $device)"
step "bench_training" "$out/bench_training.log" "$PY" scripts/bench_training.py --preset "$preset" \
  --device "$device" --steps "$train_steps" --warmup "$warmup"

echo "== sampling benchmark (preset $preset, $device, 155 slices)"
steps_opt=(${sample_steps:+--steps "$sample_steps"})
step "bench_sampling" "$out/bench_sampling.log" "$PY" scripts/bench_sampling.py --preset "$preset" \
  --device "$device" --depth 155 "${steps_opt[@]}"
if [ "$device" = cuda ]; then  # compiling on the CPU takes minutes and says nothing about the GPU
  step "bench_sampling --compile" "$out/bench_sampling_compiled.log" "$PY" scripts/bench_sampling.py \
    --preset "$preset" --device "$device" --depth 155 --compile --volumes 4 "${steps_opt[@]}"
fi

echo "== table ($out/gpu_check.md)"
"$PY" scripts/gpu_check_report.py table --dir "$out" --device "$device" --preset "$preset"
exit $failed
