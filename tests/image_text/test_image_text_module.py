"""HFAutoModelForImageTextToText on tiny random models of three families: loss, training, saving, generation."""

import importlib.util
import json
import math

import lightning.pytorch as pl
import pytest
import torch
from image_text_helpers import NEEDS_AN_IMAGE, chat, square
from transformers import AutoModelForImageTextToText, AutoProcessor

import hfbridge
from hfbridge import HFAutoModelForImageTextToText, LoRA, OptimizerConfig, masked_cross_entropy
from hfbridge.data.demo_image_text import shape_records
from hfbridge.data.formats import DataFormatError
from hfbridge.data.image_text import ImageTextDataModule, load_image_text_records, prompt_and_reference
from hfbridge.generation import generate_image_text as generate
from hfbridge.losses import IGNORE_INDEX

RED, BLUE = (214, 39, 40), (31, 119, 180)


def _module(model_dir, **kwargs):
    module = HFAutoModelForImageTextToText(model_name=str(model_dir), **kwargs)
    module.configure_model()
    return module


def _batch(module, records):
    dm = ImageTextDataModule(module.processor, records, batch_size=len(records))
    dm.setup()
    return dm.collator(dm.train_samples)


def _colour_records():
    return [chat(("user", "<img>What colour is the shape?"), ("assistant", name), images=[square(rgb)])
            for name, rgb in (("red", RED), ("blue", BLUE))]


def test_importable_from_hfbridge_with_the_seed_api():
    assert hfbridge.HFAutoModelForImageTextToText is HFAutoModelForImageTextToText
    module = HFAutoModelForImageTextToText(model_name="x", load_in_4bit=False)
    for name in ("model_name", "_processor", "model", "loss_fn", "load_pretrained_weights", "is_hf_model",
                 "model_transform", "trust_remote_code", "load_in_4bit"):
        assert hasattr(module, name), name
    assert module.loss_fn is masked_cross_entropy and module.default_dtype == "auto"


def test_training_step_loss_is_the_masked_loss_of_shifted_labels(image_text_dir):
    """The module's loss equals masked_cross_entropy on the model's logits, and equals the model's own loss given
    unshifted labels (transformers shifts them itself): the labels are shifted once, the same tokens counted."""
    module = _module(image_text_dir)
    batch = _batch(module, shape_records(4, seed=1))
    loss = module.training_step(dict(batch))
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "num_label_tokens")}
    reference = AutoModelForImageTextToText.from_pretrained(image_text_dir)
    with torch.no_grad():
        logits = reference(**inputs).logits
        unshifted = torch.cat([torch.full_like(batch["labels"][:, :1], IGNORE_INDEX), batch["labels"][:, :-1]], 1)
        hf_loss = reference(**inputs, labels=unshifted).loss
    assert torch.allclose(loss, masked_cross_entropy(logits, batch["labels"]), atol=1e-5)
    assert torch.allclose(loss, hf_loss, atol=1e-5)


def _train_on_colours(module, steps: int, lr: float) -> list[float]:
    """AdamW on the trainable parameters, on one batch of the two colour records; the step losses."""
    batch = _batch(module, _colour_records())
    optimizer = torch.optim.AdamW([p for p in module.model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = module.training_step(dict(batch))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_loss_falls_and_the_model_answers_after_training(image_text_dir):
    torch.manual_seed(0)
    module = _module(image_text_dir)
    losses = _train_on_colours(module, steps=40, lr=3e-3)
    assert losses[-1] < 0.2 * losses[0], losses
    prompts = [prompt_and_reference(r)[0] for r in load_image_text_records(_colour_records())]
    # the answer, and then the end-of-turn token (learned, so generation stops)
    assert generate(module.model, module.processor, prompts, max_new_tokens=8) == ["red", "blue"]


def test_save_then_reload_with_plain_transformers_gives_the_same_logits(image_text_dir, tmp_path):
    module = _module(image_text_dir)
    records = shape_records(3, seed=2)
    batch = _batch(module, records)
    module.training_step(dict(batch)).backward()
    with torch.no_grad():
        for p in module.model.parameters():  # a step away from the saved random weights
            p.add_(0.01 * torch.randn_like(p))
    module.save_pretrained(tmp_path / "saved")
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "saved").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "saved")
    reloaded = ImageTextDataModule(processor, records, batch_size=3)
    reloaded.setup()
    batch2 = reloaded.collator(reloaded.train_samples)
    assert torch.equal(batch["input_ids"], batch2["input_ids"]) and torch.equal(batch["labels"], batch2["labels"])
    module.model.eval()
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "num_label_tokens")}
        assert torch.allclose(module.model(**inputs).logits, model(**inputs).logits, atol=1e-6)


def test_batched_generation_equals_one_at_a_time(image_text_dir, family):
    module = _module(image_text_dir)
    prompts = [prompt_and_reference(r)[0] for r in load_image_text_records(shape_records(4, seed=3))]
    prompts.append(load_image_text_records([chat(("user", "Hello"), ("assistant", "x"))])[0])  # no image
    prompts[-1] = prompt_and_reference(prompts[-1])[0]
    if family in NEEDS_AN_IMAGE:  # its processor refuses a prompt without an image: named, not misplaced
        with pytest.raises(DataFormatError, match="record 0: PaliGemmaProcessor needs an image in every sample"):
            generate(module.model, module.processor, prompts, max_new_tokens=5, batch_size=5)
        prompts.pop()
    batched = generate(module.model, module.processor, prompts, max_new_tokens=5, batch_size=5)
    alone = [generate(module.model, module.processor, [p], max_new_tokens=5)[0] for p in prompts]
    assert batched == alone


def test_validation_step_logs_the_token_weighted_val_loss(image_text_dirs):
    module = HFAutoModelForImageTextToText(model_name=str(image_text_dirs["llava"]))
    val = shape_records(5, seed=4)
    dm = ImageTextDataModule(module.processor, shape_records(4), val_data=val, batch_size=2)
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_train_batches=0)
    trainer.validate(module, dm)
    logged = float(trainer.callback_metrics["val_loss"])
    # reference: the sum of token losses over the whole validation set, divided by its number of label tokens
    batch = _batch(module, val)
    with torch.no_grad():
        logits = module.model(**{k: v for k, v in batch.items() if k not in ("labels", "num_label_tokens")}).logits
    assert logged == pytest.approx(float(masked_cross_entropy(logits, batch["labels"])), rel=1e-5)


def test_trainer_fit_with_gradient_accumulation_matches_one_large_batch(image_text_dirs):
    """Per-token normalisation over the optimizer step holds for image batches: 2 micro-batches of 2 give the
    gradients of one batch of 4."""

    class Capture(pl.Callback):
        grads = None

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            Capture.grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}

    records = shape_records(4, seed=5)
    grads = []
    for batch_size, accumulate in ((4, 1), (2, 2)):
        module = HFAutoModelForImageTextToText(model_name=str(image_text_dirs["idefics3"]),
                                               optim=OptimizerConfig(lr=1e-3, warmup_steps=0))
        dm = ImageTextDataModule(module.processor, records, batch_size=batch_size, seed=1)
        pl.Trainer(max_steps=1, accumulate_grad_batches=accumulate, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, callbacks=[Capture()]).fit(module, dm)
        grads.append(Capture.grads)
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-6, rtol=1e-4), name


@pytest.mark.parametrize("frozen", ["vision", "language"])
def test_freezing_the_vision_tower_or_the_language_model(image_text_dir, frozen):
    module = _module(image_text_dir, model_transform=LoRA(r=4), freeze_vision_tower=frozen == "vision",
                     freeze_language_model=frozen == "language")
    base = module.model.get_base_model()
    part = base.get_encoder(modality="image") if frozen == "vision" else base.get_decoder()
    other = base.get_decoder() if frozen == "vision" else base.get_encoder(modality="image")
    assert not any(p.requires_grad for p in part.parameters())  # its LoRA adapters included
    assert any(p.requires_grad for p in other.parameters())
    before = {n: p.detach().clone() for n, p in part.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in module.model.parameters() if p.requires_grad], lr=1e-2)
    module.training_step(dict(_batch(module, _colour_records()))).backward()
    optimizer.step()
    assert all(torch.equal(p, before[n]) for n, p in part.named_parameters())


def test_processor_property_setter_and_skipped_ids(image_text_dirs):
    module = HFAutoModelForImageTextToText(model_name=str(image_text_dirs["gemma3"]))
    assert module._processor is None
    processor = module.processor  # configured lazily from model_name
    assert module.tokenizer is processor.tokenizer
    ids = module.extract_skipped_token_ids(module.tokenizer)
    assert isinstance(ids, torch.IntTensor) and processor.tokenizer.convert_tokens_to_ids("<end_of_turn>") not in ids
    other = AutoProcessor.from_pretrained(image_text_dirs["llava"])
    module.processor = other
    assert module.processor is other
    assert HFAutoModelForImageTextToText.configure_processor(str(image_text_dirs["llava"])).chat_template


def test_lora_adapter_saves_alone_and_merged(image_text_dirs, tmp_path):
    module = _module(image_text_dirs["gemma3"], model_transform=LoRA(r=4))
    module.save_pretrained(tmp_path / "adapter")
    module.save_pretrained(tmp_path / "merged", merged=True)
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "adapter" / "processor_config.json").exists()
    AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")


def test_the_default_model_is_the_tiny_random_demo(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HFBRIDGE_CACHE", str(tmp_path))
    module = HFAutoModelForImageTextToText()
    assert module.model_name == "tiny-random-vlm" and "random weights" in caplog.text
    module.configure_model()
    assert type(module.model).__name__ == "LlavaForConditionalGeneration"
    assert (tmp_path / "tiny-vlm" / "llava-v1" / "config.json").exists()


def test_a_text_only_model_has_no_multimodal_processor(tiny_model_dir):
    with pytest.raises(ValueError, match="has no multimodal processor"):
        HFAutoModelForImageTextToText.configure_processor(str(tiny_model_dir))


def test_a_processor_that_needs_torchvision_says_so(tmp_path, tiny_tokenizer):
    """Qwen2-VL's processor has a video processor that imports torchvision (not installable beside this torch)."""
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed here")
    from transformers import Qwen2VLImageProcessorPil

    tiny_tokenizer.save_pretrained(tmp_path)
    Qwen2VLImageProcessorPil().save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    (tmp_path / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2VLProcessor"}))
    (tmp_path / "video_preprocessor_config.json").write_text(
        json.dumps({"video_processor_type": "Qwen2VLVideoProcessor", "processor_class": "Qwen2VLProcessor"}))
    with pytest.raises(ValueError, match="(?s)could not load the processor.*needs torchvision"):
        HFAutoModelForImageTextToText.configure_processor(str(tmp_path))


def test_extract_skipped_token_ids_is_static_on_the_class_as_in_the_seed(image_text_dir):
    """``HFAutoModelForImageTextToText.extract_skipped_token_ids(tokenizer)`` (the seed's static method, given a
    tokenizer or a processor) and ``module.extract_skipped_token_ids()`` give the same ids."""
    module = HFAutoModelForImageTextToText(model_name=str(image_text_dir))
    on_module = module.extract_skipped_token_ids()
    for chat_or_tokenizer in (module.processor, module.tokenizer):
        assert torch.equal(HFAutoModelForImageTextToText.extract_skipped_token_ids(chat_or_tokenizer), on_module)
    assert torch.equal(module.extract_skipped_token_ids(module.tokenizer), on_module)
    assert isinstance(on_module, torch.IntTensor) and module.tokenizer.eos_token_id not in on_module
    with pytest.raises(TypeError, match="needs a tokenizer or a processor"):
        HFAutoModelForImageTextToText.extract_skipped_token_ids()


# the modules of each tiny family that hold its vision tower and its projector (names written out, not derived)
VISION_AND_PROJECTOR = {"llava": ("model.vision_tower", "model.multi_modal_projector"),
                        "idefics3": ("model.vision_model", "model.connector"),
                        "gemma3": ("model.vision_tower", "model.multi_modal_projector"),
                        "paligemma": ("model.vision_tower", "model.multi_modal_projector"),
                        "mllama": ("model.vision_model", "model.multi_modal_projector")}


def test_the_modules_kept_in_full_precision_are_the_vision_tower_projector_and_head(image_text_dir, family):
    from transformers import AutoConfig

    from hfbridge.models.image_text import full_precision_modules

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(image_text_dir))
    keep = full_precision_modules(model)
    assert {*VISION_AND_PROJECTOR[family], "lm_head"} <= set(keep)
    decoder = {"idefics3": "model.text_model"}.get(family, "model.language_model")
    assert not any(name.startswith(f"{decoder}.layers") for name in keep)  # the language model is quantized


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_4bit_keeps_the_vision_tower_and_projector_in_full_precision_and_trains_with_lora(image_text_dirs):
    """load_in_4bit=True (the seed's QLoRA example): the language model's linear layers are NF4 (``Params4bit``),
    the vision tower's, the projector's and the output head's stay plain float32 weights; LoRA then trains."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    module = _module(image_text_dirs["llava"], load_in_4bit=True, model_transform=LoRA(r=4, alpha=8, dropout=0.0))
    base = module.model.get_base_model()

    def weights(part):
        return [m.weight for name, m in part.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in name]

    full = weights(base.model.vision_tower) + weights(base.model.multi_modal_projector) + [base.lm_head.weight]
    assert len(full) > 10 and all(type(w) is torch.nn.Parameter and w.dtype == torch.float32 for w in full)
    quantized = weights(base.get_decoder())
    assert len(quantized) == 14 and all(isinstance(w, bnb.nn.Params4bit) for w in quantized)  # 2 layers x 7

    adapters = {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}
    assert any("vision_tower" in n for n in adapters) and any("language_model" in n for n in adapters)
    # gradients reach the vision tower's adapters through the 4-bit language model (bitsandbytes' CPU inference
    # layout, which the loss's no-grad probe would switch the 4-bit layers to, has no backward)
    module.training_step(dict(_batch(module, _colour_records()))).backward()
    vision = [p.grad for n, p in module.model.named_parameters() if "vision_tower" in n and "lora_B" in n]
    assert vision and all(g is not None and bool(g.abs().sum() > 0) for g in vision)
    module.model.zero_grad()
    losses = _train_on_colours(module, steps=3, lr=1e-2)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    after = dict(module.model.named_parameters())
    assert all(not torch.equal(after[n], before) for n, before in adapters.items() if "lora_B" in n)
