"""FSDP2 and tensor parallelism apply to vision-language models as to causal LMs: a tiny LLaVA trained with fsdp=2,
or tp=2, on two CPU processes (gloo) gives the losses and first-step gradients of one process on the same global
batch, and its consolidated ``save_pretrained`` folder loads in plain transformers with the logits of the
single-process model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from image_text_helpers import chat, fit_image_text, square
from transformers import AutoModelForImageTextToText

HERE = Path(__file__).parent
PARALLEL_TESTS = HERE.parent / "parallel"
sys.path.insert(0, str(PARALLEL_TESTS))  # par_common's step recorder (gathers sharded gradients)


def _probe(module_or_model, processor):
    from hfbridge.data.image_text import ImageTextDataModule

    records = [chat(("user", "<img>What colour is the shape?"), ("assistant", "red"), images=[square()])]
    dm = ImageTextDataModule(processor, records, batch_size=1)
    dm.setup()
    batch = dm.collator(dm.train_samples)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "num_label_tokens")}
    with torch.no_grad():
        return module_or_model.eval()(**inputs).logits


def _two_processes_equal_one(model_dir, out, dims: str):
    """Fit on two CPU processes (gloo) over the ``(dp, fsdp, tp, sp)`` sizes ``dims``, and check the step losses,
    the first step's gradients (vision tower, projector and language model) and the saved model's logits against
    one process on the same global batch. Returns each parameter's placements on the two-process mesh."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(HERE), str(PARALLEL_TESTS), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           str(HERE / "image_text_fsdp_worker.py"), str(out), str(model_dir), dims]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420)
    assert run.returncode == 0, f"torchrun failed:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"

    recorder, module = fit_image_text(model_dir)
    losses = json.loads((out / "losses.json").read_text())
    assert len(losses) == len(recorder.losses) == 3
    assert losses == pytest.approx(recorder.losses, abs=1e-5)
    assert losses[-1] < losses[0]

    grads = torch.load(out / "grads.pt")["grads"]
    assert set(grads) == set(recorder.grads) and any("vision_tower" in name for name in grads)
    for name, reference in recorder.grads.items():
        torch.testing.assert_close(grads[name], reference, atol=1e-5, rtol=1e-4, msg=name)

    saved = AutoModelForImageTextToText.from_pretrained(out / "saved")
    torch.testing.assert_close(_probe(saved, module.processor), _probe(module.model, module.processor),
                               atol=1e-5, rtol=1e-4)
    return json.loads((out / "placements.json").read_text())


def test_fsdp2_on_two_processes_equals_one_process(image_text_dirs, tmp_path):
    _two_processes_equal_one(image_text_dirs["llava"], tmp_path, "1,-1,1,1")


def test_tensor_parallel_on_two_processes_equals_one_process(image_text_dirs, tmp_path):
    """tp=2 with the plan transformers gives LLaVA (its language model's decoder and head, under
    ``model.language_model``): the decoder's projections are split over the two ranks, the vision tower and the
    projector are replicated on both, and losses, gradients and the saved model equal one process."""
    placements = _two_processes_equal_one(image_text_dirs["llava"], tmp_path, "1,1,2,1")
    # placement on the model-parallel axis of the mesh (hfbridge's "tp_sp"); None: not on that axis at all
    split = {name: next((p for axis, p in axes.items() if axis.startswith("tp")), None)
             for name, axes in placements.items()}
    assert split["model.language_model.layers.0.self_attn.q_proj.weight"] == "S(0)"  # column-wise
    assert split["model.language_model.layers.0.mlp.down_proj.weight"] == "S(1)"  # row-wise
    replicated = [name for name in placements if name.startswith(("model.vision_tower.", "model.multi_modal_projector."))]
    assert replicated and all(split[name] in (None, "R") for name in replicated)


def test_a_family_without_a_tensor_parallel_plan_is_named(image_text_dirs):
    """Mllama: transformers gives it no tp_plan and hfbridge has no built-in one, so tp > 1 is a clear error that
    names the family and says what to give (partition rules for its language model), before anything is split."""
    from hfbridge.parallel.plans import PlanError, resolve_plan

    model = AutoModelForImageTextToText.from_pretrained(image_text_dirs["mllama"])
    with pytest.raises(PlanError, match=r"(?s)MllamaForConditionalGeneration \(model_type 'mllama'\) has no "
                                        r"tensor-parallel plan.*model\.language_model.*vision tower.*replicated"):
        resolve_plan(model)


@pytest.mark.parametrize("family", ["llava", "idefics3", "gemma3", "paligemma", "mllama"])
def test_each_rank_can_read_its_shards_from_the_files_under_their_saved_names(image_text_dirs, family):
    """The files keep transformers' saved key names (``vision_tower.*`` for the module's ``model.vision_tower.*``):
    the sharded loading path maps every weight to its file key rather than falling back to a full broadcast."""
    from safetensors import safe_open

    from hfbridge.parallel.materialize import _file_keys

    model = AutoModelForImageTextToText.from_pretrained(image_text_dirs[family])
    in_files = set()
    for path in Path(image_text_dirs[family]).glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            in_files.update(f.keys())
    state = model.state_dict()
    mapping = _file_keys(model, in_files, state)
    tied = {name for name in state if name.endswith("lm_head.weight") and model.config.get_text_config().tie_word_embeddings}
    buffers = {name for name, _ in model.named_buffers()}
    assert set(state) - buffers - tied <= set(mapping)
    assert set(mapping.values()) <= in_files
    if family == "llava":  # the family whose saved names differ from its module's
        assert mapping["model.vision_tower.embeddings.class_embedding"] == "vision_tower.embeddings.class_embedding"
