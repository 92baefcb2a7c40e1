"""Shared by the parallel tests and the worker processes they start: tiny models, data, one fitting routine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent
WORKER = HERE / "par_worker.py"
GLOBAL_BATCH = 4
ACCUMULATE = 2
STEPS = 3


def records(n: int = 24) -> list[dict]:
    """Prompt/completion records of uneven lengths, so padding and token counts differ between micro-batches."""
    lengths = [1, 9, 2, 14, 3, 6, 1, 11, 5, 7, 2, 8]
    return [{"prompt": f"Q{i}: date {i}?", "completion": " ab" * lengths[i % len(lengths)] + f" {i}"} for i in range(n)]


class Recorder:
    """Lightning callback (built lazily so this module imports without Lightning): global step losses (from the
    returned micro-batch losses, and as the module logs them: ``train_loss``), and the full gradients of the first
    optimizer step (gathered from shards)."""

    @staticmethod
    def make(log_path=None):
        import lightning.pytorch as pl

        class _Recorder(pl.Callback):
            def __init__(self):
                self.losses: list[float] = []
                self.logged: list[float] = []
                self.steps: list[int] = []
                self.grads: dict[str, torch.Tensor] = {}
                self._sum = 0.0
                self._step = 0

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                self._sum += float(outputs["loss"])
                if trainer.global_step != self._step:  # this batch ended an optimizer step
                    total = torch.tensor(self._sum, dtype=torch.float64)
                    dp, group = pl_module._dp_size_and_group()
                    if dp > 1:
                        torch.distributed.all_reduce(total, group=group)
                    self.losses.append(float(total) / (dp * trainer.accumulate_grad_batches))
                    self.steps.append(trainer.global_step)
                    self.logged.append(float(trainer.callback_metrics.get("train_loss", float("nan"))))
                    self._sum, self._step = 0.0, trainer.global_step
                    if log_path is not None and trainer.global_rank == 0:
                        with open(log_path, "a") as f:
                            f.write(f"{trainer.global_step} {self.losses[-1]!r}\n")

            def on_train_start(self, trainer, pl_module):
                self._step = trainer.global_step

            def on_before_optimizer_step(self, trainer, pl_module, optimizer):
                if self.grads or trainer.global_step > 0:
                    return
                for name, p in pl_module.model.named_parameters():
                    if p.grad is None:
                        continue
                    g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                    self.grads[name] = g.detach().clone()

        return _Recorder()


def fit(model_dir, *, lora: bool = False, activation_checkpointing: bool = False, parallel=None, devices: int = 1,
        steps: int = STEPS, callbacks=(), ckpt_path=None, dp_size: int = 1, data=None, keep_last=None,
        log_path=None, lightning_2d: bool = False, plain_loader: bool = False):
    """Fit a few steps; the global batch is GLOBAL_BATCH whatever the number of data-parallel ranks. With
    ``plain_loader`` the batches come from a plain ``DataLoader`` (no ``num_label_tokens``), which Lightning shards
    over the data-parallel ranks."""
    import lightning.pytorch as pl

    from hfbridge import CausalLMDataModule, HFAutoModelForCausalLM, OptimizerConfig

    transform = None
    if lora:
        from hfbridge import LoRA

        transform = LoRA(r=4, alpha=8, dropout=0.0)
    torch.manual_seed(0)
    module = HFAutoModelForCausalLM(
        model_name=str(model_dir), model_transform=transform, activation_checkpointing=activation_checkpointing,
        optim=OptimizerConfig(lr=1e-2, warmup_steps=0, schedule="linear"), parallel=parallel,
    )
    dm = CausalLMDataModule(module.tokenizer, data or records(), batch_size=GLOBAL_BATCH // dp_size, seed=1,
                            packing=False)
    recorder = Recorder.make(log_path)
    kwargs = {}
    if parallel is not None:
        from hfbridge.parallel.strategy import MeshParallelStrategy

        strategy = MeshParallelStrategy(parallel, keep_last=keep_last)
        if lightning_2d:  # Lightning's own 2-D strategy: (data_parallel, tensor_parallel) read as fsdp x tp
            from lightning.pytorch.strategies import ModelParallelStrategy

            sizes = parallel.axis_sizes(devices)
            strategy = ModelParallelStrategy(data_parallel_size=sizes["fsdp"], tensor_parallel_size=sizes["tp"])
        kwargs = {"strategy": strategy, "accelerator": "cpu", "devices": devices}
    trainer = pl.Trainer(
        max_steps=steps, accumulate_grad_batches=ACCUMULATE, gradient_clip_val=1.0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[recorder, *callbacks], num_sanity_val_steps=0, **kwargs,
    )
    if plain_loader:  # on several processes Lightning shards it with a DistributedSampler (shuffled, seed 0)
        from torch.utils.data import DataLoader, DistributedSampler

        dm.setup("fit")
        sampler = None if devices > 1 else DistributedSampler(dm.train_samples, num_replicas=1, rank=0)  # same order
        dm = DataLoader(dm.train_samples, batch_size=dm.batch_size, collate_fn=dm.collator, sampler=sampler)
    trainer.fit(module, dm, ckpt_path=ckpt_path)
    return recorder, module, trainer


def probe_ids() -> torch.Tensor:
    """A fixed batch to compare logits on (the sequence length is odd on purpose)."""
    return torch.arange(2 * 9).reshape(2, 9) * 7 % 300 + 5


def torchrun(nproc: int, *args: str, timeout: int = 240, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``par_worker.py`` under ``torchrun`` on ``nproc`` CPU processes (gloo)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone",
           str(WORKER), *args]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"torchrun failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}")
    return result
