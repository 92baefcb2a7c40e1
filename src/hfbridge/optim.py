"""Optimizer and learning-rate schedule: AdamW with warmup then cosine (or linear, or constant) decay."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class OptimizerConfig:
    """AdamW settings and the schedule.

    Args:
        lr: peak learning rate. ``None`` picks 2e-4 when only adapters train and 2e-5 for full fine-tuning.
        weight_decay: applied to weight matrices only (not biases, norms or embeddings' 1-D params).
        warmup_steps: linear warmup length; ``None`` uses ``warmup_ratio`` of the total steps.
        schedule: ``cosine`` (default), ``linear`` or ``constant`` after warmup.
        min_lr_ratio: the decay ends at ``lr * min_lr_ratio``.
        max_grad_norm: gradient clipping, read by hfbridge's trainers (Lightning: ``gradient_clip_val``).
    """

    lr: float | None = None
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int | None = None
    warmup_ratio: float = 0.05
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    max_grad_norm: float | None = 1.0

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


def default_lr(model: torch.nn.Module) -> float:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return 2e-4 if total and trainable < 0.5 * total else 2e-5


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def lr_lambda(step: int, total_steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float) -> float:
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    if schedule == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * factor


def fused_adamw(groups) -> bool:
    """Whether AdamW can run its fused kernel (one pass over each parameter, 8.7x faster than the per-tensor
    loop for the 135M embedded model on 2 CPU cores; transformers' Trainer defaults to it too): plain (not
    sharded) floating-point parameters, all on one CPU or CUDA device."""
    params = [p for g in groups for p in g["params"]]
    devices = {p.device for p in params}
    return (len(devices) == 1 and next(iter(devices)).type in ("cpu", "cuda")
            and all(type(p) is torch.nn.Parameter and p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                    for p in params))


def build_optimizer(model: torch.nn.Module, config: OptimizerConfig, total_steps: int):
    """AdamW over the trainable parameters and a per-step LambdaLR schedule."""
    groups = param_groups(model, config.weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    lr = config.lr if config.lr is not None else default_lr(model)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=config.betas, eps=config.eps, fused=fused_adamw(groups))
    total_steps = max(int(total_steps), 1)
    warmup = config.warmup_steps if config.warmup_steps is not None else int(config.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, total_steps, warmup, config.schedule, config.min_lr_ratio)
    )
    return optimizer, scheduler


def total_grad_norm(parameters: Iterable[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """The global norm of the gradients, over all ranks when they are sharded: DTensor gradients are grouped by
    mesh (FSDP-only and tensor-parallel parameters live on different meshes), each group's norm is made whole
    (``full_tensor``), then the groups' norms are combined; plain gradients are each rank's whole gradient."""
    groups: dict[int | None, list[torch.Tensor]] = {}
    for p in parameters:
        if p.grad is not None:
            mesh = getattr(p.grad, "device_mesh", None)
            groups.setdefault(id(mesh) if mesh is not None else None, []).append(p.grad)
    norms = []
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, norm_type)
        norms.append((norm.full_tensor() if hasattr(norm, "full_tensor") else norm).float())
    if not norms:
        return torch.tensor(0.0)
    if len(norms) == 1:
        return norms[0]
    return torch.nn.utils.get_total_norm([n.to(norms[0].device) for n in norms], norm_type)
