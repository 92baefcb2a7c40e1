"""Labels, batches and bad input for vision-language data (three families, each with its own processor)."""

import base64
import io
import json
import logging

import numpy as np
import pytest
import torch
from image_text_helpers import ASSISTANT_TURN, IMAGE_TOKENS, NEEDS_AN_IMAGE, chat, square
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from hfbridge.data.demo_image_text import shape_records, write_shapes_data
from hfbridge.data.formats import DataFormatError
from hfbridge.data.image_text import (
    ImageError,
    ImageTextDataModule,
    encode_samples,
    image_text_inputs,
    load_image,
    load_image_text_records,
    parse_record,
    prompt_and_reference,
    render_sample,
    skipped_token_ids,
)
from hfbridge.losses import IGNORE_INDEX


def _encode(processor, records):
    samples = [render_sample(processor, parse_record(r, f"record {i}")) for i, r in enumerate(records)]
    return samples, encode_samples(processor, samples, skipped_token_ids(processor))


def _image_token_id(model_dir):
    config = AutoConfig.from_pretrained(model_dir)
    return getattr(config, "image_token_id", None) or config.image_token_index


def test_only_assistant_turns_are_trained_with_their_end_of_turn(image_text_dir, family):
    processor = AutoProcessor.from_pretrained(image_text_dir)
    record = chat(("user", "<img>What colour is the shape?"), ("assistant", "red"),
                  ("user", "What shape is this?"), ("assistant", "square"), images=[square()])
    _, batch = _encode(processor, [record])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    trained = labels != IGNORE_INDEX
    tokenizer = processor.tokenizer
    expected = ASSISTANT_TURN[family].format("red") + ASSISTANT_TURN[family].format("square")
    assert tokenizer.decode(labels[trained]) == expected
    # shifted exactly once: the label at t is the token at t + 1, and the last position has no target
    assert torch.equal(labels[:-1][trained[:-1]], ids[1:][trained[:-1]]) and labels[-1] == IGNORE_INDEX
    # the first answer token is a target, predicted from the last prompt token
    first = int(trained.nonzero()[0])
    assert tokenizer.decode(ids[first + 1 :]).startswith(ASSISTANT_TURN[family].format("red"))
    # the image tokens are in the input (as many as the model expects) and never a target
    image_id = _image_token_id(image_text_dir)
    assert int((ids == image_id).sum()) == IMAGE_TOKENS[family]
    assert not torch.isin(labels, skipped_token_ids(processor)).any()


def test_skipped_ids_come_from_the_processor_and_keep_the_end_of_turn(image_text_dir, family):
    processor = AutoProcessor.from_pretrained(image_text_dir)
    skipped = set(skipped_token_ids(processor).tolist())
    tokenizer = processor.tokenizer
    end_of_turn = tokenizer.convert_tokens_to_ids(ASSISTANT_TURN[family].format("").strip())
    assert end_of_turn not in skipped and tokenizer.eos_token_id not in skipped
    assert _image_token_id(image_text_dir) in skipped and tokenizer.pad_token_id in skipped
    extra = {"llava": ["<image>"], "idefics3": ["<fake_token_around_image>", "<global-img>", "<row_1_col_1>"],
             "gemma3": ["<start_of_image>", "<end_of_image>", "<start_of_turn>"], "paligemma": ["<image>", "<bos>"],
             "mllama": ["<|image|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>"]}[family]
    assert set(tokenizer.convert_tokens_to_ids(extra)) <= skipped
    if family == "paligemma":  # its detection and segmentation tokens are answers, not markup
        assert not set(tokenizer.convert_tokens_to_ids(["<loc0000>", "<loc1023>", "<seg127>"])) & skipped


def test_a_prompt_is_its_training_sequence_cut_before_the_answer(image_text_dir):
    """What generation gives the model (the record cut before its last answer, with the generation prompt) is
    exactly the start of the training sequence, up to the first token of that answer: the same ids and token
    types (PaliGemma's processor appends the newline ending its prefix to every text: it is there once)."""
    processor = AutoProcessor.from_pretrained(image_text_dir)
    record = chat(("user", "<img>What colour is the shape?"), ("assistant", "red"),
                  ("user", "What shape is this?"), ("assistant", "square"), images=[square()])
    _, train = _encode(processor, [record])
    prompt = image_text_inputs(processor, [prompt_and_reference(load_image_text_records([record])[0])[0]])
    n = prompt["input_ids"].shape[1]
    assert torch.equal(prompt["input_ids"][0], train["input_ids"][0, :n])
    assert train["labels"][0, n - 1] != IGNORE_INDEX  # the next token is the answer's first, a target
    if "token_type_ids" in train:
        assert torch.equal(prompt["token_type_ids"][0], train["token_type_ids"][0, :n])


def test_paligemma_answers_are_the_causal_suffix_of_its_prefix_lm(image_text_dirs):
    """PaliGemma is a prefix LM: token_type_ids are 0 (attended both ways) over the images and prompt and 1
    (causal) from the first trained token on, so no position sees the token it learns to predict. (The processor
    gives 0 everywhere for a rendered conversation: the prompt would then attend to the answer.)"""
    processor = AutoProcessor.from_pretrained(image_text_dirs["paligemma"])
    model = AutoModelForImageTextToText.from_pretrained(image_text_dirs["paligemma"]).eval()
    batches = [_encode(processor, [chat(("user", "<img>What colour is the shape?"), ("assistant", answer),
                                        images=[square()])])[1] for answer in ("red", "blue")]
    first = int((batches[0]["labels"][0] != IGNORE_INDEX).nonzero()[0]) + 1  # where the answer starts
    types = batches[0]["token_type_ids"][0]
    assert first > IMAGE_TOKENS["paligemma"] and not types[:first].any() and types[first:].all()
    with torch.no_grad():  # what predicts the answer does not depend on the answer
        logits = [model(**{k: v for k, v in b.items() if k != "labels"}).logits[0, :first] for b in batches]
    torch.testing.assert_close(logits[0], logits[1])


def test_a_batch_of_mixed_image_counts_equals_its_samples_one_by_one(image_text_dir, family):
    """Two images, none, and one image in one batch: each row has the input ids and labels of its sample alone,
    and the model gives it the same logits (padding and pixel batching change nothing)."""
    processor = AutoProcessor.from_pretrained(image_text_dir)
    model = AutoModelForImageTextToText.from_pretrained(image_text_dir).eval()
    records = [
        chat(("user", "<img><img>What colours are the two shapes, in order?"), ("assistant", "red and blue"),
             images=[square(), square((31, 119, 180))]),
        chat(("user", "Say red."), ("assistant", "red")),
        chat(("user", "<img>What shape is this?"), ("assistant", "square"), images=[square()]),
    ]
    if family in NEEDS_AN_IMAGE:  # a sample without an image is refused and named, alone or in a batch
        for batch, where in (([records[1]], "record 0"), (records, "record 1")):
            with pytest.raises(DataFormatError, match=f"{where}: PaliGemmaProcessor needs an image in every sample"):
                _encode(processor, batch)
        records.pop(1)
    samples, batch = _encode(processor, records)
    skipped = skipped_token_ids(processor)
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        for row, sample in enumerate(samples):
            alone = encode_samples(processor, [sample], skipped)
            n = alone["input_ids"].shape[1]
            assert torch.equal(alone["input_ids"][0], batch["input_ids"][row, :n])
            assert torch.equal(alone["labels"][0], batch["labels"][row, :n])
            assert (batch["labels"][row, n:] == IGNORE_INDEX).all()  # padding is never trained
            logits_alone = model(**{k: v for k, v in alone.items() if k != "labels"}).logits
            assert torch.allclose(logits_alone[0], logits[row, :n], atol=1e-5)


def test_image_sources_give_the_same_pixels(tmp_path):
    image = square()
    image.save(tmp_path / "a.png")
    png = (tmp_path / "a.png").read_bytes()
    reference = np.asarray(image)
    sources = ["a.png", str(tmp_path / "a.png"), f"file://{tmp_path / 'a.png'}", png, {"bytes": png, "path": None},
               {"bytes": None, "path": "a.png"}, image, "data:image/png;base64," + base64.b64encode(png).decode()]
    for source in sources:
        assert np.array_equal(np.asarray(load_image(source, "r", tmp_path)), reference), source


def test_transparent_pixels_are_laid_on_white_and_grayscale_becomes_rgb():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(Image.new("L", (4, 4), 7)).getpixel((0, 0)) == (7, 7, 7)


def test_records_from_a_file_resolve_images_beside_it_and_top_level_images_fill_bare_parts(tmp_path):
    square().save(tmp_path / "x.png")
    record = {"images": ["x.png"], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]}
    (tmp_path / "d.jsonl").write_text(json.dumps(record) + "\n")
    [parsed] = load_image_text_records(tmp_path / "d.jsonl")
    assert parsed.images == ["x.png"] and parsed.base_dir == tmp_path and parsed.where.endswith("d.jsonl:1")
    assert parsed.messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "Colour?"}]


# ------------------------------------------------------------------------------------------------- bad input
def _write(tmp_path, *records):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _image_record(source, question="Colour?"):
    return {"messages": [{"role": "user", "content": [{"type": "image", "image": source},
                                                      {"type": "text", "text": question}]},
                         {"role": "assistant", "content": "red"}]}


def test_a_missing_image_file_is_named_with_its_record(tmp_path, image_text_dirs):
    square().save(tmp_path / "ok.png")
    path = _write(tmp_path, _image_record("ok.png"), _image_record("images/missing.png"))
    processor = AutoProcessor.from_pretrained(image_text_dirs["llava"])
    with pytest.raises(ImageError, match=r"data\.jsonl:2: image file not found: .*images/missing\.png"):
        ImageTextDataModule(processor, path)


def test_an_image_count_that_does_not_match_the_placeholders(tmp_path):
    record = {"images": [], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "?"}]},
        {"role": "assistant", "content": "red"}]}
    record["images"] = [square()]
    with pytest.raises(DataFormatError, match=r"record 3: the messages have 2 image placeholder\(s\).*'images' has 1 entry"):
        parse_record(record, "record 3")
    record["images"] = [square()] * 3
    with pytest.raises(DataFormatError, match="have 2 image placeholder.*3 entries"):
        parse_record(record, "record 3")


def test_a_template_that_drops_the_image_is_reported_with_the_record(image_text_dirs):
    processor = AutoProcessor.from_pretrained(image_text_dirs["llava"])
    processor.chat_template = processor.chat_template.replace("<image>\n", "")  # renders no placeholder
    with pytest.raises(DataFormatError, match="record 0: the processor rejected this sample"):
        ImageTextDataModule(processor, [_image_record(square())]).setup()


@pytest.mark.parametrize(("mode", "suffix", "kind"), [("F", ".tiff", "32-bit floating point"),
                                                        ("I;16", ".png", "16-bit integer")])
def test_an_unsupported_image_mode_is_refused(tmp_path, mode, suffix, kind):
    Image.new(mode, (8, 8)).save(tmp_path / f"deep{suffix}")
    path = _write(tmp_path, _image_record(f"deep{suffix}"))
    with pytest.raises(ImageError, match=rf"data\.jsonl:1: image deep{suffix} has mode '{mode}' \({kind}\)"):
        load_image_text_records(path)


def test_a_processor_without_a_chat_template_is_refused(image_text_dirs):
    processor = AutoProcessor.from_pretrained(image_text_dirs["idefics3"])
    processor.chat_template = None
    with pytest.raises(DataFormatError, match="the processor has no chat template"):
        ImageTextDataModule(processor, [_image_record(square())])


def test_a_paligemma_checkpoint_without_a_chat_template_is_told_how_to_give_one(image_text_dirs):
    """Real PaliGemma (2, mix) checkpoints ship no chat template: the error names it and the template that works."""
    from hfbridge.models.tiny_image_text import TEMPLATES

    processor = AutoProcessor.from_pretrained(image_text_dirs["paligemma"])
    processor.chat_template = None
    with pytest.raises(DataFormatError, match=r"(?s)the processor has no chat template.*PaliGemmaProcessor "
                                              r"checkpoints.*TEMPLATES\['paligemma'\]"):
        ImageTextDataModule(processor, [_image_record(square())])
    processor.chat_template = TEMPLATES["paligemma"]
    dm = ImageTextDataModule(processor, [_image_record(square())])
    dm.setup()
    assert dm.train_samples[0].num_label_tokens == 2  # "red" and EOS


def test_web_urls_and_non_images_get_clear_errors(tmp_path):
    with pytest.raises(ImageError, match="record 1: image https://x.org/a.png is a web URL; hfbridge does not download"):
        parse_record(_image_record("https://x.org/a.png"), "record 1")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ImageError, match="notes.png is not an image file PIL can read"):
        parse_record(_image_record("notes.png"), "record 1", tmp_path)
    with pytest.raises(DataFormatError, match=r"messages\[0\].content\[0\] must be"):
        parse_record({"messages": [{"role": "user", "content": [{"type": "video"}]},
                                   {"role": "assistant", "content": "x"}]}, "record 1")


# ------------------------------------------------------------------------------------------------- data module
def test_datamodule_serves_batches_with_the_step_token_count(image_text_dirs, tmp_path, caplog):
    processor = AutoProcessor.from_pretrained(image_text_dirs["gemma3"])
    train, _ = write_shapes_data(tmp_path, n_train=12, n_test=2)
    dm = ImageTextDataModule(processor, train, batch_size=4)
    batches = list(dm.train_dataloader())
    assert len(batches) == 3 and {"pixel_values", "token_type_ids", "labels"} <= set(batches[0])
    assert all(int(b["num_label_tokens"]) == int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
    # samples longer than max_length are dropped (an image's tokens cannot be cut), and logged
    longest = max(s.length for s in dm.train_samples)
    with caplog.at_level(logging.WARNING):
        short = ImageTextDataModule(processor, train, batch_size=4, max_length=longest - 1)
        short.setup()
    assert len(short.train_samples) < 12 and "longer than max_length" in caplog.text


def test_shapes_records_mix_one_and_two_images():
    counts = {sum(p["type"] == "image" for p in r["messages"][0]["content"]) for r in shape_records(20)}
    assert counts == {1, 2}
    buffer = io.BytesIO()
    shape_records(1)[0]["messages"][0]["content"][0]["image"].save(buffer, format="PNG")
    assert buffer.tell() > 0
