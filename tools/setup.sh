#!/usr/bin/env bash
# Creates the project's virtual environment and installs everything moed and
# its tests need. Safe to run again: it skips what is already done.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
LLAMA_CPP_VERSION=0.3.36

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
stamp="$VENV/.moed-setup-$(cat pyproject.toml tools/setup.sh | sha256sum | cut -c1-16)"
[ -f "$stamp" ] && exit 0

pip install --quiet --upgrade pip
# torch first: the CPU wheel where one is on local disk, else whatever pip finds.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    pip install --quiet torch==2.13.0 || pip install --quiet torch
fi
# llama.cpp reference, built with CPU options only (pip caches the wheel).
if ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
-DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
        pip install --quiet "llama-cpp-python==$LLAMA_CPP_VERSION"
fi
pip install --quiet -e ".[test]"
rm -f "$VENV"/.moed-setup-*
touch "$stamp"
