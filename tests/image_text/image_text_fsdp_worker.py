"""Run by ``test_image_text_fsdp.py`` under ``torchrun``: fit a tiny vision-language model with FSDP2 over ``fsdp`` ranks.

    image_text_fsdp_worker.py OUT MODEL_DIR
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


def main(out: Path, model_dir: str) -> None:
    from hfbridge.parallel import ParallelConfig

    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    config = ParallelConfig(sharding_axis_dims=(1, -1, 1, 1))
    recorder, module = fit_image_text(model_dir, parallel=config, devices=world, dp_size=world)
    module.save_pretrained(out / "saved")  # consolidated: every rank gathers, rank 0 writes
    if rank == 0:
        torch.save({"grads": recorder.grads}, out / "grads.pt")
        (out / "losses.json").write_text(json.dumps(recorder.losses))
    torch.distributed.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
