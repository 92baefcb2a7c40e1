"""``hfbridge finetune --nproc-per-node N ...`` starts ``torchrun`` for the user.

Under ``torchrun`` (``LOCAL_RANK`` set) the job runs in this process; otherwise, with ``--nproc-per-node``, the
same command line is handed to ``python -m torch.distributed.run ... -m hfbridge ...``, which starts one process
per device (``--standalone`` on one machine, or a c10d rendezvous with ``--nnodes``/``--rdzv-endpoint``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

from hfbridge.console import say


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def torchrun_command(argv: Sequence[str], nproc_per_node: int, nnodes: str | None = None,
                     rdzv_endpoint: str | None = None, rdzv_id: str | None = None) -> list[str]:
    """``python -m torch.distributed.run ... -m hfbridge <argv>`` (the same command line, run per process)."""
    if nproc_per_node < 1:
        raise ValueError(f"--nproc-per-node must be at least 1, got {nproc_per_node}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc_per_node)]
    if nnodes is not None or rdzv_endpoint is not None:
        if rdzv_endpoint is None:
            raise ValueError("--nnodes needs --rdzv-endpoint HOST:PORT (the address of one of the machines)")
        cmd += ["--nnodes", str(nnodes or 1), "--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint,
                "--rdzv-id", str(rdzv_id or "hfbridge")]
    else:
        cmd += ["--standalone"]
    return [*cmd, "-m", "hfbridge", *argv]


def maybe_launch(parallel, argv: Sequence[str]) -> int | None:
    """Start torchrun when ``parallel.nproc_per_node`` (a recipe's ``parallel`` section) is set outside it; returns
    its exit code, or ``None`` when this process should run the job itself."""
    nproc = parallel.nproc_per_node
    if nproc is None or under_torchrun():
        return None
    cmd = torchrun_command(list(argv), nproc, parallel.nnodes, parallel.rdzv_endpoint, parallel.rdzv_id)
    say(f"starting {nproc} processes: {' '.join(cmd)}")
    env = {**os.environ}
    if "OMP_NUM_THREADS" not in env:  # torchrun would set 1; give each process its share of the cores instead
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    return subprocess.run(cmd, env=env).returncode
