#!/usr/bin/env bash
# On the GPU machine (device tool), after benches/gpu_prepare.sh here:
#   bash benches/gpu_run.sh tests|kernels|finetune|all
# Installs the carried wheel (and trimmed bitsandbytes) into a private folder, then runs the
# GPU tests, the kernel benchmark and the fine-tuning benchmark; logs and results go to $OUT
# (at most 8 files come back). Each stage keeps going after a failure so one call reports all.
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
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, cupy, nybble; print('torch', torch.__version__, 'cupy', cupy.__version__, 'nybble', nybble.__file__)"
    python3 -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)" 2>&1 | tail -n 1
} > "$OUT/env.txt" 2>&1

if [ "$stage" = tests ] || [ "$stage" = all ]; then
    # -p no:cacheprovider: the repo copy may be read-only for caches; GPU-marked tests only.
    python3 -m pytest tests -m gpu -q -p no:cacheprovider --maxfail=20 > "$OUT/tests_gpu.log" 2>&1 || status=1
    tail -n 3 "$OUT/tests_gpu.log"
fi
if [ "$stage" = kernels ] || [ "$stage" = all ]; then
    python3 benches/bench_gpu.py --out "$OUT" > "$OUT/bench_gpu.log" 2>&1 || status=1
    tail -n 30 "$OUT/bench_gpu.log"
fi
if [ "$stage" = finetune ] || [ "$stage" = all ]; then
    python3 benches/bench_finetune.py --size 1b --json "$OUT/bench_finetune.json" > "$OUT/bench_finetune.log" 2>&1 || status=1
    tail -n 15 "$OUT/bench_finetune.log"
fi
exit $status
