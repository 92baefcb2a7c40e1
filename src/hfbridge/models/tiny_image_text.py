"""Tiny random vision-language models, built from configs with a processor made locally: for tests and for the
pipeline demo of ``hfbridge finetune --task image-text-to-text``. Their weights are random: they show that the
pipeline works, not what a trained model can do. Real weights come from a hub id or a local folder.

Five families with different processors (all with PIL image processors, so torchvision is not needed):

* ``llava``: a CLIP vision tower, one ``<image>`` placeholder expanded to one token per patch;
* ``idefics3`` (SmolVLM's architecture): a SigLIP-like tower with pixel shuffle, an ``<image>`` placeholder
  expanded to ``<fake_token_around_image><global-img><image>...<fake_token_around_image>``;
* ``gemma3``: a SigLIP tower with average pooling, ``<start_of_image>`` expanded with blank lines, soft image
  tokens and ``<end_of_image>``; bidirectional attention over image tokens (``token_type_ids``);
* ``paligemma`` (PaliGemma 2: a SigLIP tower and a Gemma 2 decoder): a prefix LM. ``<image>`` is expanded to one
  token per patch, the processor inserts its BOS after the images and ends the prefix with a newline, and
  ``token_type_ids`` tell the bidirectional prefix from the causal suffix. Real PaliGemma checkpoints have no chat
  template; this one has a template in PaliGemma's own layout (images, prompt, newline; answer, EOS);
* ``mllama`` (Llama 3.2 Vision): a tiled vision encoder whose features enter the decoder through cross-attention
  layers; one ``<|image|>`` token per image, not expanded (``cross_attention_mask``, ``aspect_ratio_ids``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from hfbridge.io import OutputExistsError, atomic_dir
from hfbridge.models.loading import cache_dir
from hfbridge.models.tiny_tokenizer import BASE_CORPUS, build_tiny_tokenizer
from hfbridge.shapes_task import corpus as shapes_corpus

log = logging.getLogger(__name__)

FAMILIES = ("llava", "idefics3", "gemma3", "paligemma", "mllama")
DEMO_IMAGE_TEXT_MODEL = "tiny-random-vlm"
DEMO_FAMILY = "llava"
_VERSION = "v1"
IMAGE_SIZE, PATCH_SIZE = 32, 8

_CONTENT = (
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}IMAGE{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
)
TEMPLATES = {
    # ChatML, as Qwen and LLaVA-OneVision write it
    "llava": (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n" + _CONTENT.replace("IMAGE", "<image>\n")
        + "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    # SmolVLM's template
    "idefics3": (
        "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
        "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
        + _CONTENT.replace("IMAGE", "<image>")
        + "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
    ),
    # Gemma's turns (without the BOS token)
    "gemma3": (
        "{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "<start_of_turn>{{ role }}\n" + _CONTENT.replace("IMAGE", "<start_of_image>")
        + "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    ),
    # PaliGemma's prefix and suffix: images and prompt, a newline; the answer and EOS (the processor inserts its
    # BOS after the images and a newline at the end)
    "paligemma": (
        "{% for message in messages %}{% if message['role'] == 'assistant' %}" + _CONTENT.replace("IMAGE", "")
        + "{{ eos_token }}{% else %}" + _CONTENT.replace("IMAGE", "<image>") + "{{ '\n' }}{% endif %}{% endfor %}"
    ),
    # Llama 3's headers
    "mllama": (
        "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>"
        "{{ '\n\n' }}" + _CONTENT.replace("IMAGE", "<|image|>") + "<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>{{ '\n\n' }}{% endif %}"
    ),
}
_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=512)
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=IMAGE_SIZE,
               patch_size=PATCH_SIZE)


def _tokenizer(extra: list[str], named: dict[str, str] | None = None, eos: str | None = None, bos: str | None = None,
               pad: str | None = None):
    """The tiny BPE tokenizer, trained on the shapes task's words too, plus the family's special tokens (and its
    EOS, BOS and pad tokens, which must be among them)."""
    tokenizer = build_tiny_tokenizer(corpus=BASE_CORPUS + shapes_corpus())
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|endoftext|>", *extra]})
    if named:
        tokenizer._set_model_specific_special_tokens(named)  # e.g. tokenizer.boi_token, as Gemma's tokenizer has
    for role, token in (("eos_token", eos), ("bos_token", bos), ("pad_token", pad)):
        if token:
            setattr(tokenizer, role, token)
    return tokenizer


def _llava():
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaProcessor

    tokenizer = _tokenizer(["<image>"])
    size = {"shortest_edge": IMAGE_SIZE}
    image_processor = CLIPImageProcessorPil(size=size, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE, num_additional_image_tokens=1,
        vision_feature_select_strategy="default", chat_template=TEMPLATES["llava"],
    )
    config = LlavaConfig(
        text_config=dict(model_type="llama", vocab_size=len(tokenizer), **_TEXT),
        vision_config=dict(model_type="clip_vision_model", projection_dim=32, **_VISION),
        image_token_index=processor.image_token_id, image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    return config, processor


def _idefics3():
    from transformers import Idefics3Config, Idefics3ImageProcessorPil, Idefics3Processor

    tiles = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    tokenizer = _tokenizer(["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", *tiles],
                           eos="<end_of_utterance>")
    edge = {"longest_edge": IMAGE_SIZE}
    image_processor = Idefics3ImageProcessorPil(size=edge, max_image_size=edge, do_image_splitting=False)
    scale = 2
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=TEMPLATES["idefics3"],
        image_seq_len=(IMAGE_SIZE // PATCH_SIZE) ** 2 // scale**2,
    )
    config = Idefics3Config(
        text_config=dict(model_type="llama", vocab_size=len(tokenizer), **_TEXT), vision_config=_VISION,
        image_token_id=processor.image_token_id, scale_factor=scale,
    )
    return config, processor


def _gemma3():
    from transformers import Gemma3Config, Gemma3ImageProcessorPil, Gemma3Processor

    named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tokenizer = _tokenizer([*named.values(), "<start_of_turn>", "<end_of_turn>"], named, eos="<end_of_turn>")
    image_processor = Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    tokens_per_image = 4
    processor = Gemma3Processor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=TEMPLATES["gemma3"],
        image_seq_length=tokens_per_image,
    )
    text = dict(_TEXT, head_dim=16, query_pre_attn_scalar=16, sliding_window=64)
    config = Gemma3Config(
        text_config=dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **text),
        vision_config=_VISION, mm_tokens_per_image=tokens_per_image, image_token_index=tokenizer.image_token_id,
        boi_token_index=tokenizer.boi_token_id, eoi_token_index=tokenizer.eoi_token_id,
    )
    return config, processor


def _paligemma():
    from transformers import PaliGemmaConfig, PaliGemmaProcessor, SiglipImageProcessorPil

    tokenizer = _tokenizer(["<bos>", "<eos>", "<pad>", "<image>"], {"image_token": "<image>"}, eos="<eos>", bos="<bos>",
                           pad="<pad>")
    image_processor = SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                              image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2)
    # the processor adds PaliGemma's 1152 detection and segmentation tokens (<loc0000>..., <seg000>...)
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                   chat_template=TEMPLATES["paligemma"])
    text = dict(_TEXT, head_dim=16, query_pre_attn_scalar=16, sliding_window=64)
    config = PaliGemmaConfig(
        text_config=dict(model_type="gemma2", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **text),
        vision_config=dict(model_type="siglip_vision_model", **_VISION), image_token_index=processor.image_token_id,
        projection_dim=_TEXT["hidden_size"], hidden_size=_TEXT["hidden_size"],
    )
    return config, processor


def _mllama():
    from transformers import MllamaConfig, MllamaImageProcessorPil, MllamaProcessor

    extra = ["<|begin_of_text|>", "<|image|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
             "<|python_tag|>", "<|finetune_right_pad_id|>"]
    tokenizer = _tokenizer(extra, eos="<|eot_id|>", bos="<|begin_of_text|>", pad="<|finetune_right_pad_id|>")
    image_processor = MllamaImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, max_image_tiles=1)
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=TEMPLATES["mllama"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
                  image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, max_num_tiles=1, supported_aspect_ratios=[[1, 1]],
                  intermediate_layers_indices=[0], vision_output_dim=2 * 32)  # hidden x (intermediate layers + 1)
    text = dict(_TEXT, vocab_size=len(tokenizer), cross_attention_layers=[1], bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = MllamaConfig(vision_config=vision, text_config=text, image_token_index=processor.image_token_id)
    return config, processor


_BUILDERS = {"llava": _llava, "idefics3": _idefics3, "gemma3": _gemma3, "paligemma": _paligemma, "mllama": _mllama}


def build_tiny_image_text(path: str | os.PathLike, family: str = DEMO_FAMILY, seed: int = 0) -> Path:
    """Save a tiny random image-text-to-text model of ``family`` and its processor to ``path`` (a folder that
    ``AutoModelForImageTextToText`` and ``AutoProcessor`` load)."""
    from transformers import AutoModelForImageTextToText

    if family not in _BUILDERS:
        raise ValueError(f"unknown tiny VLM family {family!r}; choose one of {', '.join(FAMILIES)}")
    config, processor = _BUILDERS[family]()
    tokenizer = processor.tokenizer
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config)
    for settings in (model.config.get_text_config(), model.generation_config):
        settings.pad_token_id = tokenizer.pad_token_id
        settings.eos_token_id = tokenizer.eos_token_id
    path = Path(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def demo_image_text_path(family: str = DEMO_FAMILY) -> Path:
    """The demo model's folder in the hfbridge cache, built once (about a second)."""
    target = cache_dir() / "tiny-vlm" / f"{family}-{_VERSION}"
    if (target / "config.json").exists():
        return target
    log.info("building the tiny random %s VLM in %s (once)", family, target)
    try:
        with atomic_dir(target) as tmp:
            build_tiny_image_text(tmp, family)
    except (OutputExistsError, OSError):  # another process built it first
        if not (target / "config.json").exists():
            raise
    return target


def resolve_image_text_name(model_name: str | os.PathLike) -> str | os.PathLike:
    """``tiny-random-vlm`` (optionally ``tiny-random-vlm-<family>``) -> its cached folder; other names unchanged."""
    name = str(model_name)
    if name == DEMO_IMAGE_TEXT_MODEL:
        return str(demo_image_text_path())
    if name.startswith(DEMO_IMAGE_TEXT_MODEL + "-") and name[len(DEMO_IMAGE_TEXT_MODEL) + 1 :] in FAMILIES:
        return str(demo_image_text_path(name[len(DEMO_IMAGE_TEXT_MODEL) + 1 :]))
    return model_name
