"""Run by the parallel tests under ``torchrun``: fit with a device mesh and save what to compare.

    par_worker.py parity OUT "MODEL_DIR|DIMS|FLAGS" ...
    par_worker.py logged OUT "MODEL_DIR|DIMS|FLAGS" ...
    par_worker.py train OUT MODEL_DIR DIMS STEPS CKPT_DIR EVERY [resume] [stall-step=S] [stall-save=S]
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
torch.set_num_threads(1)

from par_common import fit, probe_ids  # noqa: E402


def parity(out: Path, *jobs: str) -> None:
    """Each job is ``MODEL_DIR|DIMS|FLAGS`` (flags: lora, ac, save, offload, bf16, lightning2d). Saves the step losses, the first step's full
    gradients, a sharded checkpoint, the logits of :func:`probe_ids`, and with ``save`` a consolidated
    ``save_pretrained`` folder."""
    import os

    from hfbridge.parallel import ParallelConfig

    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    results = {}
    for job in jobs:
        model_dir, dims_text, flags = (job.split("|") + [""])[:3]
        tag = job.replace("/", "_").replace("|", "+")
        config = ParallelConfig(sharding_axis_dims=tuple(int(d) for d in dims_text.split(",")),
                                cpu_offload="offload" in flags, param_dtype="bfloat16" if "bf16" in flags else None)
        sizes = config.axis_sizes(world)
        recorder, module, trainer = fit(model_dir, lora="lora" in flags, activation_checkpointing="ac" in flags,
                                        parallel=config, devices=world, dp_size=sizes["dp"] * sizes["fsdp"],
                                        lightning_2d="lightning2d" in flags)
        trainer.save_checkpoint(out / f"ck-{tag}" / "step-00000003")
        with torch.no_grad():
            module.model.eval()
            logits = module.model(input_ids=probe_ids()).logits
        if "save" in flags:
            module.save_pretrained(out / f"saved-{tag}", merged="lora" in flags)
        if rank == 0:
            torch.save({"grads": recorder.grads, "logits": logits}, out / f"result-{tag}.pt")
            results[job] = recorder.losses
        torch.distributed.barrier()
    if rank == 0:
        (out / "losses.json").write_text(json.dumps(results))


def logged(out: Path, *jobs: str) -> None:
    """Each job is ``MODEL_DIR|DIMS|FLAGS`` (flag ``plain``: a plain DataLoader instead of the data module). Saves the
    logged ``train_loss`` of every step and the first step's full gradients (``logged-TAG.pt``)."""
    import os

    from hfbridge.parallel import ParallelConfig

    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    for job in jobs:
        model_dir, dims_text, flags = (job.split("|") + [""])[:3]
        config = ParallelConfig(sharding_axis_dims=tuple(int(d) for d in dims_text.split(",")))
        sizes = config.axis_sizes(world)
        recorder, _, _ = fit(model_dir, parallel=config, devices=world, dp_size=sizes["dp"] * sizes["fsdp"],
                             plain_loader="plain" in flags)
        if rank == 0:
            tag = job.replace("/", "_").replace("|", "+")
            torch.save({"logged": recorder.logged, "grads": recorder.grads}, out / f"logged-{tag}.pt")
        torch.distributed.barrier()


def train(out: Path, model_dir: str, dims_text: str, steps: str, ckpt_dir: str, every: str, *flags: str) -> None:
    """Fit ``steps`` steps saving every ``every``; ``resume`` resumes from ``ckpt_dir``; ``stall-step=S`` hangs after
    optimizer step S, ``stall-save=S`` hangs inside the save of step S before it is complete (to be killed)."""
    import os
    import time

    import lightning.pytorch as pl

    from hfbridge.parallel import ParallelConfig
    from hfbridge.parallel import checkpoint as ckpt
    from hfbridge.parallel.strategy import ShardedCheckpoint

    options = dict(f.split("=", 1) for f in flags if "=" in f)
    world = int(os.environ["WORLD_SIZE"])
    config = ParallelConfig(sharding_axis_dims=tuple(int(d) for d in dims_text.split(",")))
    sizes = config.axis_sizes(world)

    def stall(marker: str) -> None:
        (out / marker).write_text("stalled\n")
        time.sleep(600)

    class Stall(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if str(trainer.global_step) == options.get("stall-step"):
                stall("stalled")

    if "stall-save" in options:
        original = ckpt.fsync_tree

        def fsync_then_stall(folder):
            original(folder)
            if folder.name == ckpt.step_dir_name(int(options["stall-save"])) + ckpt.TMP_SUFFIX:
                stall("stalled")

        ckpt.fsync_tree = fsync_then_stall
    callbacks = [ShardedCheckpoint(ckpt_dir, every_n_steps=int(every), keep_last=int(options.get("keep", 3))), Stall()]
    if "wrong-model" in options:  # resuming another model's checkpoint must fail clearly, on every rank
        try:
            fit(options["wrong-model"], parallel=config, devices=world, dp_size=sizes["dp"] * sizes["fsdp"],
                steps=int(steps), ckpt_path=ckpt_dir)
        except ckpt.CheckpointMismatchError as e:
            if os.environ["RANK"] == "0":
                (out / "mismatch.txt").write_text(str(e))
    fit(model_dir, parallel=config, devices=world, dp_size=sizes["dp"] * sizes["fsdp"], steps=int(steps),
        callbacks=callbacks, ckpt_path=ckpt_dir if "resume" in flags else None,
        log_path=out / ("losses-resumed.txt" if "resume" in flags else "losses.txt"))


if __name__ == "__main__":
    scenario, out, *rest = sys.argv[1:]
    {"parity": parity, "logged": logged, "train": train}[scenario](Path(out), *rest)
