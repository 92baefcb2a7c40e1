"""``hfbridge finetune --nproc-per-node N ...`` starts ``torchrun`` for the user, and the options of a parallel run.

Under ``torchrun`` (``LOCAL_RANK`` set) the job runs in this process; otherwise, with ``--nproc-per-node``, the
same command line is handed to ``python -m torch.distributed.run ... -m hfbridge ...``, which starts one process
per device (``--standalone`` on one machine, or a c10d rendezvous with ``--nnodes``/``--rdzv-endpoint``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence

LAUNCH_OPTIONS = ("nproc_per_node", "nnodes", "rdzv_endpoint", "rdzv_id")


def add_parallel_arguments(parser: argparse.ArgumentParser) -> None:
    """The parallelism, checkpoint and launch options (all default ``None``: left out, they change nothing)."""
    g = parser.add_argument_group("parallelism and checkpoints (see docs/distributed.md)")
    g.add_argument("--nproc-per-node", type=int, default=None,
                   help="start this many processes with torchrun (one per GPU, or CPU processes)")
    g.add_argument("--nnodes", default=None, help="machines in the job (torchrun --nnodes), with --rdzv-endpoint")
    g.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT of the rendezvous (multi-node)")
    g.add_argument("--rdzv-id", default=None, help="a job id shared by all machines (multi-node)")
    g.add_argument("--sharding-axis-dims", default=None,
                   help="sizes of the mesh axes, one may be -1 (inferred), e.g. 1,-1,2,1 (default: FSDP over all)")
    g.add_argument("--sharding-axis-names", default=None, help="the axes of --sharding-axis-dims (default dp,fsdp,tp,sp)")
    g.add_argument("--param-dtype", default=None, help="FSDP2 compute dtype of the parameters (e.g. bfloat16)")
    g.add_argument("--reduce-dtype", default=None, help="FSDP2 dtype of the gradient reduction (default float32)")
    g.add_argument("--cpu-offload", action="store_true", default=None,
                   help="keep sharded parameters, gradients and optimizer state in host memory")
    g.add_argument("--checkpoint-dir", default=None, help="save sharded checkpoints here (step-N folders, latest)")
    g.add_argument("--save-every", type=int, default=None, help="optimizer steps between checkpoints (default 100)")
    g.add_argument("--keep-last", type=int, default=None, help="complete checkpoints kept (default 3)")
    g.add_argument("--resume", action="store_true", default=None,
                   help="resume from the newest complete checkpoint in --checkpoint-dir (if there is one)")


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


def maybe_launch(args: argparse.Namespace, argv: Sequence[str]) -> int | None:
    """Start torchrun when ``--nproc-per-node`` is given outside it; returns its exit code, or ``None`` when this
    process should run the job itself."""
    nproc = getattr(args, "nproc_per_node", None)
    if nproc is None or under_torchrun():
        return None
    cmd = torchrun_command(list(argv), nproc, args.nnodes, args.rdzv_endpoint, args.rdzv_id)
    print(f"[hfbridge] starting {nproc} processes: {' '.join(cmd)}", flush=True)
    env = {**os.environ}
    if "OMP_NUM_THREADS" not in env:  # torchrun would set 1; give each process its share of the cores instead
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    return subprocess.run(cmd, env=env).returncode
