"""Run under ``torchrun`` by ``test_par_sharded_paths.py`` (through ``par_common.torchrun``): fit with a device mesh on
the sharded paths (the loss without full logits, 4-bit QLoRA, LoRA with tensor parallelism) and save what to compare.

    sharded_worker.py OUT "MODEL_DIR|DIMS|FLAGS" ...

Flags: ``lora`` (a LoRA transform), ``qlora`` (4-bit weights and LoRA), ``full-logits`` (``chunked_loss=False``).
Rank 0 writes ``result-TAG.pt``: the step losses, the first step's full gradients, the trainable weights after the
steps (gathered from their shards) and whether the loss ran without full logits.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
torch.set_num_threads(1)

from par_common import fit  # noqa: E402


@contextlib.contextmanager
def module_options(**options):
    """``par_common.fit`` builds ``hfbridge.HFAutoModelForCausalLM``; give it these extra arguments meanwhile."""
    import hfbridge

    original = hfbridge.HFAutoModelForCausalLM

    class Module(original):
        def __init__(self, **kwargs):
            super().__init__(**{**kwargs, **options})

    hfbridge.HFAutoModelForCausalLM = Module
    try:
        yield
    finally:
        hfbridge.HFAutoModelForCausalLM = original


def trainable_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable weights, whole (collective on a mesh: every rank calls it)."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            out[name] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
    return out


def run_job(job: str, world: int | None = None):
    """Fit one job (``MODEL_DIR|DIMS|FLAGS``; ``DIMS`` empty: one process) and return what the tests compare."""
    from hfbridge.parallel import ParallelConfig

    model_dir, dims_text, flags = (job.split("|") + ["", ""])[:3]
    options = {"chunked_loss": "full-logits" not in flags}
    if "qlora" in flags:
        options["load_in_4bit"] = True
    lora = "lora" in flags.split() or "qlora" in flags
    config, kwargs = None, {}
    if dims_text:
        config = ParallelConfig(sharding_axis_dims=tuple(int(d) for d in dims_text.split(",")))
        sizes = config.axis_sizes(world)
        kwargs = {"parallel": config, "devices": world, "dp_size": sizes["dp"] * sizes["fsdp"]}
    import lightning.pytorch as pl

    class Initial(pl.Callback):  # the trainable weights before the first step
        weights: dict = {}

        def on_train_start(self, trainer, pl_module):
            Initial.weights = trainable_weights(pl_module.model)

    with module_options(**options):
        recorder, module, _ = fit(model_dir, lora=lora, callbacks=[Initial()], **kwargs)
    split = module._head_split
    optimizer = module.trainer.optimizers[0]
    return {
        "losses": recorder.losses,
        "grads": recorder.grads,
        "initial": Initial.weights,
        "weights": trainable_weights(module.model),
        "chunked": bool(split is not None and split[2] is not None),
        "placements": {n: str(getattr(p, "placements", None)) for n, p in module.model.named_parameters()},
        "local_trainable": sum(_local(p).numel() for p in module.model.parameters() if p.requires_grad),
        "local_optimizer_state": sum(_local(v).numel() for state in optimizer.state.values() for v in state.values()
                                     if torch.is_tensor(v) and v.dim() > 0),
        "packed_4bit": sum(1 for p in module.model.parameters() if type(p).__name__ == "Params4bit"),
    }


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def vocab_parallel_check() -> dict:
    """The loss without full logits over a head split across the ranks (an uneven split: 7 rows over 2 ranks),
    against the full head in one process: loss, hidden-state gradient, head gradient, through ``linear_loss``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from hfbridge.losses import fused_linear_cross_entropy
    from hfbridge.models.chunked_loss import _vocab_shard, linear_loss

    world = int(os.environ["WORLD_SIZE"])
    mesh = init_device_mesh("cpu", (world,))
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 5, 8, generator=gen)
    weight, bias = torch.randn(7, 8, generator=gen), torch.randn(7, generator=gen)
    labels = torch.randint(0, 7, (2, 5), generator=gen)
    labels[0, :2] = -100
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, -1] = 0
    h_ref, w_ref, b_ref = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    ref = fused_linear_cross_entropy(h_ref, w_ref, labels, mask, chunk_size=3, bias=b_ref)
    ref.backward()
    head = torch.nn.Linear(8, 7)
    head.weight = torch.nn.Parameter(distribute_tensor(weight, mesh, [Shard(0)]))
    head.bias = torch.nn.Parameter(distribute_tensor(bias, mesh, [Shard(0)]))
    h = hidden.clone().requires_grad_()
    loss = linear_loss(h, head, labels, mask, chunk_size=3)
    loss.backward()
    return {"vocab_split": _vocab_shard(head.weight, head.bias) is not None, "loss": float(loss), "ref": float(ref),
            "grad_h": float((h.grad - h_ref.grad).abs().max()),
            "grad_w": float((head.weight.grad.full_tensor() - w_ref.grad).abs().max()),
            "grad_b": float((head.bias.grad.full_tensor() - b_ref.grad).abs().max())}


def main(out: Path, *jobs: str) -> None:
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    for job in jobs:
        result = vocab_parallel_check() if job == "vocab" else run_job(job, world)
        if rank == 0:
            tag = job.replace("/", "_").replace("|", "+")
            torch.save(result, out / f"result-{tag}.pt")
        torch.distributed.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])
