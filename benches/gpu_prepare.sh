#!/usr/bin/env bash
# Here (no GPU needed): builds what a GPU session carries to the device machine. Its image
# has torch, cupy-cuda13x, transformers, peft, pytest, hypothesis, ml-dtypes and click, but
# no Rust and no bitsandbytes:
#   dist/       nybble's abi3 wheel (maturin build --release)
#   .gpu/bnb/   a trimmed bitsandbytes: its Python files and libbitsandbytes_cuda130.so
# Then, with the device tool:  carry ["dist", ".gpu"], command "bash benches/gpu_run.sh all"
set -euo pipefail
cd "$(dirname "$0")/.."

rm -rf dist
maturin build --release -o dist
bnb=$(python3 -c "import bitsandbytes, os; print(os.path.dirname(bitsandbytes.__file__))" 2>/dev/null | tail -n 1 || true)
rm -rf .gpu/bnb
if [ -n "$bnb" ] && [ -f "$bnb/libbitsandbytes_cuda130.so" ]; then
    mkdir -p .gpu/bnb
    # Python files and the one CUDA 13.0 library; the other builds (~120 MB) stay behind.
    (cd "$(dirname "$bnb")" && find bitsandbytes -name '*.py' -o -name 'libbitsandbytes_cuda130.so') |
        while read -r f; do mkdir -p ".gpu/bnb/$(dirname "$f")"; cp "$(dirname "$bnb")/$f" ".gpu/bnb/$f"; done
    echo "trimmed bitsandbytes: $(du -sh .gpu/bnb | cut -f1)"
else
    mkdir -p .gpu
    echo "bitsandbytes with libbitsandbytes_cuda130.so is not installed here: the GPU run compares against torch only"
fi
du -sh dist
