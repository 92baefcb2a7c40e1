"""Helpers for the vision-language tests: expected strings (written out, independent of the code), images, records."""

from PIL import Image

# the assistant turn as each family's chat template writes it: content and end-of-turn
ASSISTANT_TURN = {"llava": "{}<|im_end|>\n", "idefics3": " {}<end_of_utterance>\n", "gemma3": "{}<end_of_turn>\n",
                  "paligemma": "{}<eos>", "mllama": "{}<|eot_id|>"}
# image tokens each tiny model puts in input_ids per image
IMAGE_TOKENS = {"llava": 16, "idefics3": 4, "gemma3": 4, "paligemma": 16, "mllama": 1}
# families whose processor refuses a sample without an image (PaliGemma's)
NEEDS_AN_IMAGE = {"paligemma"}


def square(colour=(214, 39, 40), size=32):
    image = Image.new("RGB", (size, size), (240, 240, 240))
    image.paste(colour, (4, 4, size - 4, size - 4))
    return image


def chat(*turns, images=()):
    """A record from (role, content) pairs; "<img>" in a content string becomes an image part."""
    messages, k = [], 0
    for role, content in turns:
        if "<img>" in content:
            parts = []
            for i, piece in enumerate(content.split("<img>")):
                if i:
                    parts.append({"type": "image", "image": images[k]})
                    k += 1
                if piece:
                    parts.append({"type": "text", "text": piece})
            content = parts
        messages.append({"role": role, "content": content})
    return {"messages": messages}


GLOBAL_BATCH = 4


def fit_image_text(model_dir, *, parallel=None, devices: int = 1, dp_size: int = 1, steps: int = 3):
    """Full fine-tuning of a tiny VLM for a few optimizer steps on the shapes task (global batch GLOBAL_BATCH, two
    accumulated micro-batches); returns the step recorder (losses, first step's full gradients) and the module."""
    import lightning.pytorch as pl
    import torch
    from par_common import Recorder

    from hfbridge import HFAutoModelForImageTextToText, OptimizerConfig
    from hfbridge.data.demo_image_text import shape_records
    from hfbridge.data.image_text import ImageTextDataModule

    torch.manual_seed(0)
    module = HFAutoModelForImageTextToText(
        model_name=str(model_dir), optim=OptimizerConfig(lr=1e-2, warmup_steps=0, schedule="linear"), parallel=parallel,
    )
    dm = ImageTextDataModule(module.processor, shape_records(16, seed=3), batch_size=GLOBAL_BATCH // 2 // dp_size, seed=1)
    recorder = Recorder.make()
    kwargs = {}
    if parallel is not None:
        from hfbridge.parallel.strategy import MeshParallelStrategy

        kwargs = {"strategy": MeshParallelStrategy(parallel), "accelerator": "cpu", "devices": devices}
    trainer = pl.Trainer(
        max_steps=steps, accumulate_grad_batches=2, gradient_clip_val=1.0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder], num_sanity_val_steps=0, **kwargs,
    )
    trainer.fit(module, dm)
    return recorder, module
