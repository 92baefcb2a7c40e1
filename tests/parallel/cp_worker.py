"""Run by test_par_cp.py under ``torchrun``: fit with a ``cp`` mesh axis, padded or packed batches, and save the step
losses, the first step's full gradients and the trained weights (``cp-TAG.pt`` on rank 0).

    cp_worker.py OUT "MODEL_DIR|DIMS|FLAGS" ...      (flags: packed, ac)

Also imported by the test for the single-process references (:func:`fit_cp` without a mesh).
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).parent
PACK_LENGTH = 64


def fit_cp(model_dir, parallel=None, devices: int = 1, packed: bool = False, ac: bool = False):
    """``par_common.fit``'s run (same data, batch, optimizer, clipping, accumulation), with packing as asked."""
    import lightning.pytorch as pl
    from par_common import ACCUMULATE, GLOBAL_BATCH, STEPS, Recorder, records

    from hfbridge import CausalLMDataModule, HFAutoModelForCausalLM, OptimizerConfig

    torch.manual_seed(0)
    module = HFAutoModelForCausalLM(model_name=str(model_dir), activation_checkpointing=ac, parallel=parallel,
                                    optim=OptimizerConfig(lr=1e-2, warmup_steps=0, schedule="linear"))
    dp_size = 1
    kwargs = {}
    if parallel is not None:
        from hfbridge.parallel.strategy import MeshParallelStrategy

        sizes = parallel.axis_sizes(devices)
        dp_size = sizes["dp"] * sizes["fsdp"]
        kwargs = {"strategy": MeshParallelStrategy(parallel), "accelerator": "cpu", "devices": devices}
    dm = CausalLMDataModule(module.tokenizer, records(), batch_size=GLOBAL_BATCH // dp_size, seed=1, packing=packed,
                            pack_length=PACK_LENGTH if packed else None)
    recorder = Recorder.make()
    trainer = pl.Trainer(
        max_steps=STEPS, accumulate_grad_batches=ACCUMULATE, gradient_clip_val=1.0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[recorder], num_sanity_val_steps=0, **kwargs,
    )
    trainer.fit(module, dm)
    assert dm.use_packing() == packed
    return recorder, module


def full_weights(model) -> dict[str, torch.Tensor]:
    """Every parameter, whole (a collective on a mesh: every rank calls it)."""
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for name, p in model.named_parameters()}


def main(out: Path, *jobs: str) -> None:
    from hfbridge.parallel import ParallelConfig, context

    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    blockwise = context.causal_blocks_attention
    calls = []

    def counted(*args, **kwargs):  # which attention path the split rows took
        calls.append(1)
        return blockwise(*args, **kwargs)

    context.causal_blocks_attention = counted
    for job in jobs:
        calls.clear()
        model_dir, dims, flags = (job.split("|") + [""])[:3]
        config = ParallelConfig(sharding_axis_dims=tuple(int(d) for d in dims.split(",")))
        recorder, module = fit_cp(model_dir, config, world, packed="packed" in flags, ac="ac" in flags)
        weights = full_weights(module.model)
        if rank == 0:
            torch.save({"losses": recorder.losses, "logged": recorder.logged, "grads": recorder.grads,
                        "weights": weights, "blockwise_calls": len(calls)}, out / f"cp-{tag(job)}.pt")
        torch.distributed.barrier()


def tag(job: str) -> str:
    return job.replace("/", "_").replace("|", "+").replace(" ", "_")


def torchrun(nproc: int, out: Path, *jobs: str, timeout: int = 300) -> None:
    """Run this worker on ``nproc`` CPU processes (gloo)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone",
           str(Path(__file__)), str(out), *jobs]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"torchrun failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}")


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    main(Path(sys.argv[1]), *sys.argv[2:])
