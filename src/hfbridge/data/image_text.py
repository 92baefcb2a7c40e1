"""Vision-language data: images, chat records with images, labels through a processor, batches, a DataModule.

A record is a chat in the ``messages`` format whose contents may hold images::

    {"messages": [
        {"role": "user", "content": [{"type": "image", "image": "img/cat.png"}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": "A cat."}]}

An image part carries its image under ``image`` (or ``path`` / ``url``, or OpenAI's ``{"type": "image_url",
"image_url": {"url": ...}}``): a file path (relative paths are resolved against the data file's folder), a
``data:`` URI, bytes, a PIL image, or a ``{"bytes": ..., "path": ...}`` dict as ``datasets`` stores images. A bare
``{"type": "image"}`` takes the next entry of the record's top-level ``images`` list, so the number of bare parts
must equal the length of that list. Web URLs are refused: training never depends on the network.

Labels follow the core convention (:mod:`hfbridge.losses`): the conversation is rendered with the processor's chat
template and its assistant turns are located on the rendered text (:func:`hfbridge.data.formats.assistant_spans`);
the processor then expands each image placeholder into many image tokens and reports where
(``return_text_replacement_offsets``), so the turns are moved past the expansions and marked on the expanded tokens
by their character offsets. Targets are shifted once (:func:`hfbridge.data.formats.shift_for_causal_lm`), and every
id of :func:`skipped_token_ids` (image, video and padding tokens, and every other special token that is not part of
an assistant turn) is never a target. Assistant turns are trained with their end-of-turn token.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import inspect
import io
import itertools
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hfbridge._shared import eager
from hfbridge.data.datamodule import CausalLMDataModule, DataArg, record_rows
from hfbridge.data.formats import (
    DataFormatError,
    assistant_spans,
    chat_template_or_error,
    check_record,
    last_assistant_turn,
    render_chat,
    shift_for_causal_lm,
    tokens_in_spans,
)
from hfbridge.data.packing import best_fit_decreasing
from hfbridge.data.sources import DataSourceError
from hfbridge.losses import IGNORE_INDEX

log = logging.getLogger(__name__)

# PIL modes that convert to RGB without losing meaning; others (16/32-bit integer, float) are refused.
SUPPORTED_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
_MODE_NAMES = {"I": "32-bit integer", "F": "32-bit floating point"}
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
_IMAGE_KEYS = ("image", "path", "url")


class ImageError(DataFormatError):
    """An image that cannot be used; the message names the record and the image."""


# ----------------------------------------------------------------------------------------------------- images
def _describe(source: Any) -> str:
    if isinstance(source, (str, Path)):
        text = str(source)
        return text if len(text) <= 80 else text[:77] + "..."
    return f"<{type(source).__name__}>"


def open_image(source: Any, where: str = "", base_dir: str | Path | None = None):
    """Open an image (lazily: PIL reads the header) and check its mode; see the module docstring for sources."""
    from PIL import Image, UnidentifiedImageError

    prefix = f"{where}: " if where else ""
    if isinstance(source, dict):
        source = source.get("bytes") or source.get("path")
    if isinstance(source, Image.Image):
        image = source
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(_file_or_buffer(source, prefix, base_dir))
        except UnidentifiedImageError as e:
            raise ImageError(f"{prefix}image {_describe(source)} is not an image file PIL can read") from e
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageError(
                f"{prefix}image {_describe(source)} is larger than PIL's safety limit of {Image.MAX_IMAGE_PIXELS} "
                f"pixels (a decompression bomb, or a huge image: resize it) ({e})"
            ) from e
    if image.mode not in SUPPORTED_MODES:
        default = "16-bit integer" if image.mode.startswith("I;16") else "not 8-bit colour or grayscale"
        kind = _MODE_NAMES.get(image.mode, default)
        raise ImageError(
            f"{prefix}image {_describe(source)} has mode {image.mode!r} ({kind}), which is not converted to RGB "
            f"implicitly (the scaling is ambiguous); save it as 8-bit RGB or grayscale. Supported modes: "
            f"{', '.join(SUPPORTED_MODES)}"
        )
    return image


def _file_or_buffer(source: Any, prefix: str, base_dir: str | Path | None):
    if isinstance(source, (bytes, bytearray)):
        return io.BytesIO(source)
    if not isinstance(source, (str, Path)):
        raise ImageError(
            f"{prefix}an image must be a file path, a data: URI, bytes, a PIL image or a {{bytes, path}} dict, "
            f"got {type(source).__name__}"
        )
    text = str(source)
    if text.startswith(("http://", "https://")):
        raise ImageError(
            f"{prefix}image {_describe(text)} is a web URL; hfbridge does not download images (training must not "
            "depend on the network). Download it and give the file path."
        )
    if text.startswith("data:"):
        try:
            return io.BytesIO(base64.b64decode(text.split(",", 1)[1], validate=True))
        except (IndexError, binascii.Error) as e:
            raise ImageError(f"{prefix}image data: URI is not valid base64 ({e})") from e
    path = Path(text.removeprefix("file://")).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    if not path.is_file():
        hint = f" (relative paths are resolved against {base_dir})" if base_dir is not None else ""
        raise ImageError(f"{prefix}image file not found: {path}{hint}")
    return path


def load_image(source: Any, where: str = "", base_dir: str | Path | None = None):
    """The image as an RGB PIL image; transparent pixels are laid on white."""
    from PIL import Image

    image = open_image(source, where, base_dir)
    if image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


# ----------------------------------------------------------------------------------------------------- records
@dataclass
class ImageTextRecord:
    """A checked chat record: contents as lists of parts, each image part reduced to ``{"type": "image"}`` (what
    chat templates render as a placeholder), and the images' sources in order."""

    where: str
    messages: list[dict]
    images: list[Any] = field(default_factory=list)
    base_dir: Path | None = None


def _image_source(part: dict) -> Any:
    if part.get("type") == "image_url":
        url = part.get("image_url")
        return url.get("url") if isinstance(url, dict) else url
    return next((part[k] for k in _IMAGE_KEYS if part.get(k) is not None), None)


def parse_record(record: dict, where: str, base_dir: str | Path | None = None, check_images: bool = True) -> ImageTextRecord:
    """Check one chat record with images and normalise it (see the module docstring for the format).

    With ``check_images`` every image is opened and decoded so that a missing, unreadable, truncated or
    oversized (decompression bomb) file or an unsupported mode is reported here, with ``where``, before any model
    is loaded.
    """
    check_record(record, "messages", where, content_parts=True)
    top_images = record.get("images") or []
    if not isinstance(top_images, list):
        raise DataFormatError(f"{where}: 'images' must be a list, got {type(top_images).__name__}")
    messages, sources, bare = [], [], 0
    for i, message in enumerate(record["messages"]):
        content = message["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise DataFormatError(f"{where}: messages[{i}].content must be a string or a list of parts")
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind in ("image", "image_url"):
                source = _image_source(part)
                if source is None:
                    source = top_images[bare] if bare < len(top_images) else None
                    bare += 1
                sources.append(source)
                parts.append({"type": "image"})
            else:
                raise DataFormatError(
                    f"{where}: messages[{i}].content[{j}] must be {{'type': 'text', 'text': ...}} or "
                    f"{{'type': 'image', ...}}, got {part!r:.100}"
                )
        messages.append({**message, "content": parts})
    if bare != len(top_images):
        raise DataFormatError(
            f"{where}: the messages have {bare} image placeholder(s) without their own image "
            f"({{'type': 'image'}}), but 'images' has {len(top_images)} entr{'y' if len(top_images) == 1 else 'ies'}; "
            "give one image per placeholder"
        )
    base = Path(base_dir) if base_dir is not None else None
    if check_images:
        for source in sources:
            image = open_image(source, where, base)
            try:
                image.load()  # decode it all: a truncated or corrupt file fails here, not in training
            except (OSError, SyntaxError, ValueError) as e:
                raise ImageError(f"{where}: image {_describe(source)} is truncated or corrupt ({e})") from e
            finally:
                if image is not source:
                    image.close()
    return ImageTextRecord(where, messages, sources, base)


def load_image_text_records(data: DataArg | Sequence[ImageTextRecord], split: str | None = None) -> list[ImageTextRecord]:
    """Read and check every record of a data file/folder or a list of dicts (records already checked pass as they
    are); image paths in a file's records are resolved against the file's folder (in-memory records: against the
    working folder)."""
    if isinstance(data, Sequence) and data and all(isinstance(r, ImageTextRecord) for r in data):
        return list(data)
    base_dir = None
    if isinstance(data, (str, Path)):
        base_dir = Path(data) if Path(data).is_dir() else Path(data).parent
    return [parse_record(record, where, base_dir) for where, record in record_rows(data, split)]


def prompt_and_reference(record: ImageTextRecord) -> tuple[ImageTextRecord, str]:
    """The record cut before its last assistant turn (with the images that part shows), and that turn's text."""
    last = last_assistant_turn(record.messages)
    shown = sum(p["type"] == "image" for m in record.messages[:last] for p in m["content"])
    reference = "".join(p.get("text", "") for p in record.messages[last]["content"])
    return ImageTextRecord(record.where, record.messages[:last], record.images[:shown], record.base_dir), reference


def image_text_inputs(processor, records: Sequence[ImageTextRecord]) -> dict:
    """Model inputs of prompts (records cut before their answer): rendered with the chat template and its
    generation prompt, with their images, left-padded, as tensors; laid out as training lays out the same turns.

    A processor that appends text to every sample (PaliGemma's, the newline that ends its prefix) gets a prompt
    that already ends with it without it, so the prompt is the training sequence's prefix. With a prefix-LM
    processor (PaliGemma), earlier assistant turns of the prompt are marked as the causal suffix, as in training.
    """
    images = [[load_image(src, r.where, r.base_dir) for src in r.images] for r in records]
    _check_every_sample_has_an_image(processor, images, [r.where for r in records])
    pixels = images if any(images) else None
    texts = [render_chat(processor, r.messages, add_generation_prompt=True) for r in records]
    laid = _laid_out(processor, texts, pixels)
    texts = [_without_appended_tail(text, lt, r.where) for text, lt, r in zip(texts, laid, records)]
    prefix_lm = _is_prefix_lm(processor)
    kwargs = {"return_offsets_mapping": True, "return_text_replacement_offsets": True} if prefix_lm else {}
    out = processor(text=texts, images=pixels, padding=True, padding_side="left", add_special_tokens=False,
                    return_tensors="pt", **kwargs)
    if prefix_lm:
        spans = [assistant_spans(processor, r.messages)[1] for r in records]  # earlier assistant turns
        _mark_suffix(out, _marked_tokens(processor, out, texts, spans, pixels, records))
        out.pop("offset_mapping", None)
        out.pop("text_replacement_offsets", None)
    return out


def prompt_length(processor, record: ImageTextRecord) -> int:
    """The text tokens of a prompt, images not expanded: enough to sort prompts by length."""
    text = render_chat(processor, record.messages, add_generation_prompt=True)
    return len(_chat_tokenizer(processor)(text, add_special_tokens=False)["input_ids"])


# ----------------------------------------------------------------------------------------------------- tokens
def _chat_tokenizer(chat):
    return getattr(chat, "tokenizer", chat)


def skipped_token_ids(chat) -> torch.IntTensor:
    """Token ids that are never a training target, derived from ``chat`` (a processor, or a tokenizer).

    Candidates are every special token of the tokenizer (named, extra, and added tokens marked special) and every
    multimodal token the processor names (its ``*_token`` / ``*_token_id`` attributes and ``image_token_ids``,
    ``video_token_ids``, ``audio_token_ids``: image, video, begin/end-of-image, tile tokens...). Kept out of the set
    are the EOS token and every special token the chat template writes inside an assistant turn (found by rendering
    a probe conversation), so end-of-turn tokens are trained and the model learns to stop.
    """
    tokenizer = _chat_tokenizer(chat)
    added = tokenizer.get_added_vocab()
    candidates = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    candidates |= set(tokenizer.all_special_ids)
    if chat is not tokenizer:
        for name, value in vars(chat).items():
            if isinstance(value, str) and value in added:
                candidates.add(added[value])
            elif name.endswith(("_token_id", "_token_ids", "_ids")):
                values = value if isinstance(value, (list, tuple)) else [value]
                candidates |= {v for v in values if isinstance(v, int)}
        for name in ("image_token_ids", "video_token_ids", "audio_token_ids"):
            values = getattr(chat, name, None) or []
            candidates |= {v for v in values if isinstance(v, int)}
    kept = _assistant_turn_ids(chat) | {tokenizer.eos_token_id}
    return torch.tensor(sorted(i for i in candidates - kept if i is not None and i >= 0), dtype=torch.int32)


def _assistant_turn_ids(chat) -> set[int]:
    """Ids of the tokens the chat template writes inside an assistant turn (content, end-of-turn)."""
    chat_template_or_error(chat, "the processor" if chat is not _chat_tokenizer(chat) else "the tokenizer")
    as_parts = chat is not _chat_tokenizer(chat)

    def content(text: str):
        return [{"type": "text", "text": text}] if as_parts else text

    probe = [{"role": "user", "content": content("Hi")}, {"role": "assistant", "content": content("Hello")}]
    full, spans = assistant_spans(chat, probe)
    encoding = _chat_tokenizer(chat)(full, add_special_tokens=False, return_offsets_mapping=True)
    marked = tokens_in_spans(encoding["offset_mapping"], spans)
    return {i for i, keep in zip(encoding["input_ids"], marked) if keep}


def _expand(position: int, replacements: Sequence[dict]) -> int:
    """A character position of the rendered text, in the text whose placeholders the processor expanded."""
    gained = 0
    for r in replacements:
        if r["span"][1] <= position:
            gained += (r["new_span"][1] - r["new_span"][0]) - (r["span"][1] - r["span"][0])
    return position + gained


@dataclass
class ImageTextSample:
    """A record rendered with the chat template: the text, and its assistant turns as character spans."""

    record: ImageTextRecord
    text: str
    spans: list[tuple[int, int]]
    length: int = 0  # tokens after the processor's expansion
    num_label_tokens: int = 0


def render_sample(processor, record: ImageTextRecord) -> ImageTextSample:
    try:
        text, spans = assistant_spans(processor, record.messages)
    except DataFormatError as e:
        raise DataFormatError(f"{record.where}: {e}") from e
    return ImageTextSample(record, text, spans)


def _wheres(samples: Sequence[ImageTextSample]) -> str:
    wheres = [s.record.where for s in samples]
    return wheres[0] if len(wheres) == 1 else f"one of {', '.join(wheres[:4])}{'...' if len(wheres) > 4 else ''}"


def _check_every_sample_has_an_image(processor, images: Sequence[list], wheres: Sequence[str]) -> None:
    """A processor that refuses text without an image (PaliGemma's: its prefix starts with the image) would
    misplace its BOS in an image-less row of a mixed batch; such a sample is named instead."""
    if all(images):
        return
    try:
        processor.validate_inputs(images=None, text=["probe"])
    except ValueError:
        where = next(w for w, row in zip(wheres, images) if not row)
        raise DataFormatError(
            f"{where}: {type(processor).__name__} needs an image in every sample, and this one has none"
        ) from None
    except (AttributeError, TypeError):
        return


def _laid_out(processor, texts: list[str], images) -> list[str]:
    """The texts as the processor lays them out before it expands image placeholders (its
    ``prepare_inputs_layout``): PaliGemma's inserts its BOS after the last image and appends the newline that ends
    its prefix; Mllama's puts a BOS first when there is none; most leave them as they are."""
    layout = getattr(processor, "prepare_inputs_layout", None)
    if layout is None:
        return list(texts)
    try:
        laid = layout(images=images, text=list(texts))[1]
    except (ValueError, TypeError, IndexError, AttributeError):
        return list(texts)  # the processor's own call reports what is wrong with the sample
    if not isinstance(laid, list) or len(laid) != len(texts) or not all(isinstance(t, str) for t in laid):
        return list(texts)
    return laid


def _insertions(text: str, laid: str, where: str) -> list[tuple[int, int]]:
    """What the processor's layout inserted into ``text``: ``(position in text, number of characters)`` pairs."""
    if laid == text:
        return []
    if laid.startswith(text):
        return [(len(text), len(laid) - len(text))]
    import difflib

    ops = difflib.SequenceMatcher(None, text, laid, autojunk=False).get_opcodes()
    if any(tag in ("replace", "delete") for tag, *_ in ops):
        raise DataFormatError(
            f"{where}: the processor rewrites the rendered text before tokenizing it (not only inserting into it), "
            "so assistant turns cannot be located"
        )
    return [(i1, j2 - j1) for tag, i1, _i2, j1, j2 in ops if tag == "insert"]


def _past_insertions(position: int, insertions: Sequence[tuple[int, int]], is_start: bool) -> int:
    """A position of the rendered text in the laid-out text. Text inserted exactly at a turn's start or end is
    outside the turn."""
    return position + sum(n for at, n in insertions if at < position or (is_start and at == position))


def _without_appended_tail(text: str, laid: str, where: str) -> str:
    """``text`` without the end that the processor's layout appends to every text anyway, when it already ends
    with it (so it is there once, not twice)."""
    tail = next((n for at, n in _insertions(text, laid, where) if at == len(text)), 0)
    return text[:-tail] if tail and text.endswith(laid[-tail:]) else text


def _is_prefix_lm(processor) -> bool:
    """PaliGemma's convention: a prefix (images, prompt) attended bidirectionally and a causal suffix (the answer),
    told apart by ``token_type_ids`` (0, 1); its processor takes the suffix as an argument of its own."""
    try:
        return "suffix" in inspect.signature(processor.__call__).parameters
    except (TypeError, ValueError):
        return False


def _marked_tokens(processor, out: dict, texts: Sequence[str], spans: Sequence[Sequence[tuple[int, int]]], images,
                   records: Sequence[ImageTextRecord]) -> list[tuple[int, list[bool]]]:
    """For each row of the processor's output: where its tokens start (either padding side) and, for each of them,
    whether it ends inside one of the row's character ``spans`` of the rendered text. The spans are moved past
    what the processor's layout inserts (:func:`_laid_out`) and past its image-placeholder expansions."""
    if "offset_mapping" not in out:
        raise DataFormatError(f"{type(processor).__name__} returns no token offsets (it needs a fast tokenizer)")
    offsets = out["offset_mapping"].tolist()
    laid = _laid_out(processor, list(texts), images)
    replacements = out.get("text_replacement_offsets")
    if replacements is None and images is not None:
        replacements = _unexpanded(processor, laid, out["input_ids"])
    attention_mask = out["attention_mask"]
    marks = []
    for row, (text, row_spans) in enumerate(zip(texts, spans)):
        inserted = _insertions(text, laid[row], records[row].where)
        moved = replacements[row] if replacements else []

        def where_now(position: int, is_start: bool) -> int:  # in the text the processor tokenized
            return _expand(_past_insertions(position, inserted, is_start), moved)  # noqa: B023 (used at once)

        row_spans = [(where_now(s, True), where_now(e, False)) for s, e in row_spans]
        start, n = int(attention_mask[row].argmax()), int(attention_mask[row].sum())
        marks.append((start, tokens_in_spans(offsets[row][start : start + n], row_spans)))
    return marks


def _unexpanded(processor, laid: Sequence[str], input_ids: torch.Tensor) -> list[list]:
    """No replacement for any row, when the processor does not report its expansions but expanded nothing (each
    image placeholder is one token, as Mllama's ``<|image|>``); else a clear error."""
    token, token_id = getattr(processor, "image_token", None), getattr(processor, "image_token_id", None)
    if isinstance(token, str) and isinstance(token_id, int):
        if all(text.count(token) == int((row == token_id).sum()) for text, row in zip(laid, input_ids)):
            return [[] for _ in laid]
    raise DataFormatError(
        f"{type(processor).__name__} does not report where it expands image placeholders "
        "(return_text_replacement_offsets), so assistant turns cannot be located among the image tokens"
    )


def _mark_suffix(out: dict, marks: Sequence[tuple[int, list[bool]]]) -> None:
    """A prefix-LM's ``token_type_ids``: the suffix (1, attended causally) starts at the row's first marked token,
    so no trained token is ever in the bidirectional prefix of the token that predicts it."""
    token_types = out.get("token_type_ids")
    if token_types is None:
        return
    for row, (start, marked) in enumerate(marks):
        if any(marked):
            token_types[row, start + marked.index(True) : start + len(marked)] = 1


def encode_samples(processor, samples: Sequence[ImageTextSample], skipped_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """One batch: the processor's output (right-padded ``input_ids``, ``attention_mask``, pixel values and
    whatever else this family's model takes, batched the family's way) plus next-token ``labels``; with a prefix-LM
    processor (PaliGemma), ``token_type_ids`` make the assistant turns the causal suffix."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    images = [[load_image(src, s.record.where, s.record.base_dir) for src in s.record.images] for s in samples]
    _check_every_sample_has_an_image(processor, images, [s.record.where for s in samples])
    kwargs = {
        "text": [s.text for s in samples], "padding": True, "padding_side": "right", "return_tensors": "pt",
        "add_special_tokens": False, "return_offsets_mapping": True, "return_text_replacement_offsets": True,
    }
    if any(images):
        kwargs["images"] = images
    try:
        out = dict(processor(**kwargs))
    except (ValueError, TypeError, IndexError) as e:
        raise DataFormatError(f"{_wheres(samples)}: the processor rejected this sample ({e})") from e
    marks = _marked_tokens(processor, out, kwargs["text"], [s.spans for s in samples], kwargs.get("images"),
                           [s.record for s in samples])
    out.pop("offset_mapping")
    out.pop("text_replacement_offsets", None)
    input_ids = out["input_ids"]
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for row, (start, trained) in enumerate(marks):
        n = len(trained)
        _, shifted = shift_for_causal_lm(input_ids[row, start : start + n].tolist(), trained)
        labels[row, start : start + n - 1] = torch.tensor(shifted, dtype=labels.dtype)
    labels[torch.isin(labels, skipped_ids.to(labels.dtype))] = IGNORE_INDEX
    out["labels"] = labels
    if _is_prefix_lm(processor):
        _mark_suffix(out, marks)
    return out


@dataclass
class ImageTextCollator:
    """Batch :class:`ImageTextSample` s through the processor (it pads text and batches pixels its family's way)."""

    processor: Any
    skipped_ids: torch.Tensor

    def __call__(self, samples: Sequence[ImageTextSample]) -> dict[str, torch.Tensor]:
        return encode_samples(self.processor, samples, self.skipped_ids)


# ----------------------------------------------------------------------------------------------------- packing
# per-token keys a packed row carries (cut to each sample's tokens and laid end to end); image keys stay as the
# processor batched them, in the packed order of the samples
_TOKEN_KEYS = {"input_ids": None, "labels": IGNORE_INDEX, "attention_mask": 0, "token_type_ids": 0,
               "mm_token_type_ids": 0}


class PackingUnsupported(ValueError):
    """The processor's batch cannot be packed (a tensor ties tokens of a row to that row's images)."""


@dataclass
class ImageTextPackedCollator:
    """Pack a micro-batch of :class:`ImageTextSample` s into rows, padding-free, each sample keeping its images.

    The samples are grouped into rows of at most ``pack_length`` tokens (best-fit decreasing, as text packing),
    put in row order (row 0's samples, then row 1's, ...) and batched through the processor as one padded batch,
    so the image tensors (``pixel_values``, ``pixel_attention_mask``, ``image_sizes``...) come in the order in
    which the packed rows hold the samples' image tokens, and the model's scatter of image features into the
    placeholder tokens (row by row, left to right) gives every sample its own images. The per-token tensors
    (``input_ids``, ``labels``, ``token_type_ids``) are cut to each sample's tokens and laid end to end;
    ``position_ids`` restart at 0 at every sample; there is no ``attention_mask`` (the model builds a block-diagonal
    mask from the restarting positions). Labels were shifted per sample, so no target crosses a boundary. Rows
    shorter than the longest are padded at the end (pad token, label -100, token type 0, positions from 0).

    Args:
        processor: the model's processor.
        skipped_ids: ids never trained as targets (:func:`skipped_token_ids`).
        pad_token_id: the padding token.
        pack_length: the row capacity; ``None`` puts the whole micro-batch in one row (never more tokens than its
            padded batch). A sample longer than ``pack_length`` gets a row of its own.
        one_row: put the whole micro-batch in one row (variable-length flash attention takes its batch that way).
    """

    processor: Any
    skipped_ids: torch.Tensor
    pad_token_id: int
    pack_length: int | None = None
    one_row: bool = False
    lead: int = 0  # a filler segment of this many padding tokens starts every row (the exactness probe's)

    def rows(self, samples: Sequence[ImageTextSample]) -> list[list[int]]:
        """The sample indices of each row."""
        lengths = [s.length or _encoded_length(self.processor, s, self.skipped_ids) for s in samples]
        if self.one_row or self.pack_length is None:
            return [list(range(len(samples)))]
        return best_fit_decreasing(lengths, max(self.pack_length, *lengths))

    def __call__(self, samples: Sequence[ImageTextSample]) -> dict[str, torch.Tensor]:
        if not samples:
            raise ValueError("cannot collate an empty batch")
        rows = self.rows(samples)
        ordered = [samples[i] for row in rows for i in row]
        return pack_rows(encode_samples(self.processor, ordered, self.skipped_ids), [len(r) for r in rows],
                         self.pad_token_id, self.lead)


def _encoded_length(processor, sample: ImageTextSample, skipped_ids: torch.Tensor) -> int:
    return int(encode_samples(processor, [sample], skipped_ids)["input_ids"].shape[1])


def pack_rows(batch: dict, row_sizes: Sequence[int], pad_token_id: int, lead: int = 0) -> dict[str, torch.Tensor]:
    """A right-padded batch of samples (one per row) as packed rows: the first ``row_sizes[0]`` samples end to end
    in row 0, the next ``row_sizes[1]`` in row 1, ... (see :class:`ImageTextPackedCollator`). Image tensors are kept
    as they are. A tensor other than the known per-token ones that is per row and token (``[samples, tokens,
    ...]``, as Mllama's ``cross_attention_mask``) cannot be packed: :class:`PackingUnsupported`."""
    input_ids = batch["input_ids"]
    n, length = input_ids.shape
    if sum(row_sizes) != n:
        raise ValueError(f"row sizes {list(row_sizes)} do not add up to the batch's {n} samples")
    for key, value in batch.items():
        if key not in _TOKEN_KEYS and torch.is_tensor(value) and value.dim() >= 2 and tuple(value.shape[:2]) == (n, length):
            raise PackingUnsupported(
                f"the processor's {key!r} (shape {list(value.shape)}) ties each padded row's tokens to that row's "
                "images, so samples sharing a row would see each other's images"
            )
    mask = batch.get("attention_mask")
    lengths = (mask.sum(1) if mask is not None else torch.full((n,), length)).tolist()
    starts = [0, *itertools.accumulate(row_sizes)]
    width = lead + max(sum(lengths[starts[r] : starts[r + 1]]) for r in range(len(row_sizes)))
    packed = {k: v for k, v in batch.items() if k not in _TOKEN_KEYS}
    position_ids = torch.zeros((len(row_sizes), width), dtype=torch.long)
    for key, fill in _TOKEN_KEYS.items():
        if key not in batch or key == "attention_mask":
            continue
        value = batch[key]
        out = torch.full((len(row_sizes), width), pad_token_id if fill is None else fill, dtype=value.dtype)
        for r in range(len(row_sizes)):
            at = lead
            for i in range(starts[r], starts[r + 1]):
                out[r, at : at + lengths[i]] = value[i, : lengths[i]]
                at += lengths[i]
        packed[key] = out
    for r in range(len(row_sizes)):
        segments = [lead] * (lead > 0) + lengths[starts[r] : starts[r + 1]]
        at = 0
        for n_tokens in segments:
            position_ids[r, at : at + n_tokens] = torch.arange(n_tokens)
            at += n_tokens
        position_ids[r, at:] = torch.arange(width - at)
    packed["position_ids"] = position_ids
    return packed


def _model_name(model) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return f"{type(model).__name__} (model_type {model_type!r})" if model_type else type(model).__name__


def image_text_packing_is_exact(model, samples: Sequence[ImageTextSample], padded: ImageTextCollator,
                                packed: ImageTextPackedCollator, forward=None, rtol: float | None = None) -> tuple[bool, str]:
    """Check numerically that ``model`` keeps packed image-text samples apart: the logits of ``samples`` (real
    samples with their images, e.g. the first micro-batch) packed in one row must equal their logits in the padded
    batch, at every real token.

    The packed row starts with a filler segment as long as the longest sample (padding tokens, positions from 0),
    so a mask that looks token types or image blocks up by a sample's restarting position instead of its place in
    the row (samples laid out alike would hide that) reads the filler's and is caught. ``forward(batch)`` gives the
    logits (default: ``model(**batch).logits``). Returns ``(ok, reason)``; the reason names the model and its type.
    Runs two forwards in eval mode without gradients; the model's mode is restored.
    """
    who = _model_name(model)
    if not samples:
        raise ValueError("image_text_packing_is_exact needs at least one sample")
    try:
        param = next(model.parameters())
    except (StopIteration, AttributeError) as e:
        return False, f"{who}: cannot probe the model ({type(e).__name__}: {e})"
    forward = forward or (lambda batch: model(**batch, use_cache=False).logits)
    lead = max(s.length or _encoded_length(packed.processor, s, packed.skipped_ids) for s in samples)
    try:
        alone_batch = padded(samples)
        packed_batch = dataclasses.replace(packed, one_row=True, lead=lead)(samples)
    except PackingUnsupported as e:
        return False, f"{who}: {e}"
    lengths = alone_batch["attention_mask"].sum(1).tolist()

    def logits(batch: dict, keep: Sequence[str] = ()) -> torch.Tensor:
        batch = {k: v.to(param.device) if torch.is_tensor(v) else v for k, v in batch.items()
                 if k not in ("labels", *keep)}
        return forward(batch).float()

    def error(skip: Sequence[str] = ()) -> tuple[float, float]:
        alone, together = logits(alone_batch, skip), logits(packed_batch, skip)
        alone = torch.cat([alone[i, :n] for i, n in enumerate(lengths)])
        together = together[0, lead : lead + sum(lengths)]
        return float((together - alone).abs().max()), float(alone.abs().max().clamp(min=1.0))

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), eager():
            err, scale = error()
            tol = (rtol if rtol is not None else 1e-4 if param.dtype == torch.float32 else 3e-2) * scale
            if err > tol and "token_type_ids" in alone_batch:
                typeless, typeless_scale = error(("token_type_ids",))
                if typeless <= tol / scale * typeless_scale:
                    return False, (
                        f"{who}: the attention its token_type_ids set up (bidirectional over image tokens, or a "
                        f"prefix) is not kept per sample in a packed row (logits off by {err:.3g}; exact without "
                        "them)"
                    )
    except Exception as e:  # a model that cannot take packed inputs is simply not packed
        return False, f"{who} rejects packed image-text inputs ({type(e).__name__}: {e})"
    finally:
        model.train(was_training)
    if err > tol:
        return False, (f"{who}: packed logits differ from per-sample logits by {err:.3g} (the attention or the "
                       "image features cross samples)")
    return True, f"{who}: packed logits equal per-sample logits (images and token types kept per sample)"


# ----------------------------------------------------------------------------------------------------- module
class ImageTextDataModule(CausalLMDataModule):
    """:class:`hfbridge.CausalLMDataModule` for chat records with images, batched through a processor.

    Every record is checked when the module is built (format, image files, modes, image counts), and every sample
    is run through the processor once in ``setup`` (a sample the processor rejects is reported with its record);
    samples longer than ``max_length`` tokens are dropped (an image's tokens cannot be cut), as are samples with
    nothing to train (both logged). Shuffling, data-parallel sharding and the label-token count of each optimizer
    step are the parent's.

    ``packing`` (``"auto"``, ``True``, ``False``) and ``pack_length`` are the text module's: packed micro-batches
    (:class:`ImageTextPackedCollator`) hold the same samples, loss and gradients as padded ones. ``"auto"`` packs
    when :func:`image_text_packing_is_exact` finds, on the first training micro-batch, that the model being fitted
    keeps packed samples (and their images) apart, and pads otherwise (logged with the model type and why);
    ``True`` packs, and is an error if the check fails. ``pack_length`` defaults to ``max_length``; without either,
    a micro-batch is packed into one row.
    """

    def __init__(
        self,
        processor,
        train_data: DataArg,
        val_data: DataArg = None,
        max_length: int | None = None,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        val_fraction: float = 0.0,
        seed: int = 42,
        num_workers: int = 0,
        packing: bool | str = "auto",
        pack_length: int | None = None,
    ):
        if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
            raise ValueError(
                f"ImageTextDataModule needs a multimodal processor with an image processor and a tokenizer, got "
                f"{type(processor).__name__}"
            )
        try:
            chat_template_or_error(processor, "the processor")
        except DataFormatError as e:
            if not _is_prefix_lm(processor):
                raise
            raise DataFormatError(
                f"{e}. {type(processor).__name__} checkpoints (PaliGemma's) ship without one: set "
                "processor.chat_template to a template in PaliGemma's layout (images and prompt, a newline; the "
                "answer and EOS), such as hfbridge.models.tiny_image_text.TEMPLATES['paligemma']"
            ) from None
        self.processor = processor
        super().__init__(
            processor.tokenizer, train_data, val_data, data_format="messages", max_length=max_length,
            batch_size=batch_size, val_batch_size=val_batch_size, val_fraction=val_fraction, seed=seed,
            num_workers=num_workers, packing=packing, pack_length=pack_length,
        )
        self.skipped_ids = skipped_token_ids(processor)
        self.collator = ImageTextCollator(processor, self.skipped_ids)
        self.packed_collator = ImageTextPackedCollator(processor, self.skipped_ids, self.pad_token_id,
                                                       pack_length or max_length)

    def _load_records(self, data: DataArg, data_format: str) -> tuple[list[ImageTextRecord], str]:
        return load_image_text_records(data), "messages"

    def _tokenize(self, records: list[ImageTextRecord], split: str) -> list[ImageTextSample]:
        samples = []
        for record in records:
            sample = render_sample(self.processor, record)
            batch = self.collator([sample])
            sample.length = int(batch["input_ids"].shape[1])
            sample.num_label_tokens = int((batch["labels"] != IGNORE_INDEX).sum())
            samples.append(sample)
        fits = [s for s in samples if self.max_length is None or s.length <= self.max_length]
        if len(fits) < len(samples):
            first = next(s for s in samples if s.length > self.max_length)
            log.warning("%s: %d of %d samples are longer than max_length=%s tokens and were dropped (the first: %s)",
                        split, len(samples) - len(fits), len(samples), self.max_length, first.record.where)
        kept = [s for s in fits if s.num_label_tokens > 0]
        if len(kept) < len(fits):
            log.warning("%s: %d samples have nothing to train and were dropped", split, len(fits) - len(kept))
        if not kept:
            raise DataSourceError(f"{split}: no sample has a token to train on")
        return kept

    def packing_probe(self) -> list[ImageTextSample]:
        """The samples the exactness check runs on: the first training micro-batch (at least two samples, so that
        two share the row; at most four, to keep the check cheap), the same on every rank."""
        self.setup("fit")
        return self.train_samples[: min(max(self.batch_size, 2), 4)]

    def _packing_check(self, model) -> tuple[bool, str]:
        """:func:`image_text_packing_is_exact` on :meth:`packing_probe`, through the module's forward."""
        forward = getattr(self.trainer.lightning_module, "forward", None)
        return image_text_packing_is_exact(
            model, self.packing_probe(), self.collator, self.packed_collator,
            forward=(lambda batch: forward(batch).logits) if forward is not None else None,
        )


__all__ = [
    "SUPPORTED_MODES", "ImageError", "image_text_inputs", "prompt_length", "ImageTextCollator", "ImageTextDataModule", "ImageTextRecord",
    "ImageTextPackedCollator", "ImageTextSample", "PackingUnsupported", "encode_samples", "image_text_packing_is_exact",
    "pack_rows", "load_image", "load_image_text_records", "open_image", "parse_record",
    "prompt_and_reference", "render_sample", "skipped_token_ids",
]
