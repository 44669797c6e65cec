#!/usr/bin/env bash
# Build the llama.cpp peer (llama-cpp-python[server]) into its own cached venv:
#   ~/.cache/berth/peers/llama-cpp-python-<ver>/venv
# Reproducible and cached by version: a finished build leaves a .built marker and is reused.
#
# Flags: GGML_NATIVE=OFF with AVX/AVX2/FMA/F16C explicitly on. Native (-march=native) builds died
# with "illegal instruction" on these VMs (the guest CPU flags and the host's differ), so the
# build names the instruction sets it uses instead of asking the compiler to probe.
#
# Usage: bench/peers/build_llama_cpp.sh [VERSION]   (env: LLAMA_CPP_PYTHON_VERSION, PYTHON, JOBS)
set -euo pipefail
VER="${1:-${LLAMA_CPP_PYTHON_VERSION:-0.3.16}}"
PY="${PYTHON:-python3.11}"
ROOT="${BERTH_PEERS_DIR:-$HOME/.cache/berth/peers}/llama-cpp-python-$VER"
VENV="$ROOT/venv"
if [[ -f "$ROOT/.built" ]]; then
  echo "cached: $VENV"; exit 0
fi
mkdir -p "$ROOT"
exec 9>"$ROOT/.lock"
flock -n 9 || { echo "another build of $VER is running (lock $ROOT/.lock)"; exit 1; }
rm -rf "$VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip wheel
export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
 -DGGML_AVX512=OFF -DGGML_BLAS=OFF -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_OPENMP=ON \
 -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF"
export CMAKE_BUILD_PARALLEL_LEVEL="${JOBS:-2}"
export FORCE_CMAKE=1
echo "building llama-cpp-python[server]==$VER with CMAKE_ARGS=$CMAKE_ARGS"
"$VENV/bin/pip" install --no-binary llama-cpp-python --no-cache-dir -v "llama-cpp-python[server]==$VER" \
  >"$ROOT/build.log" 2>&1 || { tail -50 "$ROOT/build.log"; exit 1; }
"$VENV/bin/python" -c "import llama_cpp, llama_cpp.server; print('llama_cpp', llama_cpp.__version__)"
{ echo "version=$VER"; echo "cmake_args=$CMAKE_ARGS"; date -u +built=%FT%TZ; } >"$ROOT/.built"
echo "built: $VENV"
