"""The words of the bundled shapes task, shared by its data (:mod:`hfbridge.data.demo_image_text` draws the pictures
and asks the questions) and the demo vision-language model (:mod:`hfbridge.models.tiny_image_text` trains its tiny
tokenizer on them). Imports nothing."""

from __future__ import annotations

COLOURS = {
    "red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 119, 180), "yellow": (230, 200, 20),
    "purple": (148, 103, 189),
}
SHAPES = ("circle", "square", "triangle")
QUESTIONS = {
    "colour": "What colour is the shape?",
    "shape": "What shape is this?",
    "two": "What colours are the two shapes, in order?",
}


def corpus() -> list[str]:
    """Lines that cover the task's words (for training a tiny tokenizer that knows them)."""
    answers = [f"{a} and {b}" for a in COLOURS for b in COLOURS] + list(SHAPES)
    return [*QUESTIONS.values(), *answers, "user assistant system image picture shape colour"]
