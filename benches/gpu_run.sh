#!/usr/bin/env bash
# On the GPU machine (device tool), after benches/gpu_prepare.sh here:
#   bash benches/gpu_run.sh tests|kernels|finetune|all
# Installs the carried wheel (and trimmed bitsandbytes) into a private folder, then runs the
# GPU tests, the kernel benchmark and the fine-tuning benchmark; logs and results go to $OUT
# (at most 8 files come back). Each stage keeps going after a failure so one call reports all,
# and each has a time limit (tests 180 s, kernels 210 s, finetune 60 s; override with
# NYBBLE_GPU_LIMITS="tests kernels finetune") so `all` ends within 8 minutes with the logs
# of whatever ran; stage times go to $OUT/env.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:-all}
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
site=/tmp/nybble-site
# What is tested is the carried wheel (this checkout's python/ is not on the path): reinstall
# every call so a machine still warm from an earlier call never runs a stale build.
rm -rf "$site"
python3 -m pip install --no-deps --quiet --target "$site" dist/nybble-*.whl || exit 1
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
missing=$(python3 -c "
import importlib.util as u
print(' '.join(m for m in ('torch', 'cupy', 'numpy', 'ml_dtypes', 'click', 'safetensors', 'transformers', 'peft',
                           'pytest', 'hypothesis') if u.find_spec(m) is None))")
if [ -n "$missing" ]; then
    echo "the GPU machine lacks: $missing (carry wheels for them)" >&2
    exit 1
fi
[ -d .gpu/bnb/bitsandbytes ] && export PYTHONPATH="$PYTHONPATH:$PWD/.gpu/bnb"
export HF_HUB_OFFLINE=1
status=0
read -r limit_tests limit_kernels limit_finetune <<< "${NYBBLE_GPU_LIMITS:-180 210 60}"
# SIGINT first: pytest and the benchmarks then still write their summaries / partial results.
limited() { local t=$1; shift; timeout -s INT -k 15 "$t" "$@"; }
stage_time() { echo "stage $1: $(( $(date +%s) - $2 )) s (limit $3 s)" >> "$OUT/env.txt"; }
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, cupy, nybble; print('torch', torch.__version__, 'cupy', cupy.__version__, 'nybble', nybble.__file__)"
    python3 -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)" 2>&1 | tail -n 1
} > "$OUT/env.txt" 2>&1

if [ "$stage" = tests ] || [ "$stage" = all ]; then
    # -p no:cacheprovider: the repo copy may be read-only for caches; GPU-marked tests only.
    t0=$(date +%s)
    limited "$limit_tests" python3 -m pytest tests -m gpu -q -p no:cacheprovider --maxfail=20 --durations=15 \
        > "$OUT/tests_gpu.log" 2>&1 || status=1
    stage_time tests "$t0" "$limit_tests"
    tail -n 3 "$OUT/tests_gpu.log"
fi
if [ "$stage" = kernels ] || [ "$stage" = all ]; then
    t0=$(date +%s)
    limited "$limit_kernels" python3 benches/bench_gpu.py --out "$OUT" > "$OUT/bench_gpu.log" 2>&1 || status=1
    stage_time kernels "$t0" "$limit_kernels"
    tail -n 30 "$OUT/bench_gpu.log"
fi
if [ "$stage" = finetune ] || [ "$stage" = all ]; then
    t0=$(date +%s)
    limited "$limit_finetune" python3 benches/bench_finetune.py --size 1b --json "$OUT/bench_finetune.json" \
        > "$OUT/bench_finetune.log" 2>&1 || status=1
    stage_time finetune "$t0" "$limit_finetune"
    tail -n 15 "$OUT/bench_finetune.log"
fi
exit $status
