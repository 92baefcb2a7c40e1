"""Padding-free packing of image-text samples: each sample keeps its images, the model-level check decides, packed
rows give the logits, loss and gradients of the padded batch, and the CLI trains packed with the losses of padding."""

import csv
import dataclasses
import logging
from types import SimpleNamespace

import pytest
import torch
from image_text_helpers import IMAGE_TOKENS, chat, square

from hfbridge import HFAutoModelForImageTextToText, cli
from hfbridge.data.demo_image_text import shape_records
from hfbridge.data.image_text import ImageTextDataModule, image_text_packing_is_exact, pack_rows
from hfbridge.losses import IGNORE_INDEX, masked_cross_entropy

EXACT = ["llava", "idefics3", "paligemma"]


def _module_and_data(model_dir, records=None, batch_size=4, **kwargs):
    module = HFAutoModelForImageTextToText(model_name=str(model_dir))
    module.configure_model()
    dm = ImageTextDataModule(module.processor, records or shape_records(8, seed=3), batch_size=batch_size, **kwargs)
    dm.setup("fit")
    dm.trainer = SimpleNamespace(lightning_module=module, accumulate_grad_batches=1, strategy=None, global_rank=0,
                                 world_size=1)
    return module, dm


def _mixed_records():
    """Samples of different lengths and image counts (0, 1, 2), images of different colours."""
    red, green, blue = square((214, 39, 40)), square((44, 160, 44)), square((31, 119, 180))
    return [
        chat(("user", "<img>What colour?"), ("assistant", "red"), images=[red]),
        chat(("user", "<img><img>Colours of both, in order, please?"), ("assistant", "green and blue"),
             images=[green, blue]),
        chat(("user", "Say hi."), ("assistant", "hi")),
        chat(("user", "<img>Shape?"), ("assistant", "a square, clearly"), images=[blue]),
    ]


def test_packed_rows_lay_samples_end_to_end_and_keep_their_images_in_order(image_text_dirs):
    """Two rows of a packed llava batch, checked against each sample encoded alone: the same tokens and labels,
    positions restarting at every sample, and pixel_values in the order the rows hold the samples' image tokens."""
    module, dm = _module_and_data(image_text_dirs["llava"], _mixed_records())
    samples = dm.train_samples
    lengths = [s.length for s in samples]
    collator = dataclasses.replace(dm.packed_collator, pack_length=max(lengths) + 12)
    rows = collator.rows(samples)
    assert len(rows) < len(samples) and all(sum(lengths[i] for i in r) <= max(lengths) + 12 for r in rows)
    batch = collator(samples)
    assert "attention_mask" not in batch and batch["input_ids"].shape == (len(rows), max(
        sum(lengths[i] for i in r) for r in rows))
    images = []
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            alone = dm.collator([samples[i]])
            n = lengths[i]
            assert batch["input_ids"][r, at : at + n].tolist() == alone["input_ids"][0].tolist()
            assert batch["labels"][r, at : at + n].tolist() == alone["labels"][0].tolist()
            assert batch["position_ids"][r, at : at + n].tolist() == list(range(n))
            if "pixel_values" in alone:
                images.append(alone["pixel_values"])
            at += n
        assert (batch["labels"][r, at:] == IGNORE_INDEX).all() and batch["position_ids"][r, at:].tolist() == list(
            range(batch["input_ids"].shape[1] - at))
    assert torch.equal(batch["pixel_values"], torch.cat(images))  # 1 + 2 + 0 + 1 images, in row order
    image_id = module.processor.image_token_id
    assert int((batch["input_ids"] == image_id).sum()) == 4 * IMAGE_TOKENS["llava"]
    with pytest.raises(ValueError, match=r"row sizes \[1\] do not add up to the batch's 2 samples"):
        pack_rows(dm.collator(samples[:2]), [1], 0)


@pytest.mark.parametrize("family", EXACT)
def test_packed_batch_has_the_logits_loss_and_gradients_of_the_padded_batch(image_text_dirs, family, caplog):
    """Mixed samples (PaliGemma's processor needs an image in each, so it gets the one- and two-image ones) packed
    into two rows: the logits of every real token, the loss and every gradient equal the padded batch's."""
    records = _mixed_records()
    if family == "paligemma":
        records = [r for i, r in enumerate(records) if i != 2]
    module, dm = _module_and_data(image_text_dirs[family], records)
    with caplog.at_level(logging.INFO, logger="hfbridge.data.image_text"):
        assert dm.use_packing() is True
    assert "packing: on" in caplog.text and f"(model_type '{family}')" in caplog.text
    samples = dm.train_samples
    collator = dataclasses.replace(dm.packed_collator, pack_length=max(s.length for s in samples) + 12)
    packed, padded = collator(samples), dm.collator(samples)
    assert packed["input_ids"].shape[0] < len(samples) and "attention_mask" not in packed

    def run(batch):
        module.model.zero_grad()
        loss = module.training_step(dict(batch))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}
        with torch.no_grad():
            logits = module.forward(dict(batch)).logits
        return loss.detach(), grads, logits

    module.train()
    packed_loss, packed_grads, packed_logits = run(packed)
    padded_loss, padded_grads, padded_logits = run(padded)
    # the loss by hand: masked cross entropy of the padded logits, over every label token
    assert torch.allclose(padded_loss, masked_cross_entropy(padded_logits, padded["labels"]), atol=1e-5)
    assert torch.allclose(packed_loss, padded_loss, atol=1e-5)
    assert packed_grads.keys() == padded_grads.keys() and len(padded_grads) > 0
    for name, grad in padded_grads.items():
        assert torch.allclose(packed_grads[name], grad, atol=1e-5, rtol=1e-4), name
    rows = collator.rows(samples)
    lengths = padded["attention_mask"].sum(1).tolist()
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            err = (packed_logits[r, at : at + lengths[i]] - padded_logits[i, : lengths[i]]).abs().max()
            assert err < 1e-4, (family, i, float(err))
            at += lengths[i]


@pytest.mark.parametrize("family", ["gemma3", "mllama"])
def test_a_model_that_cannot_keep_samples_apart_falls_back_to_padding_and_says_why(image_text_dirs, family, caplog):
    module, dm = _module_and_data(image_text_dirs[family])
    why = {"gemma3": "the attention its token_type_ids set up (bidirectional over image tokens, or a prefix) is not "
                     "kept per sample in a packed row",
           "mllama": "the processor's 'cross_attention_mask' (shape [4, 23, 1, 1]) ties each padded row's tokens to "
                     "that row's images"}[family]
    with caplog.at_level(logging.INFO, logger="hfbridge.data.image_text"):
        assert dm.use_packing() is False
    name = {"gemma3": "Gemma3ForConditionalGeneration", "mllama": "MllamaForConditionalGeneration"}[family]
    assert f"packing: off, batches are padded ({name} (model_type '{family}'): {why}" in caplog.text
    assert "attention_mask" in next(iter(dm.train_dataloader()))
    with pytest.raises(ValueError, match=f"packing=True, but this model cannot be packed exactly: {name}"):
        _module_and_data(image_text_dirs[family], packing=True)[1].use_packing()
    if family == "gemma3":
        # Gemma 3's sliding-window layers look its image blocks up by a sample's restarting position: rows whose
        # samples are laid out alike hide it, so the check starts its row with a filler segment
        samples = dm.packing_probe()
        plain = dataclasses.replace(dm.packed_collator, one_row=True)
        module.eval()
        with torch.no_grad():
            packed, padded = module.forward(plain(samples)).logits, module.forward(dm.collator(samples)).logits
        n = samples[0].length
        assert all(s.length == n for s in samples)
        assert torch.allclose(packed[0, n : 2 * n], padded[1, :n], atol=1e-5)  # alike: no difference shows
        ok, _ = image_text_packing_is_exact(module.model, samples, dm.collator, dm.packed_collator,
                                           forward=lambda b: module.forward(b).logits)
        assert not ok


def test_packing_off_pads_and_bad_pack_length_is_refused(image_text_dirs):
    _, dm = _module_and_data(image_text_dirs["llava"], packing=False)
    assert dm.use_packing() is False and "attention_mask" in next(iter(dm.train_dataloader()))
    with pytest.raises(ValueError, match=r"pack_length \(32\) must be at least max_length \(64\)"):
        _module_and_data(image_text_dirs["llava"], max_length=64, pack_length=32)


def _losses(run) -> list[float]:
    with open(run / "metrics.csv") as f:
        return [float(row["train_loss"]) for row in csv.DictReader(f) if row.get("train_loss")]


def test_finetune_trains_packed_by_default_with_the_losses_of_padding(tmp_path, monkeypatch, caplog):
    """`hfbridge finetune --task image-text-to-text` on the tiny random default model: packing is on by default
    (the check passes for LLaVA) and four optimizer steps (two accumulated micro-batches each) give the losses of
    the same run padded."""
    monkeypatch.setenv("HFBRIDGE_CACHE", str(tmp_path / "cache"))
    args = ["finetune", "--task", "image-text-to-text", "--demo-train-size", "16", "--eval-samples", "1",
            "--max-new-tokens", "1", "--max-steps", "4", "--batch-size", "4", "--accumulate", "2",
            "--no-progress-bar"]
    with caplog.at_level(logging.INFO, logger="hfbridge.data.image_text"):
        assert cli.main([*args, "--output", str(tmp_path / "packed")]) == 0
    assert "packing: on (LlavaForConditionalGeneration (model_type 'llava')" in caplog.text
    assert cli.main([*args, "--output", str(tmp_path / "padded"), "--packing", "off"]) == 0
    packed, padded = _losses(tmp_path / "packed"), _losses(tmp_path / "padded")
    assert len(packed) == len(padded) == 4
    assert packed == pytest.approx(padded, abs=1e-5)
