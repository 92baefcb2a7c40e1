"""The bundled vision-language task: coloured shapes, and questions about them.

Each image is a small picture of one shape (circle, square or triangle) in one of five colours, at a random
place and size on a light background. Questions ask for the colour, the shape, or (with two images) both
colours in order, so a batch mixes samples with one and two images. Everything is generated from a seed: nothing
is downloaded. Train and test records come from separate random streams (the same colours and shapes, drawn at
other places and sizes).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from hfbridge.shapes_task import COLOURS, QUESTIONS, SHAPES

IMAGE_SIZE = 32


def draw_shape(shape: str, colour: str, rng: random.Random, size: int = IMAGE_SIZE):
    """A ``size`` x ``size`` RGB image of one shape."""
    from PIL import Image, ImageDraw

    grey = rng.randrange(225, 256)
    image = Image.new("RGB", (size, size), (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    extent = rng.randrange(size // 2, size - 4)
    x0, y0 = rng.randrange(0, size - extent), rng.randrange(0, size - extent)
    box = (x0, y0, x0 + extent, y0 + extent)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0 + extent / 2, y0), (x0, y0 + extent), (x0 + extent, y0 + extent)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    return image


def shape_records(n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """``n`` records in the ``messages`` format with their PIL images inline (40% colour, 40% shape and 20%
    two-image questions)."""
    if split not in ("train", "test"):
        raise ValueError("split must be 'train' or 'test'")
    rng = random.Random(f"shapes-{seed}-{split}")
    records = []
    for _ in range(n):
        kind = rng.choices(("colour", "shape", "two"), weights=(2, 2, 1))[0]
        drawn = [(rng.choice(SHAPES), rng.choice(list(COLOURS))) for _ in range(2 if kind == "two" else 1)]
        images = [{"type": "image", "image": draw_shape(s, c, rng)} for s, c in drawn]
        if kind == "colour":
            answer = drawn[0][1]
        elif kind == "shape":
            answer = drawn[0][0]
        else:
            answer = f"{drawn[0][1]} and {drawn[1][1]}"
        records.append({"messages": [
            {"role": "user", "content": [*images, {"type": "text", "text": QUESTIONS[kind]}]},
            {"role": "assistant", "content": answer},
        ]})
    return records


def write_shapes_data(folder: str | Path, n_train: int = 400, n_test: int = 60, seed: int = 0) -> tuple[Path, Path]:
    """Write ``train.jsonl``, ``test.jsonl`` and their PNG images (under ``images/``, referenced by relative
    paths) to ``folder``; return the two JSONL paths."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    paths = []
    for split, n in (("train", n_train), ("test", n_test)):
        path = folder / f"{split}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for i, record in enumerate(shape_records(n, seed, split)):
                k = 0
                for message in record["messages"]:
                    for part in message["content"] if isinstance(message["content"], list) else []:
                        if part["type"] == "image":
                            name = f"images/{split}-{i:04d}-{k}.png"
                            part["image"].save(folder / name)
                            part["image"] = name
                            k += 1
                f.write(json.dumps(record) + "\n")
        paths.append(path)
    return paths[0], paths[1]
