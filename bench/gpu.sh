#!/usr/bin/env bash
# The GPU benchmark in one call (docs/benchmarks.md, "GPU benchmark"), from the repository root:
#   bash bench/gpu.sh                  # a machine with one NVIDIA GPU and the package registries: install, then measure
#   bash bench/gpu.sh --dry-run        # no install: the same code on CPU in .venv, tiny sizes (about a minute)
#   bash bench/gpu.sh --systems hfbridge-full,trl-full --rows-per-batch 4    # any bench/gpu_bench.py option
# The install (skipped when already done) makes .venv-gpu (or $HFBRIDGE_GPU_VENV) beside .venv:
#   1. the locked set, requirements.lock minus its CPU-only torch pin, every file checked against its hash;
#   2. torch 2.13.0, the locked version, as a CUDA build from PyTorch's wheel index: cu130 (CUDA 13.0, torch 2.13's
#      default build, the one PyPI's torch 2.13.0 depends on) when the driver supports CUDA 13, else cu128;
#      TORCH_CUDA=cu126 (say) chooses another;
#   3. liger-kernel (Liger's Triton kernels, used by both systems), then hfbridge itself, editable.
# Then bench/gpu_bench.py prints the table and writes it, with every figure, to runs/gpu-bench-<UTC time>.md and .json.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.13.0
LIGER_VERSION=0.8.5
UV_VERSION=0.13.9  # as scripts/lock.sh

die() { echo "bench/gpu.sh: error: $*" >&2; exit 2; }

dry_run=0
has_json=0
has_markdown=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=1 ;;
    --json|--json=*) has_json=1 ;;
    --markdown|--markdown=*) has_markdown=1 ;;
    -h|--help)
      sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
      echo
      exec "${PYTHON:-python3}" bench/gpu_bench.py --help ;;
  esac
done
# Where the report goes unless --json / --markdown say: new files in runs/ (made just before the measuring starts).
outputs=()
default_outputs() {
  if [ "$has_json" = 1 ] && [ "$has_markdown" = 1 ]; then return; fi
  mkdir -p runs
  local stamp
  stamp=$(date -u +%Y%m%dT%H%M%SZ)
  if [ "$has_json" = 0 ]; then outputs+=(--json "runs/gpu-bench-$stamp.json"); fi
  if [ "$has_markdown" = 0 ]; then outputs+=(--markdown "runs/gpu-bench-$stamp.md"); fi
}

if [ "$dry_run" = 1 ]; then
  python=${HFBRIDGE_PYTHON:-.venv/bin/python}
  [ -x "$python" ] || die "$python not found: run 'bash scripts/setup.sh' first (the dry run uses the CPU venv)"
  default_outputs
  exec env HF_HUB_OFFLINE=1 "$python" bench/gpu_bench.py "$@" ${outputs[@]+"${outputs[@]}"}
fi

command -v nvidia-smi >/dev/null || die "nvidia-smi not found: this needs a machine with an NVIDIA GPU and its driver (or pass --dry-run)"
driver_cuda=$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9][0-9.]*\).*/\1/p' | head -n 1)
[ -n "$driver_cuda" ] || die "nvidia-smi shows no GPU driver with a CUDA version"
cuda=${TORCH_CUDA:-}
if [ -z "$cuda" ]; then
  if [ "${driver_cuda%%.*}" -ge 13 ]; then cuda=cu130; else cuda=cu128; fi
fi
case "$cuda" in cu1[0-9][0-9]) ;; *) die "TORCH_CUDA=$cuda: expected a PyTorch CUDA tag such as cu130, cu128 or cu126" ;; esac

venv=${HFBRIDGE_GPU_VENV:-.venv-gpu}
start=$SECONDS
stamp_file="$venv/.hfbridge-gpu-installed"
want="torch==$TORCH_VERSION+$cuda liger-kernel==$LIGER_VERSION $(sha256sum requirements.lock | cut -c1-16)"
if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$want" ]; then
  echo "# $venv is installed ($want)"
else
  echo "# installing into $venv: locked set, torch $TORCH_VERSION+$cuda (driver: CUDA $driver_cuda), liger-kernel $LIGER_VERSION"
  PYTHON=${PYTHON:-}
  if [ -z "$PYTHON" ]; then
    PYTHON=$(command -v python3.11 || command -v python3 || true)
  fi
  [ -n "$PYTHON" ] || die "no python3 found (set PYTHON=/path/to/python3.11)"
  if [ ! -x "$venv/bin/python" ]; then
    "$PYTHON" -m venv "$venv" || die "'$PYTHON -m venv' failed: install the venv module (Debian, Ubuntu: apt-get install python3-venv, or python3.11-venv)"
  fi
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION"
  uv=("$venv/bin/uv" pip install --python "$venv/bin/python" --quiet)
  # 1. The lock without its +cpu pins (torch): a requirement starts at column 0; its hash and comment lines are
  #    indented, so dropping from a '+cpu' requirement to the next requirement drops exactly that entry.
  awk '/^[^ #]/ { skip = ($1 ~ /\+cpu$/) } !skip' requirements.lock > "$venv/requirements-gpu.lock"
  if grep -q '+cpu' "$venv/requirements-gpu.lock"; then die "a +cpu pin is left in $venv/requirements-gpu.lock"; fi
  py_version=$("$venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  if [ "$py_version" = 3.11 ]; then
    "${uv[@]}" --require-hashes --no-deps -r "$venv/requirements-gpu.lock"
  else
    # The hashes are of the CPython 3.11 wheels the lock was made for: same versions, other wheels.
    echo "# Python $py_version, not 3.11: the locked versions are installed without their hash check" >&2
    grep -v -- '--hash=' "$venv/requirements-gpu.lock" | sed 's/ *\\$//' > "$venv/requirements-gpu-nohash.lock"
    "${uv[@]}" --no-deps -r "$venv/requirements-gpu-nohash.lock"
  fi
  # 2. torch, pinned to the locked version and the chosen CUDA build; its CUDA libraries and Triton come with it
  #    (the rest of its dependencies are already there, at their locked versions).
  "${uv[@]}" "torch==$TORCH_VERSION+$cuda" --index-url "https://download.pytorch.org/whl/$cuda" \
    --extra-index-url https://pypi.org/simple --index-strategy unsafe-best-match
  # 3. Liger's kernels (they need only torch and Triton, both there), and hfbridge (its dependencies are the lock).
  "${uv[@]}" --no-deps "liger-kernel==$LIGER_VERSION"
  "${uv[@]}" --no-deps -e .
  "$venv/bin/python" -c "import torch, liger_kernel; assert torch.cuda.is_available(), 'torch sees no CUDA GPU'; \
print('# torch', torch.__version__, 'CUDA', torch.version.cuda, 'on', torch.cuda.get_device_name())"
  echo "$want" > "$stamp_file"
  echo "# installed in $((SECONDS - start)) s"
fi

measure=$SECONDS
default_outputs
HF_HUB_OFFLINE=1 "$venv/bin/python" bench/gpu_bench.py "$@" ${outputs[@]+"${outputs[@]}"}
echo "# measured in $((SECONDS - measure)) s; $((SECONDS - start)) s in all"
