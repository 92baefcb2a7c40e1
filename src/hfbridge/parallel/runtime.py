"""The runtime of a run on many processes: the process group and mesh before the model is loaded, one output
folder written by rank 0, the Trainer's strategy and checkpoint callback, one gathered copy of the model on rank 0
for scoring and saving. The pipeline (:mod:`hfbridge.recipe.pipeline`) calls these; ``None`` stands for a
single-process run without a mesh."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hfbridge.console import say
from hfbridge.io import atomic_dir
from hfbridge.parallel import checkpoint as ckpt
from hfbridge.parallel.launch import under_torchrun
from hfbridge.parallel.mesh import ParallelConfig, build_device_mesh

DEFAULT_SAVE_EVERY = 100
DEFAULT_KEEP_LAST = 3


@dataclass
class Job:
    """A running parallel fine-tuning job (one per process)."""

    rank: int
    world_size: int
    local_world_size: int
    mesh: Any
    config: ParallelConfig
    checkpoint_dir: Path | None
    save_every: int
    keep_last: int
    resume: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        torch.distributed.barrier()


def wanted(cfg) -> bool:
    """Whether a run config asks for the parallel path (under torchrun, a mesh, or checkpoints)."""
    return under_torchrun() or bool(cfg.parallel.sharding_axis_dims) or bool(cfg.checkpoint.dir)


def parallel_config(section) -> ParallelConfig:
    """The :class:`ParallelConfig` of a recipe's ``parallel`` section."""
    kwargs: dict[str, Any] = {"cpu_offload": bool(section.cpu_offload)}
    if section.sharding_axis_dims:
        kwargs["sharding_axis_dims"] = tuple(section.sharding_axis_dims)
    if section.sharding_axis_names:
        kwargs["sharding_axis_names"] = tuple(section.sharding_axis_names)
    if section.param_dtype:
        kwargs["param_dtype"] = section.param_dtype
    if section.reduce_dtype:
        kwargs["reduce_dtype"] = section.reduce_dtype
    return ParallelConfig(**kwargs)


def start(cfg) -> Job | None:
    """Join (or, for one process with checkpoints, create) the process group and build the mesh; ``None`` when the
    config asks for nothing parallel. Mesh sizes that do not fit the world size fail here, before any loading."""
    if not wanted(cfg):
        return None
    config = parallel_config(cfg.parallel)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cp = config.axis_sizes(world)["cp"]  # a clear error now if the sizes do not match the world
    if cp > 1:  # context parallelism: what it can split, checked before anything is loaded
        check_context_run(cfg, cp)
    if cfg.quantization.load_in_4bit and world > 1:
        check_quantized_run(cfg, config.axis_sizes(world))
    if not torch.distributed.is_initialized():
        use_cuda = torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if under_torchrun():
            torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
        else:  # one process: a group of one, so the same code path (and checkpoint format) applies
            torch.distributed.init_process_group(
                "nccl" if use_cuda else "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
            )
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = build_device_mesh(config, world, device_type)
    ck = cfg.checkpoint
    return Job(
        rank=torch.distributed.get_rank(), world_size=world,
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))), mesh=mesh, config=config,
        checkpoint_dir=Path(ck.dir) if ck.dir else None, save_every=ck.save_every or DEFAULT_SAVE_EVERY,
        keep_last=ck.keep_last or DEFAULT_KEEP_LAST, resume=bool(ck.resume),
    )


def check_context_run(cfg, cp: int) -> None:
    """Context parallelism splits the sequences of text fine-tuning (sft) under sdpa attention."""
    from hfbridge.parallel.context import ContextParallelError, check_attention

    if cfg.method.task != "text-generation" or cfg.method.name != "sft":
        raise ContextParallelError(
            f"context parallelism (cp={cp}) splits the sequences of text fine-tuning (method sft, task "
            f"text-generation), not {cfg.method.name!r} on {cfg.method.task!r}; use cp=1"
        )
    check_attention(cfg.model.attn_implementation, cp)


def check_quantized_run(cfg, sizes: dict[str, int]) -> None:
    """QLoRA on several processes: text fine-tuning (sft) over fsdp/dp, checked before anything is loaded (the
    4-bit base is replicated on every rank, the adapter sharded; see docs/distributed.md)."""
    from hfbridge.parallel.parallelize import QUANTIZED_NOT_SPLIT, UnsupportedParallelismError

    if cfg.method.task != "text-generation" or cfg.method.name != "sft":
        raise UnsupportedParallelismError(
            f"--load-in-4bit with several processes trains text fine-tuning (method sft, task text-generation), "
            f"not {cfg.method.name!r} on {cfg.method.task!r}; run it with one process"
        )
    if sizes["tp"] * sizes["sp"] > 1:
        raise UnsupportedParallelismError(
            f"--load-in-4bit with tensor/sequence parallelism (tp={sizes['tp']}, sp={sizes['sp']}) is not "
            f"supported: {QUANTIZED_NOT_SPLIT}, e.g. --sharding-axis-dims 1,-1,1,1"
        )
    if sizes["cp"] > 1:
        raise UnsupportedParallelismError(
            f"--load-in-4bit with context parallelism (cp={sizes['cp']}) is not supported: QLoRA trains over "
            "fsdp/dp, e.g. --sharding-axis-dims 1,-1,1,1"
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def output_dir(job: Job | None, output: str | Path, overwrite: bool) -> Iterator[Path]:
    """Rank 0 writes the (atomic) output folder; the other ranks get a scratch folder that is removed after."""
    if job is None or job.is_main:
        with atomic_dir(output, overwrite=overwrite) as work:
            yield work
            if job is not None:
                job.barrier()  # every rank has finished its part (gathers for saving) before the rename
        return
    scratch = Path(tempfile.mkdtemp(prefix="hfbridge-rank-"))
    try:
        yield scratch
        job.barrier()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def trainer_kwargs(job: Job | None) -> dict[str, Any]:
    """Strategy, devices, nodes and checkpoint callback for ``pl.Trainer`` (nothing without a job)."""
    if job is None:
        return {}
    from hfbridge.parallel.strategy import MeshParallelStrategy, ShardedCheckpoint

    kwargs: dict[str, Any] = {
        "strategy": MeshParallelStrategy(job.config, keep_last=job.keep_last),
        "accelerator": "cuda" if torch.cuda.is_available() else "cpu",
        "devices": job.local_world_size,
        "num_nodes": max(1, job.world_size // job.local_world_size),
    }
    if job.checkpoint_dir is not None:
        kwargs["callbacks"] = [ShardedCheckpoint(job.checkpoint_dir, job.save_every, job.keep_last)]
    return kwargs


def check_checkpoints(job: Job | None, identity: dict[str, Any]) -> None:
    """Refuse a checkpoint folder of another run (see :func:`checkpoint.check_run_identity`), then record this
    run's identity in it. Every rank checks (all fail together); rank 0 writes."""
    if job is None or job.checkpoint_dir is None:
        return
    ckpt.check_run_identity(job.checkpoint_dir, identity, job.resume)
    job.barrier()
    if job.is_main:
        ckpt.write_run_identity(job.checkpoint_dir, identity)
    job.barrier()


def data_parallel_size(job: Job | None) -> int:
    """How many ranks see different data (the global batch is this times the micro-batch)."""
    if job is None:
        return 1
    from hfbridge.parallel.mesh import mesh_layout

    return mesh_layout(job.mesh).data_parallel_size


def resume_path(job: Job | None) -> str | None:
    """The checkpoint folder to resume from, when ``--resume`` and it holds a complete checkpoint."""
    if job is None or not job.resume or job.checkpoint_dir is None:
        return None
    if not ckpt.complete_checkpoints(job.checkpoint_dir):
        say(f"--resume: no complete checkpoint in {job.checkpoint_dir} yet; starting from scratch")
        return None
    return str(job.checkpoint_dir)


def plain_model(job: Job | None, module):
    """The model to score, show and save: the module's own, or on a job one gathered unsharded copy on rank 0
    (``None`` on the other ranks). Every rank must call it (the gather is collective)."""
    if job is None:
        return module.model
    from hfbridge.parallel.export import gather_plain_model

    return gather_plain_model(module)


def finish(job: Job | None) -> None:
    if job is not None and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
