"""Run by ``test_image_text_fsdp.py`` under ``torchrun``: fit a tiny vision-language model over a device mesh (FSDP2
over every rank by default, or the ``(dp, fsdp, tp, sp)`` sizes given).

    image_text_fsdp_worker.py OUT MODEL_DIR [DIMS]
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
torch.set_num_threads(1)

from image_text_helpers import fit_image_text  # noqa: E402


def placements(model) -> dict[str, dict[str, str]]:
    """For each parameter, its placement on each named axis of its mesh (``{}``: a plain tensor)."""
    out = {}
    for name, p in model.named_parameters():
        mesh = getattr(p, "device_mesh", None)
        axes = mesh.mesh_dim_names or () if mesh is not None else ()
        out[name] = {axis: str(placement) for axis, placement in zip(axes, getattr(p, "placements", ()))}
    return out


def main(out: Path, model_dir: str, dims: str = "1,-1,1,1") -> None:
    from hfbridge.parallel import ParallelConfig

    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    config = ParallelConfig(sharding_axis_dims=tuple(int(d) for d in dims.split(",")))
    sizes = config.axis_sizes(world)
    recorder, module = fit_image_text(model_dir, parallel=config, devices=world, dp_size=sizes["dp"] * sizes["fsdp"])
    module.save_pretrained(out / "saved")  # consolidated: every rank gathers, rank 0 writes
    if rank == 0:
        torch.save({"grads": recorder.grads}, out / "grads.pt")
        (out / "losses.json").write_text(json.dumps(recorder.losses))
        (out / "placements.json").write_text(json.dumps(placements(module.model)))
    torch.distributed.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])
