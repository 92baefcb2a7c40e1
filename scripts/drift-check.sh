#!/usr/bin/env bash
# Drift check: install the newest releases that pyproject.toml admits into their own venv (not .venv), print
# which differ from the lock, and run the whole test suite on them. A new release of transformers, peft,
# lightning, trl or torch is caught here, by a command, before a user meets it.
#   bash scripts/drift-check.sh [VENV_DIR] [pytest args...]     (default VENV_DIR: .venv-latest)
# Exit status: the suite's. When it passes, adopt the new set with `bash scripts/lock.sh --upgrade` and record
# the versions in docs/dependencies.md.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-latest}
shift || true
bash scripts/setup.sh --latest "$venv"
echo "== releases newer than the lock =="
"$venv/bin/python" - <<'PY'
import re
from importlib.metadata import distributions

locked = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", open("requirements.lock").read(), re.M))
locked = {k.lower().replace("_", "-"): v for k, v in locked.items()}
newer = []
for dist in distributions():
    name = dist.metadata["Name"].lower().replace("_", "-")
    if name in locked and locked[name] != dist.version:
        newer.append(f"  {name}: locked {locked[name]} -> installed {dist.version}")
print("\n".join(sorted(newer)) or "  none: the lock is the newest admitted set")
PY
HF_HUB_OFFLINE=1 "$venv/bin/python" -m pytest -q "$@"
