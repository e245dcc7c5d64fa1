#!/usr/bin/env bash
# Here (no GPU needed): builds what a GPU session carries to the device machine, which has
# torch, cupy, transformers and peft but no Rust and no bitsandbytes.
#   dist/           nybble's abi3 wheel (maturin build --release)
#   .gpu/bnb/       a trimmed bitsandbytes: its Python files and libbitsandbytes_cuda130.so
#   .gpu/wheels/    Python 3.12 wheels of what the device lacks (nybble's ml_dtypes and
#                   click, pytest and hypothesis for the GPU tests)
# Then, with the device tool:  carry ["dist", ".gpu"], command "bash benches/gpu_run.sh all"
set -euo pipefail
cd "$(dirname "$0")/.."

rm -rf dist
maturin build --release -o dist
bnb=$(python3 -c "import bitsandbytes, os; print(os.path.dirname(bitsandbytes.__file__))" 2>/dev/null | tail -n 1)
rm -rf .gpu/bnb
if [ -n "$bnb" ] && [ -f "$bnb/libbitsandbytes_cuda130.so" ]; then
    mkdir -p .gpu/bnb
    # Python files and the one CUDA 13.0 library; the other builds (~120 MB) stay behind.
    (cd "$(dirname "$bnb")" && find bitsandbytes -name '*.py' -o -name 'libbitsandbytes_cuda130.so') |
        while read -r f; do mkdir -p ".gpu/bnb/$(dirname "$f")"; cp "$(dirname "$bnb")/$f" ".gpu/bnb/$f"; done
    echo "trimmed bitsandbytes: $(du -sh .gpu/bnb | cut -f1)"
else
    echo "bitsandbytes with libbitsandbytes_cuda130.so not installed here: the GPU run compares against torch only"
fi
rm -rf .gpu/wheels
python3 -m pip download --quiet --dest .gpu/wheels --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any ml_dtypes click pytest pluggy iniconfig hypothesis sortedcontainers attrs
du -sh dist .gpu/wheels
